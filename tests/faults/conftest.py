import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")


def pytest_configure(config):
    config.addinivalue_line("filterwarnings",
                            "ignore:Transformer Engine and Apex are not installed:UserWarning")


def write_prefix(prefix, docs, vocab_size=257, eod=256):
    """Documents (lists of ids, EOD excluded) as an indexed dataset; returns the prefix."""
    from msa_train.data.indexed import IndexedWriter

    with IndexedWriter(str(prefix), vocab_size, eod) as w:
        for d in docs:
            w.add(np.asarray(d, dtype=np.int64))
    return str(prefix)


@pytest.fixture
def small_docs():
    """15 documents of 40..180 byte tokens, fixed seed: too few for a 3-way split."""
    rng = np.random.default_rng(20)
    return [list(rng.integers(0, 256, size=40 + 10 * k)) for k in range(15)]
