"""Output projection + cross-entropy without the full [tokens, vocab] logits (``model.lm_loss``).

Megatron's GPTModel materialises the logits of every token (bf16, plus the fp32 copy and softmax
its vocab-parallel cross-entropy keeps for backward): at 32K tokens and a 32K vocabulary that is
~6 GB live, at the 109B's 200K vocabulary ~37 GB. The implementations here never hold more than
one chunk of tokens' logits:

- ``megatron``: GPTModel's own path (the reference; materialises the logits).
- ``chunked``: pure torch, any TP/SP layout. Tokens are cut into chunks; each chunk's logits and
  Megatron's vocab_parallel_cross_entropy run under activation checkpointing, so backward
  recomputes one chunk at a time. Same arithmetic as ``megatron``, one extra output GEMM.
- ``liger``: liger-kernel's fused linear cross-entropy (Triton, CUDA only, TP=1): the chunked
  logits, loss and gradient in fused kernels. Optional dependency (``pip install liger-kernel``).

All return Megatron's per-token loss [b, s] in fp32, so the trainer's masking and token counting
do not change.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from msa_train.model.config import LM_LOSS_IMPLS

# fp32 logits per chunk (elements): 2^28 = 1 GiB, the cap on what one chunk keeps alive.
_CHUNK_LOGITS = 1 << 28


def _chunk_tokens(num_tokens: int, vocab_local: int) -> int:
    return max(1, min(num_tokens, _CHUNK_LOGITS // max(vocab_local, 1)))


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = torch.matmul(hidden, weight.t())
    return vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1)).squeeze(1)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss [N] (fp32) of hidden [N, H] @ weight[V_local, H].T against labels [N],
    the vocabulary split over TP ranks as in Megatron's output layer."""
    step = _chunk_tokens(hidden.shape[0], weight.shape[0])
    losses = [
        checkpoint(_chunk_loss, hidden[i : i + step], weight, labels[i : i + step],
                   use_reentrant=False)
        for i in range(0, hidden.shape[0], step)
    ]
    return torch.cat(losses) if len(losses) > 1 else losses[0]


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor) -> torch.Tensor:
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )
    except ImportError as err:
        raise RuntimeError("model.lm_loss=liger needs liger-kernel (pip install liger-kernel); "
                           "or set model.lm_loss=chunked") from err
    # reduction="none": backward receives a per-token gradient (Megatron masks and scales per
    # token), which liger folds in by recomputing the chunked logits in backward.
    out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels, None, None, -100,
                                                     0.0, 0.0, "none")
    return out[0].float()


def lm_loss(hidden_sbh: torch.Tensor, weight: torch.Tensor, labels_bs: torch.Tensor,
            impl: str, *, tp_group=None, sequence_parallel: bool = False) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from the final hidden states [s(/tp under SP), b, h], the
    output weight [V_local, h] and labels [b, s] — what GPTModel returns with labels given."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    tp = 1 if tp_group is None else tp_group.size()
    if tp > 1 or sequence_parallel:
        # What ColumnParallelLinear does with its input: gather the sequence (backward:
        # reduce-scatter) or copy it (backward: all-reduce), so each rank scores its vocab shard.
        hidden_sbh = (gather_from_sequence_parallel_region(hidden_sbh, group=tp_group)
                      if sequence_parallel else
                      copy_to_tensor_model_parallel_region(hidden_sbh, group=tp_group))
    s, b, h = hidden_sbh.shape
    flat = hidden_sbh.transpose(0, 1).reshape(b * s, h)
    targets = labels_bs.reshape(b * s)
    if impl == "chunked":
        loss = chunked_linear_cross_entropy(flat, weight, targets)
    elif impl == "liger":
        if tp > 1:
            raise ValueError("model.lm_loss=liger supports parallel.tp=1 only (its fused kernel "
                             "scores the whole vocabulary); use model.lm_loss=chunked with TP")
        loss = liger_linear_cross_entropy(flat, weight, targets)
    else:
        raise ValueError(f"model.lm_loss must be one of {LM_LOSS_IMPLS}, got {impl!r}")
    return loss.view(b, s)


def output_weight(model) -> Optional[torch.Tensor]:
    """The output projection GPTModel uses: the shared embedding when tied."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
