"""MSA index branch: q_idx = sg(X) W_qi (one index head per GQA group), k_idx = sg(X) W_ki (one
shared index-key head), optional per-head RMSNorm and partial RoPE (docs/MSA.md).

Tensor parallel: W_qi is column-parallel, its heads sharded with the rank's GQA groups. W_ki (and
the index norm weights) are replicated; each rank's KL only covers its own groups, so their
gradients are all-reduced over TP inside the graph (all_reduce_grad), which
keeps them identical across ranks whether or not sequence parallel is on. Under SP the detached
input is all-gathered first (no gradient flows back through it).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over a group.

    Not Megatron's copy_to_tensor_model_parallel_region: it all-reduces
    ``grad.contiguous()`` and returns the original grad, which drops the reduction whenever
    the incoming grad is non-contiguous (it is here: the packing transposes).
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_grad(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceGrad.apply(x, group) if group.size() > 1 else x


class MSAIndexer(MegatronModule):
    def __init__(self, config, pg_collection: ProcessGroupCollection):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp
        self.tp_size = self.tp_group.size()
        self.index_dim = config.msa_index_dim
        self.stop_grad = bool(getattr(config, "msa_index_stop_grad", True))
        if config.num_query_groups % self.tp_size != 0:
            raise ValueError(
                f"model.num_query_groups ({config.num_query_groups}) must be divisible by "
                f"parallel.tp ({self.tp_size}) for MSA layers"
            )
        self.groups_per_rank = config.num_query_groups // self.tp_size
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        if not self.stop_grad and self.sequence_parallel:
            # Under SP the gathered input's gradient would mix per-rank (q) and TP-summed (k)
            # parts; the ablation does not need that layout.
            raise ValueError("attention.index_stop_grad=false (ablation) does not support "
                             "parallel.sequence_parallel=true; use sequence_parallel=false or tp=1")
        self.linear_qi = ColumnParallelLinear(
            config.hidden_size,
            config.num_query_groups * self.index_dim,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            skip_bias_add=True,
            tp_group=self.tp_group,
        )
        # The input is gathered here, not inside the linear.
        self.linear_qi.sequence_parallel = False
        device = (
            torch.device("cpu") if config.use_cpu_initialization or not torch.cuda.is_available()
            else torch.device("cuda", torch.cuda.current_device())
        )
        self.weight_ki = torch.nn.Parameter(
            torch.empty(self.index_dim, config.hidden_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            config.init_method(self.weight_ki.data)
        # Zero-centred (model.norm_zero_centered): the weight is an offset from one.
        self.norm_offset = 1.0 if getattr(config, "layernorm_zero_centered_gamma", False) else 0.0
        if config.msa_index_norm:
            init = torch.zeros if self.norm_offset else torch.ones
            ones = lambda: init(self.index_dim, dtype=config.params_dtype, device=device)
            self.q_norm_weight = torch.nn.Parameter(ones())
            self.k_norm_weight = torch.nn.Parameter(ones())
        else:
            self.q_norm_weight = self.k_norm_weight = None
        self.eps = config.layernorm_epsilon
        self._sync_replicated_params()
        rot = int(self.index_dim * config.gpt_rotary_percent) // 2 * 2
        self.rope_dim = rot if config.msa_index_rope else 0
        self.rope_base = float(config.gpt_rotary_base)

    @torch.no_grad()
    def _sync_replicated_params(self) -> None:
        """Replicated weights must start equal on every TP rank; whether they do would otherwise
        depend on every other module drawing the same number of default-RNG values per rank."""
        if self.tp_size == 1 or self.weight_ki.device.type == "meta":
            return
        src = torch.distributed.get_process_group_ranks(self.tp_group)[0]
        for p in (self.weight_ki, self.q_norm_weight, self.k_norm_weight):
            if p is not None:
                torch.distributed.broadcast(p.data, src=src, group=self.tp_group)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [s(/TP under SP), b, h] (layer input after the input norm) ->
        q_idx [s, b, Hkv/TP, Di], k_idx [s, b, Di]."""
        if self.stop_grad:
            x = x.detach()  # stop-gradient: the KL must not reach the backbone
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, False, group=self.tp_group)
        s, b = x.shape[0], x.shape[1]
        q_idx, _ = self.linear_qi(x)
        q_idx = q_idx.view(s, b, self.groups_per_rank, self.index_dim)  # [s, b, Hkv/TP, Di]
        k_idx = F.linear(x, self.weight_ki)  # [s, b, Di]
        if self.q_norm_weight is not None:
            q_w = all_reduce_grad(self.q_norm_weight, self.tp_group)
            k_w = self.k_norm_weight
            if self.norm_offset:
                q_w, k_w = q_w + self.norm_offset, k_w + self.norm_offset
            q_idx = F.rms_norm(q_idx, (self.index_dim,), q_w, self.eps)
            k_idx = F.rms_norm(k_idx, (self.index_dim,), k_w, self.eps)
        k_idx = all_reduce_grad(k_idx, self.tp_group)
        return q_idx, k_idx


def apply_index_rope(
    x: torch.Tensor, positions: torch.Tensor, rope_dim: int, base: float
) -> torch.Tensor:
    """Non-interleaved RoPE on the first ``rope_dim`` channels of x [T, ..., Di] at positions [T]."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    inv_freq = 1.0 / (
        base ** (torch.arange(0, half, device=x.device, dtype=torch.float32) * 2.0 / rope_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, rope_dim/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos = torch.cos(angles).view(shape).to(x.dtype)
    sin = torch.sin(angles).view(shape).to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
