"""`msa-convert`: Hugging Face <-> msa-train checkpoints.

    msa-convert import-hf HF_DIR OUT_DIR [--attention NAME] [--dtype bf16|fp32]
    msa-convert export-hf CKPT_DIR OUT_DIR [--no-msa] [--dtype bf16|fp32] [--shard-size-gb 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face directory -> msa-train checkpoint")
    imp.add_argument("hf_dir", help="local Hugging Face model directory (config.json + safetensors)")
    imp.add_argument("out_dir", help="new directory for the checkpoint (checkpoint.init_from)")
    imp.add_argument("--attention", default=None,
                     help="attention config whose MSA layer map is applied: a configs/attention "
                          "name (paper, m3, tiny) or a yaml path (default: paper; MiniMax-M3 "
                          "checkpoints carry their own and take no --attention)")
    imp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    imp.add_argument("--seed", type=int, default=1234, help="seed of the fresh index branch")
    exp = sub.add_parser("export-hf", help="msa-train checkpoint -> Hugging Face directory")
    exp.add_argument("ckpt_dir", help="checkpoint save dir, iter_XXXXXXX dir, run dir or import-hf output")
    exp.add_argument("out_dir", help="new directory for the Hugging Face model")
    exp.add_argument("--no-msa", action="store_true",
                     help="drop the index branch and export the stock architecture (full attention)")
    exp.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                     help="tensor dtype (default: the checkpoint's)")
    exp.add_argument("--shard-size-gb", type=float, default=2.0)
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    from msa_train.convert.families.base import ConversionError
    from msa_train.trainer.ckpt_layout import CheckpointError

    try:
        if args.command == "import-hf":
            from msa_train.convert.importer import import_hf

            manifest = import_hf(args.hf_dir, args.out_dir, attention=args.attention,
                                 dtype=args.dtype, seed=args.seed)
            for note in manifest.get("notes", []):
                print(f"msa-convert: {note}", file=sys.stderr)
            print(f"msa-convert: {manifest['family']} -> {args.out_dir} ({manifest['num_tensors']} "
                  f"tensors, {len(manifest['fresh'])} fresh index-branch tensors, "
                  f"tokenizer: {'kept' if manifest['tokenizer'] else 'none'}, "
                  f"{manifest['seconds']} s)")
            # MiniMax-M3 brings a trained indexer: its recipe starts in the sparse stage.
            recipe = "m3_cpt" if manifest["family"] == "minimax_m3" else "cpt_from_hf"
            print(f"train it: msa-train experiment={recipe} checkpoint.init_from="
                  f"{os.path.abspath(args.out_dir)} data.paths=[...]")
        else:
            from msa_train.convert.exporter import export_hf

            report = export_hf(args.ckpt_dir, args.out_dir, no_msa=args.no_msa, dtype=args.dtype,
                               shard_size_gb=args.shard_size_gb)
            print(f"msa-convert: {report['architecture']} -> {args.out_dir} "
                  f"({report['shards']} shard(s), {report['bytes'] / 2**20:.1f} MiB, "
                  f"{report['seconds']} s)" + (" - load with trust_remote_code=True" if report["msa"] else ""))
    except (ConversionError, CheckpointError) as exc:
        print(f"msa-convert: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
