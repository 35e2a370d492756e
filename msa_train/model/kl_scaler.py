"""Attach the indexer KL to the attention output through an identity autograd function.

Like Megatron's MoEAuxLossAutoScaler: the forward returns the activation unchanged; the backward
injects ``coeff * scale`` as the KL's gradient, so the KL trains the indexer under any pipeline
schedule and micro-batching without being added to the returned loss. ``scale`` must follow
num_microbatches and CP exactly as the LM loss does (see :func:`kl_loss_scale`).
"""

from __future__ import annotations

from typing import Optional

import torch


class KLAutoScaler(torch.autograd.Function):
    # A tensor (not a float) so CUDA-graph captures read the current value.
    loss_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, kl: torch.Tensor, coeff: float):
        ctx.save_for_backward(kl)
        ctx.coeff = coeff
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (kl,) = ctx.saved_tensors
        scale = KLAutoScaler.loss_scale
        grad_kl = torch.full_like(kl, ctx.coeff)
        if scale is not None:
            grad_kl = grad_kl * scale.to(device=kl.device, dtype=kl.dtype)
        return grad_output, grad_kl, None


def kl_loss_scale(num_microbatches: int, cp_size: int = 1, grad_scale: float = 1.0) -> float:
    """Scale for the KL gradient so that every micro-batch adds lambda * grad(mean KL) / num_mb,
    averaged over data-parallel replicas, exactly like the LM loss.

    Each rank's KL is its share of the micro-batch mean (the shares of the CP ranks sum to it) and
    DDP averages gradients over DP x CP, hence cp_size / num_microbatches (Megatron's MoE aux-loss
    convention). The trainer keeps Megatron's per-micro-batch loss averaging
    (calculate_per_token_loss off). grad_scale: the mixed-precision loss scale
    (config.grad_scale_func(1)), 1.0 in fp32/bf16.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    return float(grad_scale) * cp_size / num_microbatches


def set_kl_loss_scale(scale) -> None:
    """Set the KL gradient scale used by every MSA layer's backward (call once per step)."""
    value = torch.as_tensor(scale, dtype=torch.float32).reshape(())
    if KLAutoScaler.loss_scale is None or KLAutoScaler.loss_scale.device != value.device:
        KLAutoScaler.loss_scale = value.clone()
    else:
        KLAutoScaler.loss_scale.copy_(value)
