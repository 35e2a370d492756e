import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def megatron_1rank():
    from msa_train.compat import destroy_parallel, init_parallel

    init_parallel({}, seed=1234)
    yield
    destroy_parallel()
