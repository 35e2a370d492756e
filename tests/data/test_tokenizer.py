import importlib.util

import pytest

from msa_train.data import (ByteTokenizer, DataConfigError, TokenizerConfig, build_tokenizer,
                            padded_vocab_size)


def test_byte_tokenizer_round_trip_and_ids():
    tok = build_tokenizer(TokenizerConfig())
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod) == (257, 256)
    text = "def f(x):\n    return 'héllo ∑ 🙂'\n"
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert max(ids) < 256
    assert tok.detokenize(ids + [tok.eod]) == text  # EOD is not text


def test_byte_tokenizer_is_lossless_on_invalid_utf8():
    raw = b"ok \xff\xfe broken"
    tok = ByteTokenizer()
    text = raw.decode("utf-8", errors="surrogateescape")
    assert bytes(tok.tokenize(text)) == raw
    assert tok.tokenize_bytes(raw).tolist() == list(raw)


def test_padded_vocab_size():
    assert padded_vocab_size(257) == 384
    assert padded_vocab_size(257, 128, tensor_parallel_size=4) == 512
    assert padded_vocab_size(256, 128) == 256
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        padded_vocab_size(257, 128, 0)


def test_tokenizer_config_errors_name_the_field():
    with pytest.raises(DataConfigError, match="data.tokenizer.name_or_path"):
        build_tokenizer(TokenizerConfig(type="huggingface"))
    with pytest.raises(DataConfigError, match="data.tokenizer.type"):
        build_tokenizer(TokenizerConfig(type="bpe"))
    with pytest.raises(DataConfigError, match="data.tokenizer.type=huggingface"):
        build_tokenizer(TokenizerConfig(type="byte", name_or_path="gpt2"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None,
                    reason="transformers is installed")
def test_huggingface_without_transformers_says_what_to_install():
    with pytest.raises(DataConfigError, match="pip install transformers"):
        build_tokenizer(TokenizerConfig(type="huggingface", name_or_path="gpt2"))


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="needs `tokenizers`")
def test_huggingface_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "[UNK]": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    tok = build_tokenizer(TokenizerConfig(type="huggingface", name_or_path=str(path)))
    assert (tok.vocab_size, tok.eod) == (4, 0)
    assert tok.tokenize("a b a") == [1, 2, 1]
