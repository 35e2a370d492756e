"""Routed experts as two grouped GEMMs (torch._grouped_mm) instead of one GEMM per expert.

Megatron-Core's local SequentialMLP runs every expert's MLP in a Python loop: it brings the
per-expert token counts to the host (`tokens_per_expert.tolist()`, a device sync in every MoE
layer), splits the permuted tokens, launches 3+ kernels per expert and concatenates the outputs.
Its GroupedMLP needs the `grouped_gemm` CUDA extension and TEGroupedMLP needs TransformerEngine.

GroupedExperts keeps SequentialMLP's parameters (``local_experts.{i}.linear_fc{1,2}.weight``),
state dict and sharded state dict unchanged, so checkpoints, HF conversion and expert
parallelism see no difference; only the forward differs: the weights are stacked once per call
(a copy of the expert weights, small next to the GEMMs) and both projections run as one grouped
GEMM over the token groups, with offsets kept on the device. Chosen by ``model.moe_grouped_gemm``;
SequentialMLP stays the reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

# torch._grouped_mm runs on CPU (a reference loop) and, on CUDA, on sm90+ for bf16 only.
_CUDA_DTYPES = (torch.bfloat16,)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type != "cuda" or x.dtype not in _CUDA_DTYPES:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows x[offs[e-1]:offs[e]] times weights[e].T for every expert e (weights: [E, out, in],
    Megatron's [out, in] per expert). Rows past offs[-1] are not computed."""
    return torch._grouped_mm(x, weights.transpose(1, 2), offs=offs)


class GroupedExperts(SequentialMLP):
    """SequentialMLP's parameters, two grouped GEMMs in the forward (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        # kwargs: what newer Megatron-Core versions add (0.19: name=).
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         **kwargs)
        expert = self.local_experts[0]
        self._gated = bool(self.config.gated_linear_unit)
        self._has_bias = expert.linear_fc1.bias is not None or expert.linear_fc2.bias is not None
        self._fused_activation = bool(self.config.bias_activation_fusion)

    def _grouped(self, x: torch.Tensor) -> bool:
        cfg = self.config
        return (self.num_local_experts > 1 and not self._has_bias and grouped_mm_supported(x)
                and not (cfg.fp8 or cfg.fp4) and not cfg.moe_apply_probs_on_input)

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Megatron MLP's activation and per-token probability scaling, on all experts' rows."""
        cfg = self.config
        expert = self.local_experts[0]
        if self._fused_activation and self._gated and expert.activation_func == F.silu:
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1),
                                             cfg.activation_func_fp8_input_store)
        if self._gated:
            gate, linear = torch.chunk(h, 2, dim=-1)
            clamp = getattr(cfg, "activation_func_clamp_value", None)
            if clamp is not None:
                gate = gate.clamp(min=None, max=clamp)
                linear = linear.clamp(min=-clamp, max=clamp)
            act = expert.activation_func(gate) * (linear + getattr(cfg, "glu_linear_offset", 0.0))
        else:
            act = expert.activation_func(h)
        return (act * probs.unsqueeze(-1)).to(act.dtype)  # probs are fp32: keep the GEMM dtype

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self._grouped(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        h = grouped_linear(x, fc1, offs)
        h = self._activation(h, permuted_probs)
        return grouped_linear(h, fc2, offs), None
