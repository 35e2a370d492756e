"""Text / jsonl files -> Megatron indexed dataset; the engine behind tools/prepare_data.py.

One document per text file, or per line of a .jsonl file (the string under `json_key`). Inputs
are expanded in a deterministic order (directories walked sorted), so the same inputs always give
byte-identical outputs, with or without worker processes.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing as mp
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from msa_train.data.config import TokenizerConfig
from msa_train.data.indexed import IndexedWriter, WriteSummary
from msa_train.data.tokenizer import ByteTokenizer, build_tokenizer, tokenizer_identity

JSONL_SUFFIXES = (".jsonl", ".ndjson")
INPUT_FORMATS = ("auto", "text", "jsonl")


class PrepareDataError(ValueError):
    """Bad input to prepare_data; the message names the option (--input, --json-key ...)."""


def expand_inputs(inputs: Sequence[str], pattern: Optional[str] = None) -> List[str]:
    """Files as given, directories walked recursively in sorted order (hidden entries skipped).

    `pattern` is a comma-separated list of globs matched against file names inside directories
    (e.g. "*.py,*.md"); files named explicitly are always taken.
    """
    if not inputs:
        raise PrepareDataError("no --input given: pass text/jsonl files or directories")
    globs = [g.strip() for g in (pattern or "*").split(",") if g.strip()]
    files: List[str] = []
    for path in inputs:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and any(fnmatch.fnmatch(name, g) for g in globs):
                        files.append(os.path.join(root, name))
        else:
            raise PrepareDataError(f"--input {path!r} does not exist (neither a file nor a directory)")
    if not files:
        raise PrepareDataError(
            f"--input {list(inputs)} holds no files matching --pattern {pattern or '*'!r}")
    return files


def _is_jsonl(path: str, input_format: str) -> bool:
    if input_format == "auto":
        return path.endswith(JSONL_SUFFIXES)
    return input_format == "jsonl"


def iter_documents(files: Sequence[str], json_key: str = "text",
                   input_format: str = "auto") -> Iterator[Tuple[str, int]]:
    """Yields (text, n_input_bytes) per document, in order."""
    if input_format not in INPUT_FORMATS:
        raise PrepareDataError(f"--input-format {input_format!r} must be one of {list(INPUT_FORMATS)}")
    for path in files:
        if not _is_jsonl(path, input_format):
            with open(path, "rb") as f:
                data = f.read()
            yield data.decode("utf-8", errors="surrogateescape"), len(data)
            continue
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise PrepareDataError(
                        f"{path}:{lineno} is not valid JSON ({err.msg}); jsonl inputs need one JSON "
                        f"object per line, or pass --input-format text to read the file as text"
                    ) from err
                if not isinstance(record, dict) or json_key not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise PrepareDataError(
                        f"{path}:{lineno} has no key {json_key!r} (found {keys}); "
                        f"set --json-key to the field holding the text")
                text = record[json_key]
                if not isinstance(text, str):
                    raise PrepareDataError(
                        f"{path}:{lineno}: --json-key {json_key!r} holds a "
                        f"{type(text).__name__}, not a string")
                yield text, len(raw)


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_cfg: dict) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(TokenizerConfig(**tokenizer_cfg))


def _encode(tokenizer, item: Tuple[str, int]) -> Tuple[np.ndarray, int]:
    text, nbytes = item
    if isinstance(tokenizer, ByteTokenizer):
        ids = tokenizer.tokenize_bytes(text.encode("utf-8", errors="surrogateescape"))
    else:
        ids = np.asarray(tokenizer.tokenize(text), dtype=np.int64)
    return ids, nbytes


def _encode_in_worker(item: Tuple[str, int]) -> Tuple[np.ndarray, int]:
    return _encode(_WORKER_TOKENIZER, item)


def prepare_indexed_dataset(inputs: Sequence[str], output_prefix: str,
                            tokenizer_cfg: Optional[TokenizerConfig] = None, *,
                            json_key: str = "text", pattern: Optional[str] = None,
                            input_format: str = "auto", workers: int = 1,
                            progress: bool = True) -> WriteSummary:
    """Tokenize every document of `inputs` into <output_prefix>.bin/.idx (EOD after each)."""
    tokenizer_cfg = tokenizer_cfg or TokenizerConfig()
    tokenizer = build_tokenizer(tokenizer_cfg)
    if workers < 1:
        raise PrepareDataError(f"--workers {workers} must be >= 1")
    if not output_prefix or output_prefix.endswith(("/", ".bin", ".idx")):
        raise PrepareDataError(
            f"--output-prefix {output_prefix!r} must be a path prefix without .bin/.idx, "
            f"e.g. data/corpus_text_document")
    files = expand_inputs(inputs, pattern)
    total_bytes = sum(os.path.getsize(f) for f in files)
    docs = iter_documents(files, json_key, input_format)

    from tqdm import tqdm

    writer = IndexedWriter(output_prefix, tokenizer.vocab_size, tokenizer.eod,
                           tokenizer_identity(tokenizer))
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare_data",
               disable=not progress, dynamic_ncols=True)
    pool = None
    try:
        with writer:
            if workers > 1:
                # plain fields: works for the dataclass and for an OmegaConf node alike
                tok_fields = {k: getattr(tokenizer_cfg, k) for k in
                              ("type", "name_or_path", "make_vocab_size_divisible_by")}
                pool = mp.get_context("spawn").Pool(workers, _init_worker, (tok_fields,))
                # imap keeps input order: the output does not depend on the number of workers.
                encoded = pool.imap(_encode_in_worker, docs, chunksize=16)
            else:
                encoded = (_encode(tokenizer, d) for d in docs)
            for ids, nbytes in encoded:
                writer.add(ids, nbytes)
                bar.update(nbytes)
                if writer.summary.documents % 256 == 0:
                    bar.set_postfix(docs=writer.summary.documents, tokens=writer.summary.tokens)
            summary = writer.finalize()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return summary
