"""Full causal GQA attention on the packed layout: dense layers and the MSA warmup stage.

Not MSA math (that lives in msa_kernels): plain softmax attention through torch SDPA, one call per
fragment. A fragment whose queries are the last q_len of k_len keys uses bottom-right causal
alignment (context parallel); q_len == k_len is the ordinary causal case (flash/cuDNN on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msa_train.model.packing import PackedLayout


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float
) -> torch.Tensor:
    """q [T, Hq, D], k/v [Tk, Hkv, D] -> out [T, Hq, D]."""
    hq, hkv = q.shape[1], k.shape[1]
    frags = layout.fragments
    if (
        frags
        and layout.key_starts is None
        and len({(ql, kl) for _, ql, _, kl in frags}) == 1
        and frags[0][1] > 0
        and q.shape[0] == len(frags) * frags[0][1]
    ):
        # b equal-length sequences (the usual batch): one batched call.
        n, s = len(frags), frags[0][1]
        qb = q.reshape(n, s, hq, -1).transpose(1, 2)  # [b, Hq, s, D]
        kb = k.reshape(n, s, hkv, -1).transpose(1, 2)  # [b, Hkv, s, D]
        vb = v.reshape(n, s, hkv, -1).transpose(1, 2)
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                            enable_gqa=hq != hkv)
        return ob.transpose(1, 2).reshape(q.shape)
    outs = []
    for q_start, q_len, k_start, k_len in layout.fragments:
        if q_len == 0:
            continue
        qf = q[q_start : q_start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        kf = k[k_start : k_start + k_len].transpose(0, 1).unsqueeze(0)  # [1, Hkv, k_len, D]
        vf = v[k_start : k_start + k_len].transpose(0, 1).unsqueeze(0)
        if q_len == k_len:
            of = F.scaled_dot_product_attention(
                qf, kf, vf, is_causal=True, scale=scale, enable_gqa=hq != hkv
            )
        else:
            qpos = torch.arange(k_len - q_len, k_len, device=q.device)
            mask = torch.arange(k_len, device=q.device)[None, :] <= qpos[:, None]  # [q_len, k_len]
            of = F.scaled_dot_product_attention(
                qf, kf, vf, attn_mask=mask, scale=scale, enable_gqa=hq != hkv
            )
        outs.append(of.squeeze(0).transpose(0, 1))  # [q_len, Hq, D]
    # Fragments are ordered and cover every query row.
    return torch.cat(outs) if outs else torch.zeros_like(q)
