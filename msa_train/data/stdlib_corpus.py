"""The embedded default corpus: the running interpreter's standard library source, byte-level.

Real, long documents (a module per document) that exist on every machine with no network. Built
once into ${MSA_TRAIN_CACHE:-~/.cache/msa_train}/stdlib_corpus_<py version>_<hash>/ and reused;
the hash covers the file list, sizes and options, so another interpreter or option gets its own
directory. Safe when many ranks start at once: one process builds under an exclusive file lock
into a temporary directory that is renamed into place; the others wait on the lock and reuse it.
Even where the lock is not honoured (some network filesystems) the rename keeps it correct: a
second builder's result is simply discarded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import List, Optional

from msa_train.data.config import StdlibCorpusConfig
from msa_train.data.indexed import IndexedWriter, prefix_exists
from msa_train.data.tokenizer import ByteTokenizer, tokenizer_identity

logger = logging.getLogger(__name__)

# Bump when the on-disk layout or the document definition changes.
FORMAT_VERSION = 2
PREFIX_NAME = "stdlib_text_document"
META_NAME = "corpus.json"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass
class StdlibCorpus:
    directory: str
    prefix: str  # indexed-dataset prefix (<prefix>.bin / .idx)
    documents: int
    tokens: int
    built: bool  # True when this call built it, False when reused

    def line(self) -> str:
        verb = "built" if self.built else "reused"
        return (f"stdlib corpus {verb}: {self.documents:,} documents, {self.tokens:,} byte tokens "
                f"at {self.directory}")


def default_cache_root() -> str:
    return os.environ.get("MSA_TRAIN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "msa_train")


def stdlib_source_files(include_tests: bool = False, max_files: Optional[int] = None,
                        root: Optional[str] = None) -> List[str]:
    """*.py files of the standard library, sorted by relative path (deterministic)."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_parts = os.path.relpath(dirpath, root).split(os.sep)
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith(".")
                       and (include_tests or d not in _TEST_DIRS)]
        if not include_tests and _TEST_DIRS.intersection(rel_parts):
            continue
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: os.path.relpath(p, root))
    if max_files is not None:
        files = files[:max_files]
    if not files:
        raise RuntimeError(
            f"no *.py files under the standard library at {root!r}; this interpreter ships no "
            f"library sources, so use data.source=indexed with prepared data instead")
    return files


def _fingerprint(files: List[str], root: str, cfg: StdlibCorpusConfig) -> str:
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION} tests={cfg.include_tests} max={cfg.max_files}\n".encode())
    for path in files:
        h.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:12]


def _build(directory: str, files: List[str]) -> dict:
    tokenizer = ByteTokenizer()
    tmp = f"{directory}.tmp-{os.getpid()}-{time.time_ns()}"
    os.makedirs(tmp)
    try:
        t0 = time.time()
        with IndexedWriter(os.path.join(tmp, PREFIX_NAME), tokenizer.vocab_size, tokenizer.eod,
                           tokenizer_identity(tokenizer)) as writer:
            for path in files:
                with open(path, "rb") as f:
                    data = f.read()
                writer.add(tokenizer.tokenize_bytes(data), len(data))
            summary = writer.finalize()
        meta = {
            "format_version": FORMAT_VERSION,
            "python": sys.version.split()[0],
            "stdlib": sysconfig.get_paths()["stdlib"],
            "tokenizer": repr(tokenizer),
            "documents": summary.documents,
            "tokens": summary.tokens,
            "skipped_empty": summary.skipped_empty,
            "build_seconds": round(time.time() - t0, 3),
        }
        # The marker is written last inside tmp; the rename publishes everything at once.
        with open(os.path.join(tmp, META_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not _is_complete(directory):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; theirs is equal
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_complete(directory: str) -> bool:
    return (os.path.isfile(os.path.join(directory, META_NAME))
            and prefix_exists(os.path.join(directory, PREFIX_NAME)))


def _load_meta(directory: str) -> dict:
    with open(os.path.join(directory, META_NAME)) as f:
        return json.load(f)


def ensure_stdlib_corpus(cfg: Optional[StdlibCorpusConfig] = None) -> StdlibCorpus:
    """Return the cached corpus, building it first if needed (any number of processes at once)."""
    cfg = cfg or StdlibCorpusConfig()
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_source_files(cfg.include_tests, cfg.max_files, root)
    version = "{}.{}".format(*sys.version_info[:2])
    cache_root = os.path.abspath(os.path.expanduser(cfg.cache_dir or default_cache_root()))
    directory = os.path.join(cache_root,
                             f"stdlib_corpus_{version}_{_fingerprint(files, root, cfg)}")
    built = False
    if not _is_complete(directory):
        os.makedirs(cache_root, exist_ok=True)
        with open(directory + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # others block here while one builds
            try:
                if not _is_complete(directory):
                    if os.path.exists(directory):  # a broken leftover (e.g. copied by hand)
                        shutil.rmtree(directory)
                    meta = _build(directory, files)
                    built = True
                    logger.info("built stdlib corpus in %.1fs", meta["build_seconds"])
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    meta = _load_meta(directory)
    return StdlibCorpus(directory=directory, prefix=os.path.join(directory, PREFIX_NAME),
                        documents=meta["documents"], tokens=meta["tokens"], built=built)
