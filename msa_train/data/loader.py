"""DataLoader over a Megatron dataset: resumable sampling + the batch contract the trainer uses.

A batch is a dict:
  tokens       int64   [b, s]   input ids
  labels       int64   [b, s]   next-token targets (tokens shifted by one inside the window)
  loss_mask    float32 [b, s]   1 where the label counts
  position_ids int64   [b, s]   0..s-1, or per-document when data.reset_position_ids
  attention_mask None           causal masking is the attention's job
  cu_seqlens   int32   [F+1]    only with data.reset_attention_mask: document boundaries of the
                                b*s tokens flattened row-major (packed varlen layout of
                                msa_kernels); every row start is a boundary.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader

from msa_train.data.sampler import ResumableBatchSampler

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def document_cu_seqlens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """tokens [b, s] -> int32 [F+1] boundaries; a document ends after its EOD or at a row end."""
    b, s = tokens.shape
    rows, cols = torch.nonzero(tokens == eod, as_tuple=True)
    ends = rows * s + cols + 1  # first token after each EOD
    starts = torch.arange(b + 1, dtype=ends.dtype) * s
    return torch.unique(torch.cat([starts, ends])).to(torch.int32)


class BatchCollator:
    """Stacks per-sample dicts into the batch contract above (picklable for worker processes)."""

    def __init__(self, eod: Optional[int] = None, with_cu_seqlens: bool = False) -> None:
        if with_cu_seqlens and eod is None:
            raise ValueError("with_cu_seqlens needs the tokenizer's eod id")
        self.eod = eod
        self.with_cu_seqlens = with_cu_seqlens

    def __call__(self, samples: List[Dict[str, torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        batch: Dict[str, Optional[torch.Tensor]] = {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}
        batch["attention_mask"] = None
        if self.with_cu_seqlens:
            batch["cu_seqlens"] = document_cu_seqlens(batch["tokens"], self.eod)
        return batch


def build_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                      data_parallel_rank: int = 0, data_parallel_size: int = 1,
                      num_workers: int = 0, collator: Optional[BatchCollator] = None,
                      pin_memory: Optional[bool] = None) -> DataLoader:
    """Micro-batches of this DP rank, starting at the global position consumed_samples."""
    sampler = ResumableBatchSampler(len(dataset), consumed_samples, micro_batch_size,
                                    data_parallel_rank, data_parallel_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collator or BatchCollator(),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
    )


def collator_for(data_cfg, tokenizer) -> BatchCollator:
    """The collator matching data.reset_attention_mask."""
    return BatchCollator(eod=tokenizer.eod, with_cu_seqlens=data_cfg.reset_attention_mask)


def cycle(loader: Iterable) -> Iterator:
    """Endless iterator (validation): restarts the loader, i.e. from its consumed_samples."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("cannot cycle an empty data loader: its dataset has fewer samples "
                             "than one micro-batch x data-parallel size")
