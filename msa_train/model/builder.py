"""Build the MSA GPTModel from an MSATransformerConfig."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel

from msa_train.model import kl_tracker, recall
from msa_train.model.lm_loss import lm_loss, output_weight
from msa_train.model.specs import msa_block_spec


def _logits_deferred(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None


class MSAGPTModel(GPTModel):
    """GPTModel whose loss can skip the full logits (config.msa_lm_loss, msa_train.model.lm_loss).

    With labels and a fused loss, GPTModel's forward runs with its output projection deferred
    (it returns the final hidden states as the "logits"), then the projection and cross-entropy
    run chunked. Everything else, including the parameters and the per-token loss [b, s] it
    returns, is GPTModel's; without labels (inference, evaluation of logits) nothing changes.
    """

    def forward(self, *args, labels=None, **kwargs):
        impl = getattr(self.config, "msa_lm_loss", "megatron")
        # MTP and MuP (0.19) post-process the logits themselves: they keep GPTModel's path.
        if (labels is None or impl == "megatron" or not self.post_process
                or getattr(self, "mtp_process", False) or getattr(self.config, "use_mup", False)):
            return super().forward(*args, labels=labels, **kwargs)
        layer = self.output_layer
        # An instance attribute shadows ColumnParallelLinear.forward for this call only; GPTModel
        # calls self.output_layer(...) in every Megatron-Core version we support.
        layer.forward = _logits_deferred
        try:
            hidden_bsh = super().forward(*args, labels=None, **kwargs)
        finally:
            del layer.forward
        return lm_loss(hidden_bsh.transpose(0, 1), output_weight(self), labels, impl,
                       tp_group=getattr(layer, "tp_group", None),
                       sequence_parallel=bool(layer.sequence_parallel))


def build_model(
    config,
    vocab_size: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
) -> "MSAGPTModel":
    """GPTModel with MSA attention. vocab_size / max_seq_len default to the config's values
    (gpt_vocab_size / gpt_max_position_embeddings); pass the tokenizer's padded vocab size."""
    from msa_train.compat import apply

    apply()
    if not hasattr(config, "msa_layer_map"):
        raise TypeError("build_model needs an MSATransformerConfig (build_transformer_config)")
    vocab = int(vocab_size if vocab_size is not None else config.gpt_vocab_size)
    max_len = int(max_seq_len if max_seq_len is not None else config.gpt_max_position_embeddings)
    kl_tracker.set_num_layers(config.num_layers)
    recall.set_num_layers(config.num_layers)
    return MSAGPTModel(
        config=config,
        transformer_layer_spec=msa_block_spec(config, vp_stage=vp_stage),
        vocab_size=vocab,
        max_sequence_length=max_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.gpt_share_embeddings,
        position_embedding_type=config.gpt_position_embedding_type,
        rotary_percent=config.gpt_rotary_percent,
        rotary_base=config.gpt_rotary_base,
        **_rope_scaling_kwargs(config),
        vp_stage=vp_stage,
    )


def _rope_scaling_kwargs(config) -> dict:
    """GPTModel's RoPE scaling arguments for config.gpt_rope_scaling (None, llama3, linear)."""
    kind = getattr(config, "gpt_rope_scaling", None)
    factor = float(getattr(config, "gpt_rope_scaling_factor", 1.0))
    if kind == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": factor}
    if kind == "linear":
        return {"seq_len_interpolation_factor": factor}
    return {}
