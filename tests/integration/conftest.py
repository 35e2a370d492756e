import sys

import pytest


@pytest.fixture(scope="module")
def megatron_1rank():
    """A 1-rank gloo group + Megatron parallel state for in-process layer / model checks."""
    from msa_train.compat import destroy_parallel, init_parallel

    init_parallel({}, seed=1234)
    yield
    destroy_parallel()


def _reset_msa_state() -> None:
    # Only modules already imported can hold state; importing them here would pull in
    # Megatron-Core, which the GPU-only tests do not need.
    tracker = sys.modules.get("msa_train.model.kl_tracker")
    if tracker is not None:
        tracker.clear()
    recall = sys.modules.get("msa_train.model.recall")
    if recall is not None:
        recall._SUMS.clear()
        recall._STATE["requested"] = False
    scaler = sys.modules.get("msa_train.model.kl_scaler")
    if scaler is not None:
        scaler.KLAutoScaler.loss_scale = None


@pytest.fixture(autouse=True)
def _clean_msa_state():
    """KL tracker, recall request and KL loss scale are process-global: start and leave clean."""
    _reset_msa_state()
    yield
    _reset_msa_state()
