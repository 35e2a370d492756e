"""`msa-train` / `python -m msa_train.train`: the Hydra entry point.

With no arguments it trains the embedded tiny_cpu experiment (CPU, both MSA stages). Examples:
    msa-train experiment=pilot_pt checkpoint.save=/ckpt/pilot
    msa-train train.max_steps_per_job=5        # stop early; the next run resumes
    msa-train dry_run=true experiment=msa_109b_pt parallel.world_size=256
"""

from __future__ import annotations

import sys
import warnings

# Megatron-Core announces at import that it falls back to plain PyTorch without TransformerEngine /
# Apex; that is this project's supported setup (CPU and GPU), not something to act on.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from msa_train.config import CONFIG_PATH, register_configs  # noqa: E402

register_configs()

# Exit codes (README "When things go wrong"): 0 done, 1 crash, 2 bad input (config, data,
# checkpoint; the message names the field or file), 3 divergence policy stopped the job, 4 the
# run is locked by another job, 75 saved and asks to be requeued.
BAD_INPUT_EXIT_CODE = 2


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from msa_train.config import ConfigError
    from msa_train.convert.cpt import CPTConfigError
    from msa_train.data import DataConfigError
    from msa_train.trainer import CheckpointError, run_training
    from msa_train.trainer.divergence import DIVERGED_EXIT_CODE, DivergenceError
    from msa_train.trainer.run_lock import RUN_LOCKED_EXIT_CODE, RunLockedError

    try:
        code = run_training(cfg)
    except (ConfigError, CheckpointError, DataConfigError, CPTConfigError) as exc:
        # A user error, not a crash: the message names the field; no traceback.
        print(f"msa-train: {exc}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except RunLockedError as exc:
        print(f"msa-train: {exc}", file=sys.stderr)
        sys.exit(RUN_LOCKED_EXIT_CODE)
    except DivergenceError as exc:
        print(f"msa-train: {exc}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT_CODE)
    if code:
        sys.exit(code)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
