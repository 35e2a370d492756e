import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from .conftest import write_prefix
from msa_train.data import (ByteTokenizer, DataConfig, DataConfigError, TokenizerConfig,
                            build_datasets, validate_data_config)

SEQ = 32


def _stream_contains(stream, window):
    """True if `window` is a contiguous slice of `stream`."""
    n = len(window)
    starts = np.flatnonzero(stream[: len(stream) - n + 1] == window[0])
    return any(np.array_equal(stream[s:s + n], window) for s in starts)


def test_windows_are_shifted_slices_of_the_document_stream(tmp_path, numbered_docs,
                                                            data_cfg_factory):
    prefix = write_prefix(tmp_path / "d", numbered_docs)
    cfg = data_cfg_factory(source="indexed", paths=[prefix], split="90,10,0")
    train, valid, test = build_datasets(cfg, ByteTokenizer(), SEQ, seed=7,
                                        num_train_samples=50, num_valid_samples=5)
    assert test is None and len(train) >= 50 and len(valid) >= 5
    # any window must be a contiguous slice of the shuffled concatenation, EODs included
    stream = np.asarray(sum(([*d, 256] for d in numbered_docs), []))
    for i in range(0, 50, 7):
        s = train[i]
        assert s["tokens"].shape == (SEQ,) and s["labels"].shape == (SEQ,)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert torch.all(s["loss_mask"] == 1)
        window = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()
        parts = np.split(window, np.flatnonzero(window == 256) + 1)
        for part in parts:  # each piece between EODs comes from one document
            if len(part):
                assert _stream_contains(stream, part)
    # windows span documents: at least one sample holds an EOD that is not its last token
    assert any((train[i]["tokens"][:-1] == 256).any() for i in range(50))


def test_same_seed_same_samples_other_seed_differs(tmp_path, numbered_docs, data_cfg_factory):
    prefix = write_prefix(tmp_path / "d", numbered_docs)
    cfg = data_cfg_factory(source="indexed", paths=[prefix], split="1,0,0")
    a, _, _ = build_datasets(cfg, ByteTokenizer(), SEQ, 1, 40, 0)
    b, _, _ = build_datasets(cfg, ByteTokenizer(), SEQ, 1, 40, 0)  # served from the index cache
    c, _, _ = build_datasets(cfg, ByteTokenizer(), SEQ, 2, 40, 0)
    ta = torch.stack([a[i]["tokens"] for i in range(40)])
    assert torch.equal(ta, torch.stack([b[i]["tokens"] for i in range(40)]))
    assert not torch.equal(ta, torch.stack([c[i]["tokens"] for i in range(40)]))
    assert (tmp_path / "d" / "cache").is_dir()  # Megatron's index cache lives next to the data


def test_eod_switches_reset_positions_and_mask_loss(tmp_path, data_cfg_factory):
    prefix = write_prefix(tmp_path / "d", [[5] * 10, [6] * 10, [7] * 10, [8] * 40])
    cfg = data_cfg_factory(source="indexed", paths=[prefix], split="1,0,0",
                           reset_position_ids=True, eod_mask_loss=True)
    train, _, _ = build_datasets(cfg, ByteTokenizer(), SEQ, 3, 2, 0)
    for i in range(len(train)):
        s = train[i]
        eods = torch.nonzero(s["tokens"] == 256).flatten().tolist()
        # positions restart after each EOD, the EOD target positions carry no loss
        start = 0
        for e in eods + [SEQ]:
            seg = s["position_ids"][start:e + 1] if e < SEQ else s["position_ids"][start:]
            assert torch.equal(seg, torch.arange(len(seg)))
            start = e + 1
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == 256)


def test_reset_attention_mask_batches_carry_document_boundaries(tmp_path, data_cfg_factory):
    from msa_train.data import build_data_loader, collator_for

    prefix = write_prefix(tmp_path / "d", [[5] * 10, [6] * 13, [7] * 9, [8] * 40])
    cfg = data_cfg_factory(source="indexed", paths=[prefix], split="1,0,0",
                           reset_attention_mask=True)
    tok = ByteTokenizer()
    train, _, _ = build_datasets(cfg, tok, SEQ, 3, 2, 0)
    batch = next(iter(build_data_loader(train, 0, 2, collator=collator_for(cfg, tok))))
    assert batch["attention_mask"] is None
    cu = batch["cu_seqlens"].tolist()
    flat = batch["tokens"].flatten()
    assert cu[0] == 0 and cu[-1] == flat.numel() and SEQ in cu
    for a, b in zip(cu[:-1], cu[1:]):  # no document continues past an EOD inside a fragment
        assert not (flat[a:b - 1] == 256).any()


def test_weighted_blend_follows_weights(tmp_path, data_cfg_factory):
    a = write_prefix(tmp_path / "a", [[ord("a")] * (20 + k) for k in range(60)])
    b = write_prefix(tmp_path / "b", [[ord("b")] * (20 + k) for k in range(60)])
    cfg = data_cfg_factory(source="indexed", paths=[a, b], weights=[3.0, 1.0], split="1,0,0")
    train, _, _ = build_datasets(cfg, ByteTokenizer(), 16, 0, 200, 0)
    assert len(train) == 200
    ids = np.array([int(train[i]["dataset_id"]) for i in range(200)])
    assert ids.tolist().count(0) == 150
    for i in range(0, 200, 9):  # every sample really comes from the dataset it claims
        letters = set(train[i]["tokens"].tolist()) - {256}
        assert letters == {ord("ab"[ids[i]])}


