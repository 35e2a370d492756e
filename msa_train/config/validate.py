"""Cross-field checks of a composed config, run before any process group, model or data exists.

Hydra and the dataclass schemas already reject unknown keys and wrong types; this module checks
what depends on several fields or on the world size. Each error names the field(s) to change.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from msa_train.config.schema import (DEVICES, LR_DECAY_STYLES, PRECISIONS, STAGE_NAMES, STAGE_RUNS,
                                     TRAINABLE_POLICIES)


class ConfigError(ValueError):
    """The composed config cannot run; the message says which field to change."""


def _fail(errors: List[str]) -> None:
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def validate_config(cfg: DictConfig, world_size: int, check_paths: bool = True) -> None:
    """Raise ConfigError listing every problem found (not just the first).

    check_paths=False skips existence checks of data and checkpoint paths (dry runs plan a cluster
    job from a machine that does not see its storage); every other check still runs.
    """
    errors: List[str] = []
    _check_sections(cfg, errors, check_paths)  # schema-level __post_init__ checks of the other groups
    _fail(errors)
    _check_stage(cfg, errors)
    _check_train(cfg, errors)
    _check_layers(cfg, errors)
    _check_vocab(cfg, errors)
    _check_attention_vs_sequence(cfg, errors)
    _check_parallel(cfg, world_size, errors)
    _check_checkpoint(cfg, errors, check_paths)
    _fail(errors)


def _check_sections(cfg: DictConfig, errors: List[str], check_paths: bool) -> None:
    from msa_train.data.config import validate_data_config
    from msa_train.metrics.config import validate_logging_config

    for section in ("model", "attention", "data", "logging", "cluster"):
        try:
            # Instantiating the dataclass runs its own validation (__post_init__).
            obj = OmegaConf.to_object(cfg[section])
            if section == "data":
                validate_data_config(obj, check_files=check_paths)
            elif section == "logging":
                validate_logging_config(obj)
        except Exception as exc:  # the owners' messages already name their fields
            message = str(exc)
            errors.append(message if f"{section}." in message else f"{section}: {message}")


def _check_stage(cfg: DictConfig, errors: List[str]) -> None:
    stage = cfg.stage
    if stage.run not in STAGE_RUNS:
        errors.append(f"stage.run={stage.run!r} must be one of {list(STAGE_RUNS)}")
    for name in STAGE_NAMES:
        phase = stage[name]
        if phase.tokens < 0:
            errors.append(f"stage.{name}.tokens={phase.tokens} must be >= 0")
        if phase.trainable not in TRAINABLE_POLICIES:
            errors.append(f"stage.{name}.trainable={phase.trainable!r} must be one of "
                          f"{list(TRAINABLE_POLICIES)}")
        for field in ("lr", "min_lr", "lr_warmup_steps"):
            if phase[field] is not None and phase[field] < 0:
                errors.append(f"stage.{name}.{field}={phase[field]} must be >= 0")
    _check_warmup_fits(cfg, errors)
    if stage.run in STAGE_NAMES and stage[stage.run].tokens == 0:
        errors.append(f"stage.run={stage.run} but stage.{stage.run}.tokens=0: nothing to train")
    if stage.run == "both" and stage.warmup.tokens + stage.sparse.tokens == 0:
        errors.append("stage.warmup.tokens and stage.sparse.tokens are both 0: nothing to train")


def _check_warmup_fits(cfg: DictConfig, errors: List[str]) -> None:
    """An LR warmup longer than its stage never reaches the peak LR (and was silently cut)."""
    from msa_train.trainer.schedule import build_plan

    t = cfg.train
    if t.global_batch_size < 1 or t.seq_length < 1 or any(
            cfg.stage[n].tokens < 0 for n in STAGE_NAMES):
        return  # reported elsewhere
    try:
        plan = build_plan(cfg.stage, cfg.train)
    except Exception:
        return  # the stage checks report what is wrong
    # A stage's own warmup must fit that stage. The shared train.lr_warmup_steps is cut to each
    # stage's length (the trainer does so), so only one longer than the whole run is an error.
    for stage in plan.job_stages:
        own = cfg.stage[stage.name].lr_warmup_steps
        if own is not None and stage.steps > 0 and stage.lr_warmup_steps > stage.steps:
            errors.append(f"stage.{stage.name}.lr_warmup_steps={stage.lr_warmup_steps} is longer "
                          f"than the {stage.name} stage ({stage.steps} steps of "
                          f"train.global_batch_size x train.seq_length tokens): lower it or raise "
                          f"stage.{stage.name}.tokens")
    if t.lr_warmup_steps is not None and 0 < plan.total_steps < t.lr_warmup_steps:
        errors.append(f"train.lr_warmup_steps={t.lr_warmup_steps} is longer than the whole run "
                      f"({plan.total_steps} steps): lower it or raise the stages' tokens")


def _check_train(cfg: DictConfig, errors: List[str]) -> None:
    t = cfg.train
    for field in ("seq_length", "micro_batch_size", "global_batch_size", "eval_iters"):
        if t[field] < 1:
            errors.append(f"train.{field}={t[field]} must be >= 1")
    if t.device not in DEVICES:
        errors.append(f"train.device={t.device!r} must be one of {list(DEVICES)}")
    if t.precision not in PRECISIONS:
        errors.append(f"train.precision={t.precision!r} must be one of {list(PRECISIONS)}")
    if t.device == "cpu" and _cuda_visible():
        errors.append("train.device=cpu needs a machine without a visible GPU (the CPU "
                      "compatibility layer for Megatron-Core is off when CUDA exists): use "
                      "train.device=auto, or hide the GPUs with CUDA_VISIBLE_DEVICES=''")
    if t.device == "cpu" and t.precision == "bf16":
        errors.append("train.precision=bf16 is GPU-only here: use train.precision=fp32 on CPU")
    if t.lr_decay_style not in LR_DECAY_STYLES:
        errors.append(f"train.lr_decay_style={t.lr_decay_style!r} must be one of {list(LR_DECAY_STYLES)}")
    if t.lr < 0 or t.min_lr < 0 or t.min_lr > t.lr:
        errors.append(f"train.lr={t.lr} / train.min_lr={t.min_lr}: need 0 <= min_lr <= lr")
    if t.lr_warmup_steps < 0:
        errors.append(f"train.lr_warmup_steps={t.lr_warmup_steps} must be >= 0")
    if t.clip_grad < 0:
        errors.append(f"train.clip_grad={t.clip_grad} must be >= 0 (0 disables clipping)")
    for field in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= t[field] < 1.0:
            errors.append(f"train.{field}={t[field]} must be in [0, 1)")
    if not t.adam_eps > 0:
        errors.append(f"train.adam_eps={t.adam_eps} must be > 0")
    if t.weight_decay < 0:
        errors.append(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.lr > 0 and not math.isfinite(t.lr):
        errors.append(f"train.lr={t.lr} must be finite")
    if t.get("max_skipped_steps", 1) < 1:
        errors.append(f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1")
    if t.get("max_rollbacks", 0) < 0:
        errors.append(f"train.max_rollbacks={t.max_rollbacks} must be >= 0")
    if t.get("rollback_on_divergence", False) and not cfg.checkpoint.save:
        errors.append("train.rollback_on_divergence=true needs checkpoint.save (the checkpoints "
                      "it rolls back to)")
    if t.eval_interval is not None and t.eval_interval < 1:
        errors.append(f"train.eval_interval={t.eval_interval} must be >= 1 or null")
    if t.max_steps_per_job is not None and t.max_steps_per_job < 1:
        errors.append(f"train.max_steps_per_job={t.max_steps_per_job} must be >= 1 or null")
    if t.recompute_granularity not in (None, "full", "selective"):
        errors.append(f"train.recompute_granularity={t.recompute_granularity!r} must be null, "
                      "full or selective")
    if t.seq_length > cfg.model.max_position_embeddings:
        errors.append(f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
                      f"{cfg.model.max_position_embeddings}")


def _check_layers(cfg: DictConfig, errors: List[str]) -> None:
    """The attention layer map must fit the model (it used to fail later in a traceback)."""
    try:
        OmegaConf.to_object(cfg.attention).layer_mask(int(cfg.model.num_layers))
    except ValueError as exc:
        errors.append(f"{exc} (model.num_layers={cfg.model.num_layers}): fix attention.layer_ids "
                      "/ attention.layer_map or model.num_layers")


def _check_vocab(cfg: DictConfig, errors: List[str]) -> None:
    """The vocabulary is data.tokenizer's (padded); model.vocab_size only sizes the dry-run
    estimate. A model.vocab_size below the tokenizer's cannot be what the user meant."""
    tok = cfg.data.tokenizer
    if tok.type != "byte":
        return  # a huggingface tokenizer is loaded (and checked) when the data is built
    from msa_train.data.tokenizer import ByteTokenizer

    check_model_vocab(int(cfg.model.vocab_size), ByteTokenizer().vocab_size, str(tok.type), errors)


