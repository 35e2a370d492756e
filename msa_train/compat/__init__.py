"""Run Megatron-Core on CPU with gloo (tests, smoke runs); does nothing when CUDA exists.

Every entry point calls :func:`apply` before building Megatron objects. The patches replace
Megatron's hard-coded CUDA calls (RNG, ``device="cuda"`` literals, streams/events, the clip-grads
type assert, MoE split sizes) with CPU equivalents. :func:`apply_always` holds the fixes that are
needed on GPU as well (Megatron without TransformerEngine).
"""

from msa_train.compat.patches import apply, apply_always, is_applied
from msa_train.compat.distributed import destroy_parallel, init_parallel

__all__ = ["apply", "apply_always", "is_applied", "init_parallel", "destroy_parallel"]
