"""The cpt_from_hf hook on a composed config (in process): the saved tokenizer is used and must fit
the checkpoint's vocabulary, whose rows the padded embedding keeps exactly."""

import os

import pytest
from hydra import compose, initialize_config_dir

from msa_train.convert.cpt import CPTConfigError, apply_converted_model
from msa_train.convert.importer import import_hf
from msa_train.data import build_tokenizer, padded_vocab_size
from tests.convert.helpers import attention_file, make_hf_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _save_tokenizer(directory: str, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>").save_pretrained(directory)


def _compose(init_from, *overrides):
    from msa_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=["experiment=cpt_from_hf", f"checkpoint.init_from={init_from}",
                                            "data.paths=[/nonexistent/prefix]", *overrides])


@pytest.mark.parametrize("tokens,tp", [(90, 1), (97, 2)])
def test_saved_tokenizer_is_used_and_rows_kept(tmp_path, megatron_1rank, tokens, tp):
    _, hf_dir = make_hf_model(tmp_path, "llama", vocab_size=98)
    _save_tokenizer(hf_dir, tokens)
    out = str(tmp_path / "conv")
    manifest = import_hf(hf_dir, out, attention=attention_file(tmp_path), dtype="fp32", progress=False)
    assert manifest["tokenizer"] == "tokenizer"
    cfg = _compose(out, f"parallel.tp={tp}")
    apply_converted_model(cfg)
    assert cfg.model.hidden_size == 40 and cfg.model.vocab_size == 98
    assert cfg.attention.block_size == 4 and cfg.attention.index_dim == 8  # the import's layout
    assert cfg.data.tokenizer.type == "huggingface"
    assert cfg.data.tokenizer.name_or_path == os.path.join(out, "tokenizer")
    tok = build_tokenizer(cfg.data.tokenizer)
    assert tok.vocab_size == tokens
    assert padded_vocab_size(tok.vocab_size, cfg.data.tokenizer.make_vocab_size_divisible_by, tp) == 98


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, megatron_1rank):
    # No tokenizer saved; the data's byte-level tokenizer has 257 ids, the model 97 rows.
    _, hf_dir = make_hf_model(tmp_path, "llama")
    out = str(tmp_path / "conv")
    import_hf(hf_dir, out, attention=attention_file(tmp_path), dtype="fp32", progress=False)
    cfg = _compose(out, "data=stdlib")
    with pytest.raises(CPTConfigError, match="has 257 tokens but .* has 97 embedding rows"):
        apply_converted_model(cfg)