def check_model_vocab(model_vocab: int, tokenizer_vocab: int, tokenizer_type: str,
                      errors: List[str]) -> None:
    if model_vocab < tokenizer_vocab:
        errors.append(f"model.vocab_size={model_vocab} is smaller than the {tokenizer_type} "
                      f"tokenizer's {tokenizer_vocab} ids (data.tokenizer): the embedding is sized "
                      f"from the tokenizer, so set model.vocab_size={tokenizer_vocab} (or more, "
                      "padded) or use the tokenizer the model was meant for")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _msa_layers(cfg: DictConfig) -> int:
    try:
        return sum(OmegaConf.to_object(cfg.attention).layer_mask(int(cfg.model.num_layers)))
    except Exception:
        return 0


def _check_attention_vs_sequence(cfg: DictConfig, errors: List[str]) -> None:
    if _msa_layers(cfg) == 0:
        return  # a dense model (e.g. the source of a CPT conversion) has no block constraints
    seq, block, topk = int(cfg.train.seq_length), int(cfg.attention.block_size), int(cfg.attention.topk)
    cp = int(cfg.parallel.cp)
    if seq < block:
        errors.append(f"train.seq_length={seq} is shorter than one attention.block_size={block}: "
                      "lower the block size or raise the sequence length")
    elif seq % block != 0:
        errors.append(f"train.seq_length={seq} must be a multiple of attention.block_size={block}")
    blocks = seq // max(block, 1)
    if topk > blocks:
        errors.append(f"attention.topk={topk} exceeds the {blocks} blocks of a sequence "
                      f"(train.seq_length={seq} / attention.block_size={block})")
    sparse_runs = cfg.stage.run in ("both", "sparse") and cfg.stage.sparse.tokens > 0
    if sparse_runs and topk * block >= seq:
        errors.append(f"attention.topk x attention.block_size = {topk * block} covers the whole "
                      f"train.seq_length={seq}: the sparse stage would be dense; lower "
                      "attention.topk / attention.block_size or raise train.seq_length")
    if cp > 1 and seq % (2 * cp * block) != 0:
        errors.append(f"train.seq_length={seq} must be a multiple of 2 x parallel.cp x "
                      f"attention.block_size = {2 * cp * block} (zigzag context-parallel chunks)")


