"""Hydra structured-config schemas owned by the trainer: stage/, parallel/, train/, checkpoint/.

The model, attention, data, logging and cluster schemas live with the modules that consume them
(msa_train.model, msa_train.data, msa_train.metrics / msa_train.lifecycle); msa_train.config.store
assembles all of them into the root schema registered in Hydra's ConfigStore, so a misspelt key or
a wrong type in any group fails at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

TRAINABLE_POLICIES = ("all", "indexer_only")
STAGE_NAMES = ("warmup", "sparse")
STAGE_RUNS = ("both", "warmup", "sparse")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class PhaseConfig:
    """One stage of the MSA schedule (indexer warmup or sparse training).

    Each stage owns a fresh optimizer and LR schedule: frozen parameters differ between stages
    (trainable policy), and a stage started as a separate job from the previous stage's
    checkpoint (init_from) must train exactly like the same stage inside one continuous run.
    """

    tokens: int = MISSING  # training tokens of this stage; rounded up to whole global batches
    trainable: str = "all"  # all | indexer_only (frozen parameters get no optimizer state)
    lr: Optional[float] = None  # None -> train.lr
    min_lr: Optional[float] = None  # None -> train.min_lr
    lr_warmup_steps: Optional[int] = None  # None -> train.lr_warmup_steps


@dataclass
class StageConfig:
    # Which stages this job runs: both (switch at the token boundary inside one run), or one of
    # them (separate jobs: run=sparse with checkpoint.init_from = the warmup job's save dir).
    run: str = "both"
    warmup: PhaseConfig = field(default_factory=PhaseConfig)
    sparse: PhaseConfig = field(default_factory=PhaseConfig)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor model parallel size
    pp: int = 1  # pipeline model parallel size
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B); None = off
    cp: int = 1  # context parallel size
    ep: int = 1  # expert model parallel size
    sequence_parallel: bool = False  # required by Megatron for MoE with tp > 1
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # None: nccl when training on CUDA, gloo on CPU.
    backend: Optional[str] = None
    # Ranks the layout is written for; None = any. Checked against WORLD_SIZE before any compute.
    world_size: Optional[int] = None


@dataclass
class TrainConfig:
    seed: int = 1234
    seq_length: int = MISSING
    micro_batch_size: int = 1
    global_batch_size: int = MISSING
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    lr_warmup_steps: int = 0
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    # torch's fused AdamW kernel where the optimizer's parameters are on CUDA (foreach elsewhere);
    # msa_train.trainer.optimizer_state.set_fused_adam.
    fused_adam: bool = True
    eval_interval: Optional[int] = None  # steps between validation passes; None = no validation
    eval_iters: int = 2  # global batches per validation pass
    # Activation recompute, passed to the TransformerConfig: None | full | selective.
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # uniform | block (granularity=full)
    recompute_num_layers: Optional[int] = None
    # Stop this job after this many optimizer steps (the run stays resumable); None = run to the end.
    max_steps_per_job: Optional[int] = None
    # Divergence policy: a step whose gradient norm (or loss) is NaN/inf is skipped (no update)
    # and counted; this many skipped steps in a row stop the job (exit 3) without saving, or,
    # with rollback_on_divergence, reload the last checkpoint and continue on fresh data.
    max_skipped_steps: int = 10
    rollback_on_divergence: bool = False
    max_rollbacks: int = 3  # rollbacks per job before the job stops anyway


@dataclass
class CheckpointConfig:
    # Checkpoint directory (Megatron layout <save>/iter_0000100/). If it already holds a
    # checkpoint the run resumes from it with full state.
    save: Optional[str] = None
    save_interval: Optional[int] = None  # optimizer steps between saves; None = stage ends only
    save_at_stage_end: bool = True
    # Full-state resume from another directory (must hold a checkpoint). Ignored when save has one.
    load: Optional[str] = None
    # Weights only (stage hand-off, dense -> MSA conversion): a save dir (its latest iteration) or
    # an iter_XXXXXXX dir. Used only when there is nothing to resume.
    init_from: Optional[str] = None
    # Stage hand-off: when init_from is an msa-train checkpoint that ends exactly where this job's
    # first stage starts (stage 1's final checkpoint for a stage.run=sparse job), continue its data
    # position and step counter, so the job reads the samples a continuous run would. Any other
    # init_from (a dense checkpoint to convert) starts the data at this job's first stage.
    init_continue_data: bool = True
    keep_last_k: Optional[int] = None  # None keeps every checkpoint
    # Check each file against the iteration's manifest (sizes, checksums) before loading; a
    # damaged latest iteration falls back to the previous intact one. false: load unchecked.
    verify: bool = True
    # Fields of this group a recipe needs set (e.g. [save, init_from] for a CPT job). A '???' in a
    # group or experiment file cannot express this: OmegaConf merges skip missing values.
    required: List[str] = field(default_factory=list)
