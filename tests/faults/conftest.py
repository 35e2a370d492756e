import numpy as np
import pytest

from tests.data.conftest import write_prefix  # noqa: F401  (shared by the fault tests)


@pytest.fixture
def small_docs():
    """15 documents of 40..180 byte tokens, fixed seed: too few for a 3-way split."""
    rng = np.random.default_rng(20)
    return [list(rng.integers(0, 256, size=40 + 10 * k)) for k in range(15)]
