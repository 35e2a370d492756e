"""MSA kernel benchmark: ``python -m msa_kernels.bench`` (GPU; ``--help`` for the options).

Measures the whole MSA layer as the model runs it (select_blocks + sparse_attention_and_kl, forward
and backward) and each kernel alone, at 64/4 (the 109B shape, first) and 64/8 heads, 8K-256K tokens,
on selections the bench does not choose (selections.py: i.i.d. random, a locality knob, and index
vectors recorded from a trained checkpoint), and on real packed workloads (workloads.py: 192K packs
whole and as one CP16 rank's share). Every row carries the union of blocks per 128-query tile (mean,
p90). Baselines in the same run: dense causal SDPA (cuDNN, flash), FlexAttention block-sparse at the
same budget and FlexAttention computing the same exact op (checked equal to ours) (flex.py).
Results: <out>/bench.json and <out>/bench.md; the run stops starting new work after --budget-s.
"""
from .legacy import PATTERNS, make_pattern, sparse_pairs  # noqa: F401 (gpu_check scripts)
from .timing import time_ms  # noqa: F401

__all__ = ["make_pattern", "sparse_pairs", "time_ms", "PATTERNS"]
