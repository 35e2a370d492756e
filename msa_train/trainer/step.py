"""One optimizer step on Megatron-Core: micro-batches through get_forward_backward_func (any
pipeline schedule), gradient finalization, clipping, the optimizer and the LR scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional

import torch


@dataclass
class StepResult:
    lm_loss: Optional[float]  # mean over the global batch's loss tokens; None off the last PP stage
    grad_norm: Optional[float]
    lr: float
    skipped: bool  # optimizer refused the update (non-finite gradients)
    extra: Dict[str, float]


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


def _reduce_lm_loss(losses: List[Dict[str, torch.Tensor]]) -> Optional[float]:
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or not losses:
        return None
    total = torch.stack([entry["lm_loss"] for entry in losses]).sum(dim=0)  # [loss_sum, tokens]
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(
        with_context_parallel=True))
    return float(total[0] / total[1].clamp(min=1))


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


def train_step(chunks, optimizer, scheduler, config, data_iterator, *, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int,
               device: torch.device, cp_size: int) -> StepResult:

    from msa_train.model.kl_scaler import kl_loss_scale, set_kl_loss_scale

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    grad_scale = 1.0 if config.grad_scale_func is None else float(
        config.grad_scale_func(torch.ones(1, device=device)).item())
    set_kl_loss_scale(kl_loss_scale(num_microbatches, cp_size, config.calculate_per_token_loss,
                                    grad_scale))
    losses = _run_schedule(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size,
                           device, cp_size, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=global_batch_size)
    lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0
    return StepResult(
        lm_loss=_reduce_lm_loss(losses),
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=float(lr),
        skipped=not update_ok,
        extra={},
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
    return _reduce_lm_loss(losses)
