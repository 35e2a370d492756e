import importlib.util
import json
import os

import pytest

from .conftest import read_docs
from msa_train.data.prepare import PrepareDataError, prepare_indexed_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "prepare_data_cli", os.path.join(ROOT, "tools", "prepare_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / ".hidden").mkdir()
    files = {
        "b.txt": "second file\n",
        "a.txt": "first file, é\n",
        "pkg/c.py": "print('third')\n",
        "pkg/empty.txt": "",
        ".hidden/x.txt": "never read",
    }
    for name, text in files.items():
        (src / name).write_text(text, encoding="utf-8")
    return src


def test_text_directory_round_trip(tmp_path):
    src = _tree(tmp_path)
    out = str(tmp_path / "out" / "corpus")
    summary = prepare_indexed_dataset([str(src)], out, progress=False)
    docs = read_docs(out)
    # sorted walk, hidden entries skipped, empty file skipped, one EOD after each document
    expected = ["first file, é\n", "second file\n", "print('third')\n"]
    assert docs == [list(t.encode()) + [256] for t in expected]
    assert (summary.documents, summary.skipped_empty) == (3, 1)
    assert summary.tokens == sum(len(t.encode()) + 1 for t in expected)
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]
    meta = json.load(open(out + ".meta.json"))
    assert meta["tokenizer"] == {"type": "byte", "vocab_size": 257, "eod": 256}
    assert meta["documents"] == 3


def test_pattern_filters_directory_files(tmp_path):
    src = _tree(tmp_path)
    out = str(tmp_path / "py")
    prepare_indexed_dataset([str(src)], out, pattern="*.py", progress=False)
    assert read_docs(out) == [list(b"print('third')\n") + [256]]


def test_jsonl_round_trip_and_workers_give_identical_files(tmp_path):
    records = [{"text": f"doc {i} " * (i + 1), "id": i} for i in range(30)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    prepare_indexed_dataset([str(path)], one, json_key="text", progress=False)
    prepare_indexed_dataset([str(path)], two, json_key="text", workers=2, progress=False)
    assert read_docs(one) == [list(r["text"].encode()) + [256] for r in records]
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(two + ext, "rb").read()


def test_bad_inputs_raise_clear_errors(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(PrepareDataError, match="--input .* does not exist"):
        prepare_indexed_dataset([str(tmp_path / "missing")], out, progress=False)
    bad_key = tmp_path / "k.jsonl"
    bad_key.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(PrepareDataError, match=r"no key 'text' \(found \['content'\]\).*--json-key"):
        prepare_indexed_dataset([str(bad_key)], out, progress=False)
    bad_json = tmp_path / "j.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(PrepareDataError, match=r"j.jsonl:2 is not valid JSON"):
        prepare_indexed_dataset([str(bad_json)], out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare_indexed_dataset([str(empty)], out, progress=False)
    with pytest.raises(PrepareDataError, match="--output-prefix"):
        prepare_indexed_dataset([str(empty)], out + ".bin", progress=False)
    # failed runs leave neither outputs nor temporary files behind
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_cli_summary_and_error_exit_code(tmp_path, capsys):
    cli = _load_cli()
    src = _tree(tmp_path)
    assert cli.main(["--input", str(src / "a.txt"), str(src / "b.txt"), "--output-prefix",
                     str(tmp_path / "cli"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "tokens" in out
    assert cli.main(["--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "x"),
                     "--no-progress"]) == 2
    assert "--input" in capsys.readouterr().err


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path):
    from msa_train.data.indexed import IndexedWriter

    with pytest.raises(ValueError, match="vocab_size=257"):
        with IndexedWriter(str(tmp_path / "w"), 257, 256) as w:
            w.add([1, 2, 300])
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="needs `tokenizers`")
def test_huggingface_tokenizer_json_with_workers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from msa_train.data import TokenizerConfig

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "alpha": 2, "beta": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_path = str(tmp_path / "tokenizer.json")
    raw.save(tok_path)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in ["alpha beta", "beta gamma", "alpha"]))
    out = str(tmp_path / "hf")
    summary = prepare_indexed_dataset([str(data)], out,
                                      TokenizerConfig(type="huggingface", name_or_path=tok_path),
                                      json_key="body", workers=2, progress=False)
    assert read_docs(out) == [[2, 3, 0], [3, 1, 0], [2, 0]]
    assert summary.tokens == 8
