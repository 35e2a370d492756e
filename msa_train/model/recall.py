"""Paper Fig. 3 metrics, computed on demand on a sample of query tokens.

block recall = |main-branch top-k blocks ∩ indexer blocks| / k (k = valid slots of the row);
score recall = main-branch attention mass (mean over the group's heads) inside the indexer's blocks.
The main-branch top-k ranks the key blocks of a query by that group-mean attention mass.

Usage (trainer): ``request_recall()`` before a forward; every MSA layer then measures its sampled
queries during that forward; ``get_recall_metrics()`` (collective, all ranks) returns the averages
and clears the request.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from msa_train.model.packing import PackedLayout

_STATE = {"requested": False, "num_layers": 0}
_SUMS: Dict[int, torch.Tensor] = {}  # layer -> [block_recall_sum, score_recall_sum, count]


def request_recall() -> None:
    _STATE["requested"] = True


def recall_requested() -> bool:
    return _STATE["requested"]


def set_num_layers(num_layers: int) -> None:
    _STATE["num_layers"] = max(_STATE["num_layers"], int(num_layers))


def sample_rows(total: int, num: int, device) -> torch.Tensor:
    """Evenly spaced query rows (deterministic: does not disturb the RNG streams)."""
    if total <= num:
        return torch.arange(total, device=device)
    return torch.linspace(0, total - 1, num, device=device).round().long().unique()


@torch.no_grad()
def compute_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    topk_idx: torch.Tensor,
    layout: PackedLayout,
    block_size: int,
    scale: float,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q [T, Hq, D], k [Tk, Hkv, D], topk_idx int32 [Hkv, T, topk] ->
    fp32 [3] = (sum of block recall, sum of score recall, number of (row, group) pairs)."""
    t, hq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    topk = topk_idx.shape[2]
    rows = torch.arange(t, device=q.device) if rows is None else rows.to(q.device)
    result = torch.zeros(3, dtype=torch.float32, device=q.device)
    row_set = rows.tolist()
    for q_start, q_len, k_start, k_len in layout.fragments:
        sel = [r for r in row_set if q_start <= r < q_start + q_len]
        if not sel:
            continue
        r_idx = torch.tensor(sel, device=q.device, dtype=torch.long)
        pos = r_idx - q_start + (k_len - q_len)  # [n] positions inside the sequence
        qf = q[r_idx].float().view(len(sel), hkv, g, -1)  # [n, Hkv, G, D]
        kf = k[k_start : k_start + k_len].float()  # [k_len, Hkv, D]
        logits = torch.einsum("nrgd,jrd->nrgj", qf, kf) * scale
        visible = torch.arange(k_len, device=q.device)[None, :] <= pos[:, None]  # [n, k_len]
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=2)  # [n, Hkv, k_len]
        nb = -(-k_len // block_size)
        probs = torch.nn.functional.pad(probs, (0, nb * block_size - k_len))
        mass = probs.view(len(sel), hkv, nb, block_size).sum(-1)  # [n, Hkv, nb]
        n_vis = pos // block_size + 1  # [n]
        valid = torch.clamp(n_vis, max=topk)  # [n]
        block_ids = torch.arange(nb, device=q.device)
        ranked = mass.masked_fill(block_ids[None, None, :] >= n_vis[:, None, None], -1.0)
        top = ranked.topk(min(topk, nb), dim=-1).indices  # [n, Hkv, min(topk, nb)]
        slot = torch.arange(top.shape[-1], device=q.device)
        top_ok = (slot[None, None, :] < valid[:, None, None]).expand_as(top)
        main_sel = torch.zeros(len(sel), hkv, nb, dtype=torch.bool, device=q.device)
        main_sel.scatter_(2, top, top_ok)
        idx = topk_idx[:, r_idx, :].permute(1, 0, 2).long()  # [n, Hkv, topk]
        idx_ok = idx >= 0
        idx_sel = torch.zeros(len(sel), hkv, nb + 1, dtype=torch.bool, device=q.device)
        idx_sel.scatter_(2, torch.where(idx_ok, idx, nb), idx_ok)
        idx_sel = idx_sel[..., :nb]
        block_recall = (main_sel & idx_sel).sum(-1).float() / valid[:, None].float()
        score_recall = (mass * idx_sel).sum(-1)
        result += torch.stack(
            [block_recall.sum(), score_recall.sum(), torch.tensor(float(block_recall.numel()), device=q.device)]
        )
    return result


def record(layer_number: int, sums: torch.Tensor) -> None:
    _STATE["num_layers"] = max(_STATE["num_layers"], layer_number)
    sums = sums.detach().float()
    _SUMS[layer_number] = _SUMS[layer_number] + sums if layer_number in _SUMS else sums.clone()


def get_recall_metrics(reset: bool = True) -> Dict[str, float]:
    """{"msa/block_recall", "msa/score_recall"} averaged over layers, plus per-layer values
    ("msa/block_recall/layer_XX"). Collective over the world when distributed."""
    n = _STATE["num_layers"]
    out: Dict[str, float] = {}
    if n == 0:
        return out
    device = next(iter(_SUMS.values())).device if _SUMS else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        else torch.device("cpu")
    )
    table = torch.zeros(n, 3, dtype=torch.float32, device=device)
    for layer, sums in _SUMS.items():
        table[layer - 1] = sums.to(device)
    if torch.distributed.is_initialized():
        # Layers live on one pipeline stage; TP/CP/DP ranks hold disjoint (row, group) pairs.
        torch.distributed.all_reduce(table)
    if reset:
        _SUMS.clear()
        _STATE["requested"] = False
    block, score = [], []
    for i in range(n):
        if table[i, 2] > 0:
            b = float(table[i, 0] / table[i, 2])
            s = float(table[i, 1] / table[i, 2])
            out[f"msa/block_recall/layer_{i:02d}"] = b  # 0-based, as indexer_kl/layer_XX
            out[f"msa/score_recall/layer_{i:02d}"] = s
            block.append(b)
            score.append(s)
    if block:
        out["msa/block_recall"] = sum(block) / len(block)
        out["msa/score_recall"] = sum(score) / len(score)
    return out
