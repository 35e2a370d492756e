"""Per-file sizes and checksums of a checkpoint iteration, written last and verified on load.

    <save>/iter_0000100/msa_train_manifest.json
        {"algorithm": "xxh3_128", "files": {"__0_0.distcp": {"size": ..., "digest": ...}, ...}}

A flipped or truncated shard used to load silently (or fail deep inside torch.load). Every rank
hashes the shard files it wrote itself right after writing them (still in the page cache; the
torch_dist writer offers no hook to hash while it streams), rank 0 hashes the few small files
(metadata, common state, run config, progress), and the manifest is written before the tracker
names the iteration. Loading spreads the verification of all files over the ranks. xxh3 runs at memory
speed, so verifying costs about one read of the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import torch

MANIFEST_FILENAME = "msa_train_manifest.json"
_CHUNK = 8 << 20


def _new_hasher():
    try:
        import xxhash

        return "xxh3_128", xxhash.xxh3_128()
    except ImportError:  # declared in pyproject; sha256 keeps a stripped install working
        import hashlib

        return "sha256", hashlib.sha256()


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    import hashlib

    return hashlib.new(algorithm)


ALGORITHM = _new_hasher()[0]


def digest_bytes(data: bytes, algorithm: str = ALGORITHM) -> str:
    h = _hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def digest_file(path: str, algorithm: str = ALGORITHM) -> Dict[str, object]:
    h = _hasher(algorithm)
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            size += len(block)
            h.update(block)
    return {"size": size, "digest": h.hexdigest()}


def rank_files(directory: str, rank: int) -> List[str]:
    """Shard files torch_dist wrote for `rank` (__<rank>_<n>.distcp)."""
    pattern = re.compile(rf"^__{rank}_\d+\.distcp$")
    return sorted(n for n in os.listdir(directory) if pattern.match(n))


def _world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj):
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def collect_shard_entries(directory: str) -> Dict[str, Dict[str, object]]:
    """Collective: every rank hashes its own shards; every rank gets all entries."""
    rank, _ = _world()
    mine = {name: digest_file(os.path.join(directory, name)) for name in rank_files(directory, rank)}
    merged: Dict[str, Dict[str, object]] = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def write_manifest(directory: str, entries: Dict[str, Dict[str, object]]) -> str:
    """Rank 0: the manifest, with common.pt / metadata.json added (small, written by rank 0)."""
    from msa_train.trainer.ckpt_layout import write_atomic

    files = dict(entries)
    for name in sorted(os.listdir(directory)):
        if name in files or name == MANIFEST_FILENAME or ".tmp" in name:
            continue
        if os.path.isfile(os.path.join(directory, name)) and name not in files:
            files[name] = digest_file(os.path.join(directory, name))
    path = os.path.join(directory, MANIFEST_FILENAME)
    write_atomic(path, json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1,
                                  sort_keys=True) + "\n")
    return path


def read_manifest(directory: str) -> Optional[dict]:
    path = os.path.join(directory, MANIFEST_FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
        if not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' table")
        return data
    except (ValueError, AttributeError) as exc:
        return {"damaged": f"{path} is damaged ({exc})"}


def _check_one(directory: str, name: str, want: dict, algorithm: str) -> Optional[str]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != want.get("size"):
        return f"{path} is {size:,} bytes, the manifest says {want.get('size'):,} (truncated or replaced)"
    got = digest_file(path, algorithm)
    if got["digest"] != want.get("digest"):
        return f"{path} has {algorithm} {got['digest']}, the manifest says {want.get('digest')} (changed on disk)"
    return None


def verify(directory: str) -> Optional[List[str]]:
    """Collective. Problems found (empty: intact); None when the iteration has no manifest.

    The files are dealt round-robin over the ranks; every rank returns the same list."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    if "damaged" in manifest:
        return [manifest["damaged"]]
    rank, world = _world()
    names = sorted(manifest["files"])
    algorithm = manifest.get("algorithm", "sha256")
    mine = [p for i, n in enumerate(names) if i % world == rank
            for p in [_check_one(directory, n, manifest["files"][n], algorithm)] if p]
    problems: List[str] = []
    for part in _gather(mine):
        problems.extend(part)
    return problems
