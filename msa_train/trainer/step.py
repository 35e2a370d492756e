"""One optimizer step on Megatron-Core: micro-batches through get_forward_backward_func (any
pipeline schedule), gradient finalization, clipping, the optimizer and the LR scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch


@dataclass
class StepResult:
    # Mean over the global batch's loss tokens, a 0-dim device tensor (read it only when logging:
    # .item() would synchronize every step); None off the last PP stage.
    lm_loss: Optional[torch.Tensor]
    grad_norm: Optional[float]
    lr: float
    skipped: bool  # the update was not applied (non-finite gradients)


def _to_device(batch: Dict[str, Optional[torch.Tensor]], device: torch.device) -> Dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    # Megatron's 3-tuple contract: it divides by num_tokens and num_microbatches itself.
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.to(loss.dtype)])
    return loss, num_tokens, {"lm_loss": report}


def make_forward_step(device: torch.device, cp_size: int):
    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        batch = _to_device(next(data_iterator), device)
        if cp_size > 1:
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    return forward_step


def _reduce_lm_loss(losses: List[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or not losses:
        return None
    total = torch.stack([entry["lm_loss"] for entry in losses]).sum(dim=0)  # [loss_sum, tokens]
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(
        with_context_parallel=True))
    return total[0] / total[1].clamp(min=1)


def _run_schedule(chunks, data_iterator, num_microbatches: int, seq_length: int,
                  micro_batch_size: int, device: torch.device, cp_size: int,
                  forward_only: bool) -> List[Dict[str, torch.Tensor]]:
    """Megatron's pipeline schedule (or plain loop at PP=1) over one global batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=make_forward_step(device, cp_size),
        data_iterator=data_iterator,  # one iterator per virtual pipeline stage
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


@torch.no_grad()
def guarded_optimizer_step(optimizer) -> Tuple[bool, Optional[float]]:
    """Megatron's optimizer.step(), except that a non-finite gradient norm skips the update.

    Megatron clips with the norm it brings to the host anyway (get_grad_norm_fp32 ends in
    .item()), so deciding on it costs no extra synchronization. Unclipped, a NaN norm would pass
    `clip_coeff < 1` and write NaN into every parameter and Adam moment. Same arithmetic as
    Megatron's step otherwise: the norm of all sub-optimizers' grads, one clip coefficient.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from msa_train.trainer.optimizer_state import sub_optimizers

    if optimizer.prepare_grads():  # a loss scaler found inf/nan (fp16): Megatron skips too
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for sub in sub_optimizers(optimizer):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0.0:
            continue
        params = sub.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=getattr(sub.config,
                                           "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(chunks, optimizer, scheduler, config, data_iterator, *, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int,
               device: torch.device, cp_size: int) -> StepResult:

    from msa_train.model.kl_scaler import kl_loss_scale, set_kl_loss_scale

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    grad_scale = 1.0 if config.grad_scale_func is None else float(
        config.grad_scale_func(torch.ones(1, device=device)).item())
    set_kl_loss_scale(kl_loss_scale(num_microbatches, cp_size, grad_scale))
    losses = _run_schedule(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size,
                           device, cp_size, forward_only=False)
    update_ok, grad_norm = guarded_optimizer_step(optimizer)
    if update_ok:
        scheduler.step(increment=global_batch_size)
    lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0
    return StepResult(
        lm_loss=_reduce_lm_loss(losses),
        grad_norm=grad_norm,
        lr=float(lr),
        skipped=not update_ok,
    )


@torch.no_grad()
def eval_step(chunks, data_iterator, *, num_microbatches: int, seq_length: int,
              micro_batch_size: int, device: torch.device, cp_size: int) -> Optional[float]:

    for chunk in chunks:
        chunk.eval()
    try:
            losses = _run_schedule(chunks, data_iterator, num_microbatches, seq_length,
                               micro_batch_size, device, cp_size, forward_only=True)
    finally:
        for chunk in chunks:
            chunk.train()
    loss = _reduce_lm_loss(losses)
    return None if loss is None else float(loss)
