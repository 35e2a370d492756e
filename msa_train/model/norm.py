"""Norms that work under sequence parallelism (the local spec's torch norm refuses SP)."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SPNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (config.normalization) usable with sequence parallel.

    Under SP each TP rank normalizes a different slice of the sequence, so the weight grads
    differ across ranks; the weight is marked ``sequence_parallel`` so that Megatron's
    finalize_model_grads all-reduces them over TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.kind = config.normalization
        if self.kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be RMSNorm or LayerNorm, got {self.kind!r}")
        self.eps = eps
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if self.kind == "LayerNorm"
            else None
        )
        sp = bool(config.sequence_parallel)
        for p in (self.weight, self.bias):
            if p is not None:
                setattr(p, "sequence_parallel", sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered else self.weight
        if self.kind == "RMSNorm":
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, self.bias, self.eps)
