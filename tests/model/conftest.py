import pytest


@pytest.fixture(scope="module")
def megatron_1rank():
    """A 1-rank gloo group + Megatron parallel state for in-process model tests."""
    from msa_train.compat import destroy_parallel, init_parallel

    init_parallel({}, seed=1234)
    yield
    destroy_parallel()


def tiny_cfgs(moe: bool = True, **attn_overrides):
    from msa_train.model import AttentionConfig, ModelConfig

    model = ModelConfig(
        name="t", num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, vocab_size=64, rotary_percent=0.5,
        num_moe_experts=4 if moe else None, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_first_k_dense=1,
    )
    attn = dict(block_size=4, topk=2, index_dim=8, dense_first_layers=1, kl_coeff=0.5)
    attn.update(attn_overrides)
    return model, AttentionConfig(**attn)
