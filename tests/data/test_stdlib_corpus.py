import multiprocessing as mp
import os
import sys
import time


from .conftest import read_docs
from msa_train.data import StdlibCorpusConfig, ensure_stdlib_corpus
from msa_train.data.stdlib_corpus import stdlib_source_files


def test_source_files_sorted_without_tests_or_site_packages():
    files = stdlib_source_files()
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    rel = [os.path.relpath(f, root) for f in files]
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/decoder.py" in rel.__str__().replace(os.sep, "/")
    for r in rel:
        parts = r.split(os.sep)
        assert "site-packages" not in parts and "test" not in parts and "tests" not in parts
    assert len(stdlib_source_files(max_files=5)) == 5


def test_build_then_reuse_subset(tmp_path):
    cfg = StdlibCorpusConfig(cache_dir=str(tmp_path), max_files=12)
    first = ensure_stdlib_corpus(cfg)
    assert first.built
    ver = "{}.{}".format(*sys.version_info[:2])
    assert os.path.basename(first.directory).startswith(f"stdlib_corpus_{ver}_")
    files = [f for f in stdlib_source_files(max_files=12) if os.path.getsize(f) > 0]
    docs = read_docs(first.prefix)
    assert docs == [list(open(f, "rb").read()) + [256] for f in files]
    assert first.documents == len(files)
    assert first.tokens == sum(len(d) for d in docs)

    mtime = os.path.getmtime(first.prefix + ".bin")
    second = ensure_stdlib_corpus(cfg)
    assert not second.built and second.directory == first.directory
    assert os.path.getmtime(second.prefix + ".bin") == mtime
    # other options get their own directory; nothing temporary is left behind
    other = ensure_stdlib_corpus(StdlibCorpusConfig(cache_dir=str(tmp_path), max_files=3))
    assert other.directory != first.directory and other.built
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_env_var_sets_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_TRAIN_CACHE", str(tmp_path / "env"))
    corpus = ensure_stdlib_corpus(StdlibCorpusConfig(max_files=2))
    assert corpus.directory.startswith(str(tmp_path / "env"))


def test_incomplete_directory_is_rebuilt(tmp_path):
    cfg = StdlibCorpusConfig(cache_dir=str(tmp_path), max_files=3)
    corpus = ensure_stdlib_corpus(cfg)
    os.remove(os.path.join(corpus.directory, "corpus.json"))  # e.g. a crashed copy by hand
    again = ensure_stdlib_corpus(cfg)
    assert again.built and again.directory == corpus.directory


def _build_in_child(cache_dir, queue):
    corpus = ensure_stdlib_corpus(StdlibCorpusConfig(cache_dir=cache_dir, max_files=40))
    queue.put((corpus.directory, corpus.built, corpus.tokens))


def test_concurrent_ranks_build_once(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({r[0] for r in results}) == 1 and len({r[2] for r in results}) == 1
    assert sum(r[1] for r in results) == 1  # exactly one process built it
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_full_default_corpus_builds_fast(tmp_path):
    t0 = time.time()
    corpus = ensure_stdlib_corpus(StdlibCorpusConfig(cache_dir=str(tmp_path)))
    seconds = time.time() - t0
    print(f"\n{corpus.line()} in {seconds:.1f}s")
    assert corpus.built and corpus.documents > 300 and corpus.tokens > 3_000_000
    assert seconds < 60
