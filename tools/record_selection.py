#!/usr/bin/env python3
"""Record one MSA layer's index vectors and top-k selection from a trained checkpoint on real text.

    python tools/record_selection.py RUN_OR_CKPT --text FILE [--layer L] [--seq-len N] -o recorded.pt
    python tools/record_selection.py runs/tiny_cpu --python-stdlib -o recorded.pt

The checkpoint (a run dir, a save dir or an iter_XXXXXXX dir) is loaded as msa-eval loads it
(msa_train.eval.checkpoint: the model rebuilt from the run's run_config.yaml, the trainer's weight
loader). One sequence runs through it in sparse mode and the chosen MSA layer's index branch is
captured. The file holds q_idx [T, Hkv, Di] and k_idx [T, Di] (fp16), topk_idx [Hkv, T, k] from
msa_kernels.select_blocks with the run's block size, k, sink and window options, and metadata
(checkpoint, layer, block size, k, model, text source).

`python -m msa_kernels.bench --families recorded:PATH` replays a recording at the bench's shapes;
the bench's default recording (kernels/bench/data/recorded_tiny_cpu.pt) is the last MSA layer of a
tiny_cpu checkpoint on the Python standard library's sources (`--python-stdlib`).
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from typing import Dict, Tuple

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_text(min_chars: int) -> Tuple[str, str]:
    """Whole standard-library source files, in name order, until there are min_chars characters."""
    lib = sysconfig.get_paths()["stdlib"]
    text, names = "", []
    for name in sorted(n for n in os.listdir(lib) if n.endswith(".py")):
        with open(os.path.join(lib, name), encoding="utf-8", errors="surrogateescape") as f:
            text += f.read()
        names.append(name)
        if len(text) > min_chars:
            break
    return text, f"python {sys.version.split()[0]} stdlib: " + " ".join(names)


def capture_index_vectors(em, ids: torch.Tensor, layer: int):
    """(q_idx, k_idx, layout) of decoder layer `layer` for one sparse-mode forward of ids."""
    core = em.model.decoder.layers[layer].self_attention.core_attention
    captured = {}
    original = core._index_tensors

    def recording(x, layout):
        q_idx, k_idx = original(x, layout)
        captured["value"] = (q_idx.detach(), k_idx.detach(), layout)
        return q_idx, k_idx

    core._index_tensors = recording  # an instance attribute shadows the method for this forward
    try:
        em.set_mode("sparse")
        em.logits(ids)
    finally:
        del core._index_tensors
    if "value" not in captured:
        raise RuntimeError(f"layer {layer} computed no index vectors in sparse mode")
    return captured["value"]


def record(em, ids: torch.Tensor, layer: int, text_source: str) -> Dict:
    import msa_kernels

    if layer not in em.msa_layers:
        raise ValueError(f"--layer {layer} is not an MSA layer; MSA layers: {em.msa_layers}")
    q_idx, k_idx, layout = capture_index_vectors(em, ids, layer)
    attn = em.cfg.attention
    topk = msa_kernels.select_blocks(q_idx, k_idx, layout.cu_seqlens, em.block_size, em.topk,
                                     force_sink=bool(attn.force_sink), local_window=int(attn.local_window),
                                     **layout.kernel_kwargs())
    return {"q_idx": q_idx.to(torch.float16).cpu(), "k_idx": k_idx.to(torch.float16).cpu(),
            "topk_idx": topk.cpu(), "block_size": em.block_size, "topk": em.topk, "layer": layer,
            "checkpoint": os.path.basename(os.path.normpath(em.iter_dir)),
            "model": str(em.cfg.model.name), "text": text_source.strip()[:500]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run dir, save dir (latest iteration) or iter_XXXXXXX dir")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file, tokenized with the run's tokenizer")
    src.add_argument("--python-stdlib", action="store_true",
                     help="text = the running Python's standard-library sources (the tiny_cpu corpus kind)")
    ap.add_argument("--layer", type=int, default=None, help="0-based decoder layer (default: the last MSA layer)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens (default: the run's train.seq_length)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("-o", "--out", required=True, help="output .pt file")
    args = ap.parse_args(argv)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)  # msa_train from this checkout when it is not installed
    from msa_train.eval.checkpoint import close, load_eval_model

    em = load_eval_model(args.checkpoint, device=args.device, max_seq_len=args.seq_len)
    try:
        seq_len = args.seq_len or int(em.cfg.train.seq_length)
        if args.python_stdlib:
            text, source = stdlib_text(8 * seq_len)
        else:
            with open(args.text, encoding="utf-8", errors="surrogateescape") as f:
                text, source = f.read(), os.path.basename(args.text)
        ids = np.asarray(em.tokenizer.tokenize(text), dtype=np.int64)[:seq_len]
        if len(ids) < seq_len:
            raise SystemExit(f"the text gives {len(ids)} tokens, fewer than --seq-len {seq_len}: "
                             "give more text or a smaller --seq-len")
        if not em.msa_layers:
            raise SystemExit("the checkpoint's model has no MSA layers (attention layer map is all 0)")
        layer = em.msa_layers[-1] if args.layer is None else args.layer
        try:
            rec = record(em, torch.as_tensor(ids), layer, source)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    finally:
        close()
    torch.save(rec, args.out)
    print(f"{args.out}: layer {layer}, q_idx {tuple(rec['q_idx'].shape)}, k_idx {tuple(rec['k_idx'].shape)}, "
          f"block {rec['block_size']}, top-{rec['topk']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
