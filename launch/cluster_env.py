#!/usr/bin/env python3
"""Print the shell exports of a cluster preset (configs/cluster/<name>.yaml) for the launchers.

    eval "$(python3 launch/cluster_env.py slurm_h100)"

Exports every key of the preset's `env` map (a variable already set in the caller's environment
wins, so one job can override a preset), plus MSA_GPUS_PER_NODE and MSA_EXIT_GRACE_S. The same
YAML file is the Hydra `cluster` group the trainer composes, so launcher and trainer agree.
"""
import os
import re
import shlex
import sys

import yaml

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def preset_path(name_or_path: str, repo: str) -> str:
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        return name_or_path
    return os.path.join(repo, "configs", "cluster", name_or_path + ".yaml")


def exports(preset: dict, environ=os.environ) -> list:
    env = preset.get("env") or {}
    if not isinstance(env, dict):
        raise ValueError("cluster preset: `env` must be a mapping of VARIABLE: value")
    lines = []
    for key, value in env.items():
        if not _NAME.match(str(key)):
            raise ValueError(f"cluster preset: env key {key!r} is not a valid variable name")
        if key in environ:
            continue
        lines.append(f"export {key}={shlex.quote(str(value))}")
    gpn = preset.get("gpus_per_node", 8)
    if not isinstance(gpn, int) or gpn < 1:
        raise ValueError(f"cluster preset: gpus_per_node must be a positive integer, got {gpn!r}")
    grace = preset.get("exit_grace_s", 600)
    if not isinstance(grace, (int, float)) or grace < 0:
        raise ValueError(f"cluster preset: exit_grace_s must be >= 0 seconds, got {grace!r}")
    lines.append(f"export MSA_GPUS_PER_NODE={environ.get('MSA_GPUS_PER_NODE', gpn)}")
    lines.append(f"export MSA_EXIT_GRACE_S={int(grace)}")
    return lines


def main(argv) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} <cluster preset name | path.yaml>", file=sys.stderr)
        return 2
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = preset_path(argv[1], repo)
    if not os.path.exists(path):
        avail = sorted(f[:-5] for f in os.listdir(os.path.join(repo, "configs", "cluster"))
                       if f.endswith(".yaml"))
        print(f"cluster preset {argv[1]!r} not found ({path}); available: {', '.join(avail)}",
              file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as f:
        preset = yaml.safe_load(f) or {}
    try:
        print("\n".join(exports(preset)))
    except ValueError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
