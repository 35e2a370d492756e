#!/usr/bin/env python3
"""Heatmap of the key blocks each GQA group's indexer selects per query block, from a checkpoint.

    python tools/plot_pattern.py CKPT --text some_file.txt [--layers 3,20,40] [-o pattern.png]
    python tools/plot_pattern.py CKPT --random 4096 --seed 0

CKPT is a save directory (its latest iteration) or an iter_XXXXXXX directory written by msa-train;
the model is rebuilt from the run_config.yaml stored beside the weights and loaded with the
trainer's weights loader. One sequence is run through the model (single process, TP=1, on CPU
unless --device cuda); for each chosen MSA layer the index branch's q_idx / k_idx are captured and
msa_kernels.select_blocks picks the blocks exactly as sparse training does. Each panel shows, for
one (layer, group), the fraction of queries in a query block that selected each key block: look
for the local diagonal, a sink column at key block 0 and group-specific long-range stripes.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import numpy as np


def _load_run_config(iter_dir: str, override: Optional[str]):
    from omegaconf import OmegaConf

    from msa_train.config.store import MSATrainConfig
    from msa_train.trainer.ckpt_layout import RUN_CONFIG_FILENAME

    path = override or os.path.join(iter_dir, RUN_CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no run config at {path}: pass --config <run_config.yaml>")
    # Typed by the schema, so model/attention become their dataclasses (layer maps, validation).
    return OmegaConf.merge(OmegaConf.structured(MSATrainConfig), OmegaConf.load(path))


def _tokens(cfg, args, seq_cap: int) -> np.ndarray:
    if args.text:
        from msa_train.data import build_tokenizer

        with open(args.text, encoding="utf-8", errors="surrogateescape") as f:
            ids = build_tokenizer(cfg.data.tokenizer).tokenize(f.read())
    else:
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, int(cfg.model.vocab_size), size=args.random)
    ids = np.asarray(ids, dtype=np.int64)[: args.seq_len or seq_cap]
    return ids


def _capture_index_tensors(model, layers: List[int]) -> Dict[int, tuple]:
    """Wrap the chosen layers' core attention so each forward records (q_idx, k_idx, layout)."""
    captured: Dict[int, tuple] = {}
    found = {}
    for i, layer in enumerate(model.decoder.layers):
        core = layer.self_attention.core_attention
        if getattr(core, "indexer", None) is not None:
            found[i] = core
    missing = [l for l in layers if l not in found]
    if missing:
        raise ValueError(f"--layers {missing} are not MSA layers; MSA layers: {sorted(found)}")
    for l in layers:
        core = found[l]
        original = core._index_tensors

        def wrapped(x, layout, _orig=original, _l=l):
            q_idx, k_idx = _orig(x, layout)
            captured[_l] = (q_idx.detach(), k_idx.detach(), layout)
            return q_idx, k_idx

        core._index_tensors = wrapped
    return captured


def select_patterns(iter_dir: str, cfg, tokens: np.ndarray, layers: Optional[List[int]],
                    device: str = "cpu") -> Dict[int, np.ndarray]:
    """{layer: [Hkv, nb, nb] selection frequency} for one sequence through the checkpoint's model."""
    import torch
    from omegaconf import OmegaConf

    import msa_kernels
    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.data import build_tokenizer, padded_vocab_size
    from msa_train.metrics.pattern import selection_frequency
    from msa_train.model import build_model, build_transformer_config, set_msa_mode
    from msa_train.trainer.init_from import load_weights
    from msa_train.trainer.setup import index_param_predicate

    model_cfg = OmegaConf.to_object(cfg.model)
    attn_cfg = OmegaConf.to_object(cfg.attention)
    mask = attn_cfg.layer_mask(model_cfg.num_layers)
    msa_layers = [i for i, m in enumerate(mask) if m]
    if not msa_layers:
        raise ValueError("the checkpoint's model has no MSA layers (attention layer map is all 0)")
    if layers is None:  # first, middle and last MSA layer
        layers = sorted({msa_layers[0], msa_layers[len(msa_layers) // 2], msa_layers[-1]})
    block = attn_cfg.block_size
    if len(tokens) < block:
        raise ValueError(f"the input has {len(tokens)} tokens, fewer than one block ({block}): "
                         "give a longer --text or a larger --random")
    # The checkpoint's global shapes use the vocabulary padded for the TRAINING tensor parallelism.
    tok = build_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(tok.vocab_size, int(cfg.data.tokenizer.make_vocab_size_divisible_by),
                              int(cfg.parallel.tp))
    init_parallel({})
    try:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        config = build_transformer_config(model_cfg, attn_cfg, {}, dtype)
        model = build_model(config, vocab_size=vocab, max_seq_len=len(tokens))
        model.to(device)
        report = load_weights(iter_dir, [model], index_param_predicate([model]), field_name="CKPT")
        if report.added:
            print(f"warning: {len(report.added)} index-branch weights were not in the checkpoint "
                  "(a dense checkpoint?): their selections are from random projections",
                  file=sys.stderr)
        set_msa_mode(model, "sparse")
        model.eval()
        captured = _capture_index_tensors(model, layers)
        ids = torch.as_tensor(tokens, device=device)[None]  # [1, T]
        pos = torch.arange(len(tokens), device=device)[None]
        with torch.no_grad():
            model(ids, pos, attention_mask=None)
        out = {}
        for l in layers:
            q_idx, k_idx, layout = captured[l]
            with torch.no_grad():
                topk = msa_kernels.select_blocks(
                    q_idx, k_idx, layout.cu_seqlens, block, attn_cfg.topk,
                    force_sink=attn_cfg.force_sink, local_window=attn_cfg.local_window,
                    **layout.kernel_kwargs())  # [Hkv, T, k]
            out[l] = selection_frequency(topk, len(tokens), block)
        return out
    finally:
        destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="save dir (latest iteration) or iter_XXXXXXX dir")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file, tokenized with the run's tokenizer")
    src.add_argument("--random", type=int, help="this many uniformly random token ids")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=None,
                    help="truncate the input (default: the run's train.seq_length)")
    ap.add_argument("--layers", default=None,
                    help="comma-separated 0-based MSA layer indices (default: first, middle, last)")
    ap.add_argument("--config", default=None, help="run_config.yaml (default: the checkpoint's)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("-o", "--out", default="selection_pattern.png")
    args = ap.parse_args(argv)
    if args.random is not None and args.random < 1:
        ap.error("--random must be >= 1")

    from msa_train.metrics.pattern import plot_selection
    from msa_train.trainer.ckpt_layout import resolve

    iter_dir = resolve(args.checkpoint, "CKPT")
    cfg = _load_run_config(iter_dir, args.config)
    layers = None
    if args.layers:
        try:
            layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
        except ValueError:
            ap.error(f"--layers must be comma-separated integers, got {args.layers!r}")
    tokens = _tokens(cfg, args, int(cfg.train.seq_length))
    freqs = select_patterns(iter_dir, cfg, tokens, layers, args.device)
    title = (f"{os.path.basename(iter_dir)}: {len(tokens)} tokens, block {cfg.attention.block_size}, "
             f"top-{cfg.attention.topk}")
    print(plot_selection(freqs, args.out, title=title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
