"""What msa-eval measures on one in-process model (msa_train.eval.checkpoint.EvalModel).

- perplexity by position: per-token next-token loss, averaged inside log-spaced position buckets;
- answer scoring: greedy exact match and mean answer log-probability from ONE forward pass over
  prompt + answer. Greedy decoding reproduces the answer exactly iff, at every answer position, the
  argmax given the correct prefix is the correct token, so the teacher-forced argmax test is the
  same verdict as generating len(answer) tokens, without a decode loop or a cache;
- recall and KL per MSA layer: the layers' own recall metrics (msa_train.model.recall) and indexer
  KL (msa_train.model.kl_tracker) on the same forward pass;
- selection patterns: the blocks each group selects, from the index tensors of one sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def position_buckets(length: int, first: int) -> List[tuple]:
    """Log-spaced [start, end) buckets covering positions 0..length-1: [0, first), [first, 2 first),
    [2 first, 4 first), ..., the last one ending at length."""
    if length <= 0:
        raise ValueError(f"length must be > 0, got {length}")
    edges = [0]
    edge = max(1, int(first))
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class LossByPosition:
    """Running sums of next-token loss by position inside the sequence."""
    length: int
    sums: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self):
        self.sums = np.zeros(self.length, dtype=np.float64)
        self.counts = np.zeros(self.length, dtype=np.float64)

    def add(self, token_loss: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        loss = token_loss.detach().double().cpu().numpy()
        keep = np.ones_like(loss) if mask is None else mask.detach().double().cpu().numpy()
        n = min(len(loss), self.length)
        self.sums[:n] += (loss * keep)[:n]
        self.counts[:n] += keep[:n]

    def perplexity(self, buckets: Sequence[tuple]) -> Dict[str, object]:
        total = self.counts.sum()
        if total == 0:
            raise ValueError("no scored tokens: the validation data gave no samples")
        out = {"overall": math.exp(self.sums.sum() / total), "by_position": []}
        for start, end in buckets:
            n = self.counts[start:end].sum()
            if n > 0:
                out["by_position"].append({"start": int(start), "end": int(end),
                                           "ppl": math.exp(self.sums[start:end].sum() / n)})
        return out


@torch.no_grad()
def token_losses(em, ids: torch.Tensor) -> torch.Tensor:
    """ids int64 [T] -> fp32 [T-1] next-token losses."""
    logits = em.logits(ids[:-1])
    return torch.nn.functional.cross_entropy(logits, ids[1:].to(logits.device), reduction="none")


@dataclass
class AnswerScore:
    correct: bool
    mean_logprob: float


@torch.no_grad()
def score_answer(em, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> AnswerScore:
    if not answer_ids:
        raise ValueError("the answer tokenizes to no tokens")
    ids = torch.tensor(list(prompt_ids) + list(answer_ids), dtype=torch.long)
    logits = em.logits(ids[:-1])[len(prompt_ids) - 1:]  # the rows predicting the answer tokens
    target = ids[len(prompt_ids):].to(logits.device)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
    correct = bool((logits.argmax(dim=-1) == target).all())
    return AnswerScore(correct=correct, mean_logprob=float(logprobs.mean()))


@torch.no_grad()
def recall_and_kl(em, ids: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """{"layer_NN": {"block_recall", "score_recall", "kl"}} for one sparse-mode forward."""
    from msa_train.model import kl_tracker, recall

    kl_tracker.clear()
    recall.request_recall()
    em.logits(ids)
    metrics = recall.get_recall_metrics()
    kls = kl_tracker.get_kl_metrics()
    out = {}
    for layer in em.msa_layers:
        name = f"layer_{layer:02d}"
        block = metrics.get(f"msa/block_recall/{name}")
        if block is None:
            continue
        out[name] = {"block_recall": block, "score_recall": metrics[f"msa/score_recall/{name}"],
                     "kl": float(kls.get(layer + 1, float("nan")))}
    return out


def average_layers(runs: List[Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, float]]:
    """Mean of per-layer metrics over several sequences."""
    out: Dict[str, Dict[str, float]] = {}
    for layer in sorted({name for run in runs for name in run}):
        rows = [run[layer] for run in runs if layer in run]
        out[layer] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    return out


@torch.no_grad()
def selection_patterns(em, ids: torch.Tensor, layers: Optional[List[int]] = None) -> Dict[int, np.ndarray]:
    """{layer: [Hkv, nb, nb] selection frequency} for one sequence (see msa_train.metrics.pattern)."""
    import msa_kernels
    from msa_train.metrics.pattern import selection_frequency

    if not em.msa_layers:
        raise ValueError("the checkpoint's model has no MSA layers (attention layer map is all 0)")
    msa = em.msa_layers
    if layers is None:  # first, middle and last MSA layer
        layers = sorted({msa[0], msa[len(msa) // 2], msa[-1]})
    missing = [layer for layer in layers if layer not in msa]
    if missing:
        raise ValueError(f"layers {missing} are not MSA layers; MSA layers: {msa}")
    if len(ids) < em.block_size:
        raise ValueError(f"the sequence has {len(ids)} tokens, fewer than one block ({em.block_size})")
    captured: Dict[int, tuple] = {}
    cores = {i: layer.self_attention.core_attention for i, layer in enumerate(em.model.decoder.layers)}
    originals = {}
    for layer in layers:
        core = cores[layer]
        originals[layer] = True

        def wrapped(x, layout, _orig=core._index_tensors, _layer=layer):
            q_idx, k_idx = _orig(x, layout)
            captured[_layer] = (q_idx.detach(), k_idx.detach(), layout)
            return q_idx, k_idx

        core._index_tensors = wrapped
    try:
        em.set_mode("sparse")
        em.logits(ids)
    finally:
        for layer, original in originals.items():
            del cores[layer]._index_tensors  # back to the class method
    attn = em.cfg.attention
    out = {}
    for layer in layers:
        q_idx, k_idx, layout = captured[layer]
        topk = msa_kernels.select_blocks(
            q_idx, k_idx, layout.cu_seqlens, em.block_size, em.topk,
            force_sink=bool(attn.force_sink), local_window=int(attn.local_window),
            **layout.kernel_kwargs())
        out[layer] = selection_frequency(topk, len(ids), em.block_size)
    return out
