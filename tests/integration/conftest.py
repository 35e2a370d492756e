import pytest


@pytest.fixture(scope="module")
def megatron_1rank():
    """A 1-rank gloo group + Megatron parallel state for in-process layer / model checks."""
    from msa_train.compat import destroy_parallel, init_parallel

    init_parallel({}, seed=1234)
    yield
    destroy_parallel()


@pytest.fixture(autouse=True)
def _clean_msa_state():
    """KL tracker, recall request and KL loss scale are process-global: start and leave clean."""
    from msa_train.model import kl_tracker, recall
    from msa_train.model.kl_scaler import KLAutoScaler

    def reset():
        kl_tracker.clear()
        recall._SUMS.clear()
        recall._STATE["requested"] = False
        KLAutoScaler.loss_scale = None

    reset()
    yield
    reset()
