#!/usr/bin/env python3
"""Record one MSA layer's index vectors (q_idx, k_idx) and top-k from a checkpoint on real text.

    python scripts/record_selection.py CKPT --text FILE [--layer L] [--seq-len N] -o recorded.pt

The model is rebuilt from the checkpoint's run_config.yaml and loaded as tools/plot_pattern.py does;
one sequence runs through it and the chosen MSA layer's index branch is captured. The file holds
q_idx [T, Hkv, Di] and k_idx [T, Di] (fp16), topk_idx [Hkv, T, k] from msa_kernels.select_blocks
with the run's block size and k, and the metadata (checkpoint, layer, block size, k, text source).
``python -m msa_kernels.bench --families recorded:PATH`` replays it at the bench's shapes.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="save dir (latest iteration) or iter_XXXXXXX dir")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file, tokenized with the run's tokenizer")
    src.add_argument("--python-stdlib", action="store_true",
                     help="text = the running Python's standard-library sources (the tiny_cpu corpus kind)")
    ap.add_argument("--layer", type=int, default=None, help="0-based MSA layer (default: the last)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens (default: the run's train.seq_length)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import plot_pattern as pp  # the checkpoint loading and index-branch capture of the pattern plot

    import msa_kernels
    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.data import build_tokenizer, padded_vocab_size
    from msa_train.model import build_model, build_transformer_config, set_msa_mode
    from msa_train.trainer.ckpt_layout import resolve
    from msa_train.trainer.init_from import load_weights
    from msa_train.trainer.setup import index_param_predicate

    iter_dir = resolve(args.checkpoint, "CKPT")
    cfg = pp._load_run_config(iter_dir, None)
    seq_len = args.seq_len or int(cfg.train.seq_length)
    tok = build_tokenizer(cfg.data.tokenizer)
    if args.python_stdlib:
        import sysconfig

        lib = sysconfig.get_paths()["stdlib"]
        names = sorted(n for n in os.listdir(lib) if n.endswith(".py"))
        text, source = "", f"python {sys.version.split()[0]} stdlib: "
        for n in names:  # whole files, in name order, until the sequence is full
            with open(os.path.join(lib, n), encoding="utf-8", errors="surrogateescape") as f:
                text += f.read()
            source += n + " "
            if len(text) > 8 * seq_len:
                break
    else:
        with open(args.text, encoding="utf-8", errors="surrogateescape") as f:
            text, source = f.read(), os.path.basename(args.text)
    ids = np.asarray(tok.tokenize(text), dtype=np.int64)[:seq_len]
    if len(ids) < seq_len:
        raise SystemExit(f"the text gives {len(ids)} tokens, fewer than --seq-len {seq_len}: give more text")

    model_cfg = OmegaConf.to_object(cfg.model)
    attn_cfg = OmegaConf.to_object(cfg.attention)
    msa_layers = [i for i, m in enumerate(attn_cfg.layer_mask(model_cfg.num_layers)) if m]
    if not msa_layers:
        raise SystemExit("the checkpoint's model has no MSA layers")
    layer = msa_layers[-1] if args.layer is None else args.layer
    vocab = padded_vocab_size(tok.vocab_size, int(cfg.data.tokenizer.make_vocab_size_divisible_by),
                              int(cfg.parallel.tp))
    init_parallel({})
    try:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model = build_model(build_transformer_config(model_cfg, attn_cfg, {}, dtype), vocab_size=vocab,
                            max_seq_len=seq_len)
        model.to(args.device)
        report = load_weights(iter_dir, [model], index_param_predicate([model]), field_name="CKPT")
        if report.added:
            raise SystemExit(f"{len(report.added)} index-branch weights are not in the checkpoint (a dense "
                             "checkpoint?): record from one trained through the indexer warmup")
        set_msa_mode(model, "sparse")
        model.eval()
        captured = pp._capture_index_tensors(model, [layer])
        with torch.no_grad():
            model(torch.as_tensor(ids, device=args.device)[None],
                  torch.arange(seq_len, device=args.device)[None], attention_mask=None)
            q_idx, k_idx, lay = captured[layer]
            topk = msa_kernels.select_blocks(q_idx, k_idx, lay.cu_seqlens, attn_cfg.block_size, attn_cfg.topk,
                                             force_sink=attn_cfg.force_sink, local_window=attn_cfg.local_window,
                                             **lay.kernel_kwargs())
    finally:
        destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    rec = {"q_idx": q_idx.detach().to(torch.float16).cpu(), "k_idx": k_idx.detach().to(torch.float16).cpu(),
           "topk_idx": topk.cpu(), "block_size": int(attn_cfg.block_size), "topk": int(attn_cfg.topk),
           "layer": layer, "checkpoint": os.path.basename(os.path.normpath(iter_dir)),
           "model": str(cfg.model.name), "text": source.strip()[:500]}
    torch.save(rec, args.out)
    print(f"{args.out}: layer {layer}, q_idx {tuple(rec['q_idx'].shape)}, k_idx {tuple(rec['k_idx'].shape)}, "
          f"block {rec['block_size']}, top-{rec['topk']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
