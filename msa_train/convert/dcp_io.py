"""Stream tensors into and out of Megatron torch_dist checkpoints, one tensor at a time.

A torch_dist checkpoint is a torch.distributed.checkpoint (DCP) directory whose keys are
Megatron's sharded-tensor keys (global shapes, independent of the TP/PP/EP layout that wrote it),
plus Megatron's metadata.json and common.pt. Writing goes through DCP's own writer with a planner
that produces each tensor only when the writer asks for it, and one file per tensor so the writer
never holds more than the tensor it is writing; reading asks DCP for one key at a time. Peak memory
is therefore one converted tensor plus the source tensors it is made of.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

Producer = Callable[[], torch.Tensor]


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from meta tensors (shape and dtype only) and materialises each tensor on demand."""

    def __init__(self, producers: Dict[str, Producer], on_write: Optional[Callable[[str], None]]):
        super().__init__()
        self._producers = producers
        self._on_write = on_write

    def resolve_data(self, write_item):
        key = write_item.index.fqn
        spec = self.lookup_object(write_item.index)  # the meta tensor: expected shape / dtype
        tensor = self._producers[key]()
        if tuple(tensor.shape) != tuple(spec.shape):
            raise ValueError(f"{key}: produced shape {tuple(tensor.shape)}, expected {tuple(spec.shape)}")
        tensor = tensor.to(spec.dtype).contiguous()
        if self._on_write is not None:
            self._on_write(key)
        return tensor


def write_checkpoint(directory: str, specs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
                     producers: Dict[str, Producer], common: Optional[dict] = None,
                     on_write: Optional[Callable[[str], None]] = None) -> None:
    """Write a torch_dist checkpoint with the tensors `specs` ({key: (shape, dtype)}), each made
    by `producers[key]()` when its turn comes."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import FileSystemWriter

    os.makedirs(directory, exist_ok=True)
    state = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in specs.items()}
    # single_file_per_rank=False: one file per tensor; DCP's writer keeps every tensor of a file
    # referenced until the file is closed.
    writer = FileSystemWriter(directory, single_file_per_rank=False, thread_count=1,
                              sync_files=False)
    dcp.save(state, storage_writer=writer, planner=_LazySavePlanner(producers, on_write),
             no_dist=True)
    torch.save(common or {}, os.path.join(directory, "common.pt"))
    # Written last, as Megatron does: its presence marks a complete checkpoint.
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), directory)


class CheckpointReader:
    """Read single tensors (global, any saving layout) from a torch_dist checkpoint."""

    def __init__(self, directory: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = directory
        self._reader_cls = FileSystemReader
        metadata = FileSystemReader(directory).read_metadata()
        self.tensors = {key: md for key, md in metadata.state_dict_metadata.items()
                        if isinstance(md, TensorStorageMetadata)}

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def load(self, key: str) -> torch.Tensor:
        md = self.tensors[key]
        out = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        dcp.load(out, storage_reader=self._reader_cls(self.directory), no_dist=True)
        return out[key]
