"""Build one stage's training objects: model chunks (PP / VPP), DDP, optimizer, LR scheduler.

Everything is built fresh for each stage: the trainable policy decides which parameters get grad
buffers and optimizer state, and a stage run as its own job (init_from) must see exactly the same
objects as the same stage inside a continuous run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from msa_train.trainer.schedule import StagePlan


@dataclass
class StageObjects:
    config: object  # MSATransformerConfig of this stage
    chunks: List[torch.nn.Module]  # DDP-wrapped model chunks (one per virtual pipeline stage)
    optimizer: object
    scheduler: object
    trainable_params: int
    frozen_params: int


def index_param_predicate(chunks) -> Callable[[str], bool]:
    """name -> True for parameters of the MSA index branch (W_qi, W_ki, index norms).

    Derived from the built model (the attribute names under which MSAIndexer modules hang), so
    it also recognizes the same weights by their checkpoint keys.
    """
    from msa_train.model.indexer import MSAIndexer

    attrs = set()
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, MSAIndexer):
                attrs.add(name.rsplit(".", 1)[-1])
    return lambda name: bool(attrs.intersection(name.split(".")))


def build_transformer_config(cfg, runtime):
    from omegaconf import OmegaConf

    from msa_train.model import build_transformer_config as build

    train = cfg.train
    overrides = {}
    if train.recompute_granularity is not None:
        overrides.update(recompute_granularity=train.recompute_granularity,
                         recompute_method=train.recompute_method,
                         recompute_num_layers=train.recompute_num_layers)
    if runtime.is_cuda:
        overrides["use_cpu_initialization"] = False
    return build(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.attention), cfg.parallel,
                 runtime.params_dtype, **overrides)


def build_model_chunks(cfg, runtime, vocab_size: int) -> tuple:
    """Bare (un-wrapped) model chunks for this pipeline rank, on the training device."""
    from megatron.core import parallel_state, tensor_parallel

    from msa_train.model import build_model

    config = build_transformer_config(cfg, runtime)
    vpp = cfg.parallel.vpp
    chunks = []
    for vp_stage in range(vpp or 1):
        stage_arg = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage_arg)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage_arg)
        model = build_model(config, vocab_size=vocab_size, max_seq_len=int(cfg.train.seq_length),
                            pre_process=pre, post_process=post, vp_stage=stage_arg)
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        model.to(runtime.device)
        chunks.append(model)
    return config, chunks


def apply_trainable_policy(chunks, policy: str, is_index_param: Callable[[str], bool]) -> tuple:
    """Freeze parameters per the stage's policy; returns (trainable, frozen) element counts."""
    trainable = frozen = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            keep = policy == "all" or is_index_param(name)
            param.requires_grad_(keep)
            if keep:
                trainable += param.numel()
            else:
                frozen += param.numel()
    if trainable == 0 and policy == "indexer_only":
        raise ValueError(
            "stage trainable=indexer_only but this rank holds no index-branch parameters "
            "(attention layer map selects no MSA layer here): use trainable=all")
    return trainable, frozen


def wrap_ddp(config, chunks, parallel_cfg) -> List[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(parallel_cfg.overlap_grad_reduce),
        overlap_param_gather=bool(parallel_cfg.overlap_param_gather),
        use_distributed_optimizer=bool(parallel_cfg.use_distributed_optimizer),
        # Non-finite gradients are the divergence policy's job (skip the update, count, stop or
        # roll back: msa_train.trainer.divergence), not a RuntimeError inside the reduction.
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                # Megatron buckets only the first chunk; later ones sync at once.
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def build_optimizer(cfg, runtime, chunks, stage: StagePlan):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from msa_train.trainer.optimizer_state import set_fused_adam

    train = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=stage.lr,
        min_lr=stage.min_lr,
        weight_decay=float(train.weight_decay),
        adam_beta1=float(train.adam_beta1),
        adam_beta2=float(train.adam_beta2),
        adam_eps=float(train.adam_eps),
        clip_grad=float(train.clip_grad),
        bf16=runtime.bf16,
        params_dtype=runtime.params_dtype,
        use_distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
        overlap_param_gather=bool(cfg.parallel.overlap_param_gather),
    )
    optimizer = get_megatron_optimizer(opt_config, chunks, use_gloo_process_groups=False)
    set_fused_adam(optimizer, bool(train.fused_adam))
    # Megatron's scheduler counts samples: it is stepped by the global batch size each update.
    samples = int(train.global_batch_size)
    decay_steps = max(stage.steps, 1)
    warmup_steps = min(stage.lr_warmup_steps, decay_steps - 1) if decay_steps > 1 else 0
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_steps else stage.lr,
        max_lr=stage.lr,
        min_lr=stage.min_lr,
        lr_warmup_steps=warmup_steps * samples,
        lr_decay_steps=decay_steps * samples,
        lr_decay_style=str(train.lr_decay_style),
        start_wd=float(train.weight_decay),
        end_wd=float(train.weight_decay),
        wd_incr_steps=decay_steps * samples,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def attach_grad_hooks(config, chunks, optimizer) -> None:
    """Wire DDP and the optimizer into the TransformerConfig the schedules read."""
    from megatron.core.distributed import finalize_model_grads

    no_sync = [chunk.no_sync for chunk in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if chunks and chunks[0].ddp_config.overlap_grad_reduce:
        sync = [chunk.start_grad_sync for chunk in chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if chunks and chunks[0].ddp_config.overlap_param_gather:
        sync = [chunk.start_param_sync for chunk in chunks]
        config.param_sync_func = sync[0] if len(sync) == 1 else sync


def build_stage(cfg, runtime, stage: StagePlan, vocab_size: int,
                init_weights: Optional[Callable[[List[torch.nn.Module]], None]] = None) -> StageObjects:
    """Fresh model + DDP + optimizer + scheduler for `stage`.

    init_weights(bare_chunks) runs before DDP wraps the model (the previous stage's weights at a
    switch, or a weights-only checkpoint).
    """
    from msa_train.model import set_msa_mode

    config, chunks = build_model_chunks(cfg, runtime, vocab_size)
    if init_weights is not None:
        init_weights(chunks)
    for chunk in chunks:
        set_msa_mode(chunk, stage.mode)
    trainable, frozen = apply_trainable_policy(chunks, stage.trainable,
                                               index_param_predicate(chunks))
    wrapped = wrap_ddp(config, chunks, cfg.parallel)
    optimizer, scheduler = build_optimizer(cfg, runtime, wrapped, stage)
    attach_grad_hooks(config, wrapped, optimizer)
    return StageObjects(config, wrapped, optimizer, scheduler, trainable, frozen)
