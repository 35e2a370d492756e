"""Random-number state: seeding per stage, capture and restore for bitwise-exact resume."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int, stage_index: int) -> None:
    """Seed every generator for a stage.

    Stages are seeded from (seed, stage index, model-parallel rank) rather than continuing the
    previous stage's streams, so stage 2 run as a separate job consumes the same random numbers
    as stage 2 inside a continuous run.
    """
    from megatron.core import parallel_state, tensor_parallel

    # Distinct streams per pipeline/expert stage (as Megatron does); TP ranks share the default
    # stream and get their own through the model-parallel RNG tracker.
    offset = 100 * parallel_state.get_pipeline_model_parallel_rank()
    offset += 10 * parallel_state.get_expert_model_parallel_rank()
    stage_seed = int(seed) + 1_000_003 * int(stage_index) + offset
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def capture() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return state


def restore(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = state.get("tracker")
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
