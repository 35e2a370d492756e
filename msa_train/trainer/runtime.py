"""Process-level runtime: device and precision choice, torch.distributed and Megatron parallel state.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set) and as a plain single process
(a one-rank gloo/nccl group on a free local port), so `msa-train` needs no launcher on a laptop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    params_dtype: torch.dtype
    bf16: bool
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(train_cfg) -> torch.device:
    want = str(train_cfg.device)
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if want == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_precision(train_cfg, device: torch.device) -> torch.dtype:
    want = str(train_cfg.precision)
    if want == "auto":
        want = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if want == "bf16" else torch.float32


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_runtime(train_cfg, parallel_cfg) -> Runtime:
    """Initialize torch.distributed and Megatron's parallel groups for this job."""
    from msa_train.compat import init_parallel

    device = resolve_device(train_cfg)
    params_dtype = resolve_precision(train_cfg, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = parallel_cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    init_parallel(parallel_cfg, seed=int(train_cfg.seed), backend=backend)
    return Runtime(
        device=device,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def shutdown_runtime() -> None:
    from msa_train.compat import destroy_parallel

    destroy_parallel()
