"""Convert a public model's config both ways and record time and peak memory.

    python tools/hf_convert_check.py docs/hf_configs/Qwen2.5-0.5B.json --workdir /tmp/hfcheck

Builds the model from config.json with random weights (bf16, saved as sharded safetensors), runs
`msa-convert import-hf` and `msa-convert export-hf --no-msa` as separate processes (peak RSS of
each), then checks that stock transformers loads the export with the original's tensors bit for
bit and the same logits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


# msa-convert in a child that reports its own peak resident memory when it ends. VmHWM, not
# getrusage's ru_maxrss: the latter survives exec and would report this (model-holding) parent.
_WRAPPER = ("import sys\nfrom msa_train.convert.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "finally:\n    print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status')"
            " if l.startswith('VmHWM')][0])")


# The runtime alone (Python, PyTorch, Megatron, the converter): the floor under both peaks.
_BASELINE = ("import msa_train.convert.importer, msa_train.convert.exporter, msa_train.convert.plan\n"
             "import megatron.core.dist_checkpointing, torch.distributed.checkpoint, safetensors.torch\n"
             "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status')"
             " if l.startswith('VmHWM')][0])")


def _peak_kb(stdout: str) -> int:
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("PEAK_RSS_KB")][-1]


def _run(args):
    """Run msa-convert ARGS; returns (seconds, peak RSS in MiB of that process)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], check=True,
                          stdout=subprocess.PIPE, text=True)
    seconds = time.time() - start
    print(proc.stdout.strip())
    return seconds, _peak_kb(proc.stdout) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a Hugging Face config.json")
    p.add_argument("--workdir", default="/tmp/hf_convert_check")
    p.add_argument("--attention", default="paper")
    args = p.parse_args()

    import torch
    import transformers as tf

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    hf_dir, conv, out = (os.path.join(args.workdir, n) for n in ("hf", "converted", "export"))
    cfg = tf.AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="300MB")
    params = sum(p.numel() for p in model.parameters())
    size_mib = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)
                   if f.endswith(".safetensors")) / 2**20
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    base = _peak_kb(subprocess.run([sys.executable, "-c", _BASELINE], check=True,
                                   stdout=subprocess.PIPE, text=True).stdout) / 1024
    t_imp, rss_imp = _run(["import-hf", hf_dir, conv, "--attention", args.attention,
                           "--dtype", "bf16"])
    t_exp, rss_exp = _run(["export-hf", conv, out, "--no-msa", "--shard-size-gb", "0.3"])
    original = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    back = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ref = original.state_dict()
    same = all(torch.equal(t, ref[k]) for k, t in back.state_dict().items())
    tokens = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_equal = torch.equal(original(tokens).logits, back(tokens).logits)
    print(json.dumps({"config": args.config, "architecture": cfg.architectures[0],
                      "parameters": params, "safetensors_mib": round(size_mib, 1),
                      "largest_tensor_mib": round(largest, 1), "runtime_baseline_rss_mib": round(base),
                      "import_seconds": round(t_imp, 1), "import_peak_rss_mib": round(rss_imp),
                      "export_seconds": round(t_exp, 1), "export_peak_rss_mib": round(rss_exp),
                      "tensors_bit_identical": same, "logits_identical": logits_equal}, indent=2))


if __name__ == "__main__":
    main()