def _check_parallel(cfg: DictConfig, world_size: int, errors: List[str]) -> None:
    p, m, t = cfg.parallel, cfg.model, cfg.train
    for field in ("tp", "pp", "cp", "ep"):
        if p[field] < 1:
            errors.append(f"parallel.{field}={p[field]} must be >= 1")
    if errors:
        return
    if p.world_size is not None and p.world_size != world_size:
        errors.append(f"parallel.world_size={p.world_size} but this job has {world_size} ranks: "
                      "launch that many processes or pick a parallel/ layout for this world size")
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel != 0:
        errors.append(f"world size {world_size} is not divisible by parallel.tp x parallel.pp x "
                      f"parallel.cp = {model_parallel}")
        return
    dp = world_size // model_parallel
    if m.num_attention_heads % p.tp != 0:
        errors.append(f"parallel.tp={p.tp} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.num_query_groups % p.tp != 0:
        errors.append(f"parallel.tp={p.tp} must divide model.num_query_groups={m.num_query_groups} "
                      "(MSA shards index heads with their GQA groups)")
    chunks = p.pp * (p.vpp or 1)
    if m.num_layers % chunks != 0:
        errors.append(f"model.num_layers={m.num_layers} must be divisible by parallel.pp x "
                      f"parallel.vpp = {chunks}")
    if p.vpp is not None and (p.vpp < 1 or p.pp == 1):
        errors.append(f"parallel.vpp={p.vpp} needs parallel.pp > 1 and vpp >= 1 (or vpp=null)")
    if m.num_moe_experts is not None:
        if m.num_moe_experts % p.ep != 0:
            errors.append(f"parallel.ep={p.ep} must divide model.num_moe_experts={m.num_moe_experts}")
        if (dp * p.cp) % p.ep != 0:
            errors.append(f"parallel.ep={p.ep} must divide data x context parallel = {dp * p.cp}")
        if p.tp > 1 and not p.sequence_parallel:
            errors.append("MoE with parallel.tp > 1 needs parallel.sequence_parallel=true")
    elif p.ep != 1:
        errors.append(f"parallel.ep={p.ep} needs an MoE model (model.num_moe_experts)")
    if p.sequence_parallel and t.seq_length % p.tp != 0:
        errors.append(f"train.seq_length={t.seq_length} must be divisible by parallel.tp={p.tp} "
                      "with sequence parallel")
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step != 0:
        errors.append(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                      f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    elif p.pp > 1 and p.vpp and (t.global_batch_size // per_step) % p.pp != 0:
        errors.append("interleaved pipelining needs the number of micro-batches "
                      f"({t.global_batch_size // per_step}) to be a multiple of parallel.pp={p.pp}")


def _check_path(value: Optional[str], field: str, errors: List[str], need_checkpoint: bool) -> None:
    from msa_train.trainer import ckpt_layout

    if not value:
        return
    try:
        if need_checkpoint:
            ckpt_layout.resolve(value, field)
        elif not os.path.exists(value):
            errors.append(f"{field}={value} does not exist")
    except ckpt_layout.CheckpointError as exc:
        errors.append(str(exc))


def _has_checkpoint(save: Optional[str], errors: List[str]) -> bool:
    from msa_train.trainer import ckpt_layout

    try:
        return ckpt_layout.has_checkpoint(save)
    except ckpt_layout.CheckpointError as exc:
        errors.append(f"checkpoint.save: {exc}")
        return False


def _check_resume_shape(cfg: DictConfig, resuming: bool, errors: List[str]) -> None:
    """A full resume must find the model this config builds (a shape change loads silently)."""
    from msa_train.trainer import ckpt_layout
    from msa_train.trainer.ckpt_shape import check_same_shape

    ck = cfg.checkpoint
    field, path = ("checkpoint.save", ck.save) if resuming else ("checkpoint.load", ck.load)
    if not path:
        return
    try:
        directory = ckpt_layout.resolve(path, field)
    except ckpt_layout.CheckpointError as exc:
        if resuming:  # (a bad checkpoint.load is reported by _check_path)
            errors.append(str(exc))
        return
    try:
        check_same_shape(directory, cfg, field)
    except ckpt_layout.CheckpointError as exc:
        errors.append(str(exc))


def _check_checkpoint(cfg: DictConfig, errors: List[str], check_paths: bool) -> None:
    from msa_train.trainer import ckpt_layout

    ck = cfg.checkpoint
    for name in ck.required:
        if name not in ("save", "load", "init_from"):
            errors.append(f"checkpoint.required lists {name!r}: only save, load, init_from can be "
                          "required")
        elif not ck[name] and not (name == "init_from" and ckpt_layout.has_checkpoint(ck.save)):
            errors.append(f"checkpoint.{name} must be set for this recipe (checkpoint.required="
                          f"{list(ck.required)})")
    resuming = _has_checkpoint(ck.save, errors)
    if check_paths:
        _check_resume_shape(cfg, resuming, errors)
    if not resuming and check_paths:
        _check_path(ck.load, "checkpoint.load", errors, need_checkpoint=True)
        if not ck.load:
            _check_path(ck.init_from, "checkpoint.init_from", errors, need_checkpoint=True)
    if ck.save_interval is not None and ck.save_interval < 1:
        errors.append(f"checkpoint.save_interval={ck.save_interval} must be >= 1 or null")
    if ck.keep_last_k is not None and ck.keep_last_k < 1:
        errors.append(f"checkpoint.keep_last_k={ck.keep_last_k} must be >= 1 or null (keep all)")
    if ck.save_interval and not ck.save:
        errors.append(f"checkpoint.save_interval={ck.save_interval} but checkpoint.save is null: "
                      "set a save directory or checkpoint.save_interval=null")
    if cfg.train.max_steps_per_job and not ck.save:
        errors.append("train.max_steps_per_job stops the job early: set checkpoint.save so it can "
                      "resume")
    if (cfg.stage.run == "sparse" and cfg.stage.warmup.tokens > 0 and not resuming
            and not ck.load and not ck.init_from):
        errors.append("stage.run=sparse starts after the indexer warmup: set checkpoint.init_from "
                      "to the warmup job's checkpoint directory (or stage.warmup.tokens=0 to train "
                      "sparse from scratch)")
