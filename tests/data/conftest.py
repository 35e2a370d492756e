
import numpy as np
import pytest

def write_prefix(prefix, docs, vocab_size=257, eod=256):
    """Write documents (lists of ids, EOD excluded) as an indexed dataset; returns the prefix."""
    from msa_train.data.indexed import IndexedWriter

    with IndexedWriter(str(prefix), vocab_size, eod) as w:
        for d in docs:
            w.add(np.asarray(d, dtype=np.int64))
    return str(prefix)


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture
def numbered_docs():
    """40 random byte documents of varied lengths (30..126 tokens), fixed seed."""
    rng = np.random.default_rng(0)
    return [list(rng.integers(0, 256, size=30 + (7 * k) % 97)) for k in range(40)]


@pytest.fixture
def data_cfg_factory(tmp_path):
    from msa_train.data.config import DataConfig

    def make(**kw):
        cfg = DataConfig(**kw)
        cfg.stdlib.cache_dir = str(tmp_path / "cache")
        return cfg

    return make


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