def test_separate_validation_blend(tmp_path, data_cfg_factory):
    a = write_prefix(tmp_path / "a", [[ord("a")] * 30 for _ in range(20)])
    v = write_prefix(tmp_path / "v", [[ord("v")] * 30 for _ in range(20)])
    cfg = data_cfg_factory(source="indexed", paths=[a], valid_paths=[v])
    train, valid, test = build_datasets(cfg, ByteTokenizer(), 16, 0, 10, 4)
    assert test is None
    assert set(train[0]["tokens"].tolist()) <= {ord("a"), 256}
    assert set(valid[0]["tokens"].tolist()) <= {ord("v"), 256}


def test_stdlib_source_and_mock(data_cfg_factory):
    cfg = data_cfg_factory()  # the embedded default
    cfg.stdlib.max_files = 30
    train, valid, _ = build_datasets(cfg, ByteTokenizer(), 256, 0, 20, 2)
    text = "".join(ByteTokenizer().detokenize(train[i]["tokens"].tolist()) for i in range(8))
    assert len(train) >= 20 and len(valid) >= 2
    assert "import " in text or "def " in text  # it is Python source
    mock, _, _ = build_datasets(data_cfg_factory(source="mock"), ByteTokenizer(), 64, 0, 8, 1)
    assert mock[0]["tokens"].shape == (64,) and int(mock[0]["tokens"].max()) <= 256


def test_config_errors_name_the_field(tmp_path, data_cfg_factory):
    tok = ByteTokenizer()
    cases = [
        (dict(source="indexed"), "data.paths is empty"),
        (dict(source="indexed", paths=[str(tmp_path / "nope")]), r"data.paths\[0\]=.*not found"),
        (dict(source="indexed", paths=[str(tmp_path / "nope.bin")]), "without the extension"),
        (dict(source="stdlib", paths=["x"]), "data.source=indexed"),
        (dict(source="web"), "data.source='web'"),
        (dict(split="a,b"), "data.split"),
        (dict(split="0,0,0"), "data.split"),
        (dict(valid_paths=[str(tmp_path / "v")]), r"data.valid_paths\[0\]=.*not found"),
        (dict(source="mock", valid_paths=["x"]), "clear data.valid_paths"),
    ]
    for kw, pattern in cases:
        with pytest.raises(DataConfigError, match=pattern):
            build_datasets(data_cfg_factory(**kw), tok, 16, 0, 1, 0)
    p = write_prefix(tmp_path / "p", [[1, 2, 3]] * 5)
    with pytest.raises(DataConfigError, match="data.weights has 1 entries but data.paths has 2"):
        validate_data_config(data_cfg_factory(source="indexed", paths=[p, p], weights=[1.0]))
    with pytest.raises(DataConfigError, match="num_train_samples"):
        build_datasets(data_cfg_factory(source="indexed", paths=[p]), tok, 16, 0, -1, 0)


@pytest.mark.parametrize("name", ["stdlib", "indexed", "mock"])
def test_yaml_configs_match_the_schema(name):
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    loaded = OmegaConf.load(os.path.join(root, "configs", "data", f"{name}.yaml"))
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), loaded)  # unknown keys would raise
    assert cfg.source == name
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, DataConfig)
    if name == "indexed":  # paths are required: validation fails before any compute
        with pytest.raises(DataConfigError, match="data.paths is empty"):
            validate_data_config(cfg)
    else:
        validate_data_config(cfg)


def test_unwritable_index_cache_names_the_field(tmp_path, numbered_docs, data_cfg_factory):
    import os

    prefix = write_prefix(tmp_path / "d", numbered_docs)
    # a plain file where Megatron's default cache directory (<prefix>/cache) must go
    open(prefix, "w").close()
    cfg = data_cfg_factory(source="indexed", paths=[prefix], split="1,0,0")
    with pytest.raises(DataConfigError, match="data.index_cache_dir"):
        build_datasets(cfg, ByteTokenizer(), SEQ, 0, 4, 0)
    cfg.index_cache_dir = str(tmp_path / "idx")
    train, _, _ = build_datasets(cfg, ByteTokenizer(), SEQ, 0, 4, 0)
    assert len(train) >= 4 and os.listdir(tmp_path / "idx")


def test_data_prepared_with_another_tokenizer_is_refused(tmp_path, data_cfg_factory):
    from msa_train.data.indexed import IndexedWriter

    with IndexedWriter(str(tmp_path / "hf"), 50_000, 0,
                       {"type": "huggingface", "name_or_path": "x", "vocab_size": 50_000,
                        "eod": 0}) as w:
        for _ in range(10):
            w.add([5, 6, 7, 40_000])
    cfg = data_cfg_factory(source="indexed", paths=[str(tmp_path / "hf")])
    with pytest.raises(DataConfigError, match=r"data.paths\[0\]=.*huggingface tokenizer"):
        validate_data_config(cfg)
    with IndexedWriter(str(tmp_path / "b"), 300, 299) as w:  # same type, other vocabulary
        w.add([1, 2, 3])
    cfg = data_cfg_factory(source="indexed", paths=[str(tmp_path / "b")])
    with pytest.raises(DataConfigError, match="vocab_size=300 but data.tokenizer gives"):
        build_datasets(cfg, ByteTokenizer(), 4, 0, 1, 0)
    with pytest.raises(DataConfigError, match="data.source=stdlib is tokenized byte-level"):
        validate_data_config(DataConfig(tokenizer=TokenizerConfig("huggingface", "x")))
