"""Deterministic, resumable batch sampler with Megatron's pretraining-sampler semantics.

Global sample order is simply 0, 1, 2, ... of the dataset (GPTDataset/BlendedDataset already
shuffle internally with the seed). Each step of micro_batch_size * dp_size consecutive indices is
cut into dp_size slices; DP rank r takes slice r. A run that resumes with
consumed_samples = (samples consumed so far, summed over all DP ranks) therefore yields exactly
the micro-batches the uninterrupted run would have yielded next, on every rank.
"""

from __future__ import annotations

from typing import Iterator, List


class ResumableBatchSampler:
    """Yields lists of dataset indices (one micro-batch of this DP rank) from consumed_samples on.

    Stops when fewer than micro_batch_size * dp_size samples are left (drop_last); the trainer
    sizes the train dataset so that this never happens before the last step.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} must lie in [0, data_parallel_size="
                f"{data_parallel_size})")
        if total_samples < 1:
            raise ValueError(f"total_samples={total_samples}: the dataset is empty")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
        self.step = micro_batch_size * data_parallel_size
        if consumed_samples % self.step:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size x "
                f"data_parallel_size = {self.step}: the checkpoint's data position does not match "
                f"this batch layout")
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} >= dataset size {total_samples}: the run has "
                f"already used every sample the dataset was built for; build it for more samples "
                f"(raise the number of training steps/samples) to continue")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[List[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for base in range(self.consumed_samples, self.total_samples - self.step + 1, self.step):
            yield list(range(base + start, base + start + self.micro_batch_size))
