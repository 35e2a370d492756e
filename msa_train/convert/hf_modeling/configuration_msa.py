"""Configuration of MSAForCausalLM: a decoder-only transformer with MiniMax Sparse Attention (MSA)
layers, exported by msa-train (`msa-convert export-hf`)."""

from transformers import PretrainedConfig


class MSAConfig(PretrainedConfig):
    model_type = "msa"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=None,
                 max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
                 partial_rotary_factor=1.0, rms_norm_eps=1e-6, initializer_range=0.02,
                 hidden_act="silu", tie_word_embeddings=False, attention_qkv_bias=False,
                 qk_norm=False, num_experts=0, num_experts_per_tok=2, moe_intermediate_size=None,
                 norm_topk_prob=True, mlp_layer_types=None, msa_layers=None, msa_block_size=128,
                 msa_topk=16, msa_index_dim=128, msa_index_norm=False, msa_index_rope=False,
                 msa_force_sink=False, msa_local_window=0, source_family=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.partial_rotary_factor = partial_rotary_factor
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.attention_qkv_bias = attention_qkv_bias
        self.qk_norm = qk_norm
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.mlp_layer_types = mlp_layer_types or ["dense"] * num_hidden_layers
        # 0/1 per layer: 1 = MSA layer (index branch + block-sparse attention), 0 = full attention.
        self.msa_layers = msa_layers or [0] * num_hidden_layers
        self.msa_block_size = msa_block_size
        self.msa_topk = msa_topk  # blocks per query and KV group, the local block included
        self.msa_index_dim = msa_index_dim
        self.msa_index_norm = msa_index_norm
        self.msa_index_rope = msa_index_rope
        self.msa_force_sink = msa_force_sink
        self.msa_local_window = msa_local_window
        self.source_family = source_family
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
