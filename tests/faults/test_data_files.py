"""Small or damaged indexed datasets are refused before any index is built, naming the file."""

import os

import numpy as np
import pytest

from msa_train.data import ByteTokenizer, DataConfigError, build_datasets, validate_data_config
from msa_train.data.config import DataConfig
from tests.faults.conftest import write_prefix


def _cfg(tmp_path, prefix, **kw):
    return DataConfig(source="indexed", paths=[prefix], index_cache_dir=str(tmp_path / "cache"),
                      **kw)


@pytest.mark.timeout(60)  # the old sample-index builder looped forever here
def test_small_dataset_with_default_split_fails_fast_naming_the_split(tmp_path, small_docs):
    prefix = write_prefix(tmp_path / "good", small_docs)
    cfg = _cfg(tmp_path, prefix, split="969,30,1")
    with pytest.raises(DataConfigError) as err:
        build_datasets(cfg, ByteTokenizer(), 64, 0, 40, 0)
    msg = str(err.value)
    assert "the dataset has" in msg and "'valid' needs at least 65" in msg
    assert "change data.split or add data" in msg and "data.paths[0]" in msg
    # the same data trains with a split that gives each built split enough documents
    train, valid, test = build_datasets(_cfg(tmp_path, prefix, split="100,0,0"), ByteTokenizer(),
                                        64, 0, 40, 0)
    assert len(train) >= 40 and valid is None and test is None


@pytest.mark.timeout(60)
def test_empty_split_backstop_raises_instead_of_looping(tmp_path, small_docs, monkeypatch):
    # Without the up-front check, the bounded epoch loop still refuses an empty split.
    from msa_train.data import datasets

    monkeypatch.setattr(datasets, "_check_split_sizes", lambda *a, **k: None)
    prefix = write_prefix(tmp_path / "good", small_docs)
    with pytest.raises(DataConfigError, match="holds no tokens.*change data.split"):
        build_datasets(_cfg(tmp_path, prefix, split="969,30,1"), ByteTokenizer(), 64, 0, 40, 0)


def _damage(prefix, kind):
    idx, binf = prefix + ".idx", prefix + ".bin"
    if kind == "bin_truncated":
        with open(binf, "r+b") as f:
            f.truncate(os.path.getsize(binf) - 7)
        return binf, "truncated"
    if kind == "bin_longer":
        with open(binf, "ab") as f:
            f.write(b"\0" * 4)
        return binf, "longer than its index"
    if kind == "idx_truncated":
        with open(idx, "r+b") as f:
            f.truncate(os.path.getsize(idx) - 9)
        return idx, "truncated or damaged"
    if kind == "idx_header":
        with open(idx, "r+b") as f:
            f.write(b"NOTANIDX!")
        return idx, "not a Megatron index file"
    if kind == "idx_dtype":
        with open(idx, "r+b") as f:
            f.seek(17)
            f.write(bytes([7]))  # float32 tokens
        return idx, "token dtype float32"
    if kind == "idx_unknown_dtype":
        with open(idx, "r+b") as f:
            f.seek(17)
            f.write(bytes([42]))
        return idx, "unknown code 42"
    if kind == "idx_version":
        with open(idx, "r+b") as f:
            f.seek(9)
            f.write((2).to_bytes(8, "little"))
        return idx, "index version 2"
    if kind == "idx_empty":
        open(idx, "wb").close()
        return idx, "not a Megatron index file"
    raise AssertionError(kind)


DAMAGE = ["bin_truncated", "bin_longer", "idx_truncated", "idx_header", "idx_dtype",
          "idx_unknown_dtype", "idx_version", "idx_empty"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_files_are_refused_naming_the_file(tmp_path, small_docs, kind):
    prefix = write_prefix(tmp_path / "d", small_docs)
    path, what = _damage(prefix, kind)
    size = os.path.getsize(path)
    with pytest.raises(DataConfigError) as err:
        validate_data_config(_cfg(tmp_path, prefix, split="100,0,0"))
    msg = str(err.value)
    assert path in msg and what in msg and "data.paths[0]" in msg, msg
    assert os.path.getsize(path) == size  # nothing rewritten


def test_dry_run_style_check_skips_unseen_files(tmp_path):
    # A planning host that cannot see the data still validates everything else.
    validate_data_config(_cfg(tmp_path, str(tmp_path / "absent")), check_files=False)


def test_intact_dataset_passes_and_counts_tokens(tmp_path, small_docs):
    from msa_train.data.index_check import read_index

    prefix = write_prefix(tmp_path / "ok", small_docs)
    validate_data_config(_cfg(tmp_path, prefix))
    summary = read_index(prefix, "data.paths[0]")
    assert summary.tokens == sum(len(d) + 1 for d in small_docs)
    assert summary.dtype == np.uint16
