"""Initialize torch.distributed + Megatron parallel_state (trainer and tests share this)."""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import torch
from msa_train.cfg_access import parallel_sizes


def init_parallel(
    parallel: Any = None,
    *,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: int = 10,
    create_gloo_process_groups: bool = False,
) -> None:
    """Init the default process group (env:// from torchrun, or a 1-process group) and Megatron's
    model-parallel groups, then seed Megatron's RNG tracker.

    ``parallel``: dict-like or object with tp, pp, cp, ep, etp (optional), vpp (optional).
    Backend: nccl with CUDA, gloo otherwise (``backend`` overrides).
    create_gloo_process_groups: extra gloo groups Megatron's distributed-optimizer checkpointing
    uses with NCCL (pass the same flag as use_gloo_process_groups to get_megatron_optimizer).
    """
    from msa_train.compat.patches import apply

    apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    tp, pp, cp, ep, etp, vpp = parallel_sizes(parallel)

    use_cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        kwargs = {}
        if "RANK" not in os.environ:
            # Single process without torchrun: a private 1-rank group on a free port, without
            # touching os.environ (child processes, e.g. torchrun launched from a test, inherit it).
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            kwargs = dict(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )

    world = torch.distributed.get_world_size()
    model_parallel = tp * pp * cp
    if world % model_parallel != 0:
        raise ValueError(
            f"parallel: world size {world} is not divisible by tp*pp*cp = {model_parallel}; "
            "change parallel.tp/pp/cp or the number of processes"
        )
    dp = world // model_parallel
    if (dp * cp) % ep != 0:
        raise ValueError(f"parallel.ep={ep} must divide dp*cp={dp * cp}")

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=create_gloo_process_groups,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
