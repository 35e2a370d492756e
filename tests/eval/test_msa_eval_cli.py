"""msa-eval end to end on a checkpoint in the trainer's layout (torch_dist weights, tracker file,
run_config.yaml), built here with random weights: results.json schema, sparse == dense where the
top-k covers the whole context, selection-pattern invariants, figures, and bad input."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("megatron.core")

BLOCK, TOPK = 16, 3

MAKE_CKPT = textwrap.dedent(f"""
    import os, sys
    import torch
    from omegaconf import OmegaConf
    from megatron.core import dist_checkpointing
    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.config.store import MSATrainConfig
    from msa_train.model import build_model, build_transformer_config
    from msa_train.trainer import ckpt_layout

    def main(root):
        cfg = OmegaConf.structured(MSATrainConfig)
        cfg.model = OmegaConf.merge(cfg.model, dict(
            name="eval_test", num_layers=3, hidden_size=48, ffn_hidden_size=96,
            num_attention_heads=4, num_query_groups=2, kv_channels=12, vocab_size=257,
            num_moe_experts=2, moe_router_topk=1, moe_ffn_hidden_size=32, moe_first_k_dense=1))
        cfg.attention = OmegaConf.merge(cfg.attention, dict(
            dense_first_layers=1, block_size={BLOCK}, topk={TOPK}, index_dim=16))
        cfg.data.source = "mock"
        cfg.train.seq_length = 160
        cfg.train.global_batch_size = 1
        cfg.run_dir = root
        cfg.checkpoint.save = os.path.join(root, "checkpoints")
        model_cfg, attn_cfg = OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.attention)
        torch.manual_seed(0)
        init_parallel({{}})
        model = build_model(build_transformer_config(model_cfg, attn_cfg, {{}}, torch.float32),
                            vocab_size=384, max_seq_len=160)
        it = ckpt_layout.iteration_dir(os.path.join(root, "checkpoints"), 20)
        os.makedirs(it)
        dist_checkpointing.save({{"model": model.sharded_state_dict(), "progress": {{"iteration": 20}},
                                 "opt_param_scheduler": {{"num_steps": 20}}}}, it)
        ckpt_layout.write_atomic(os.path.join(it, ckpt_layout.RUN_CONFIG_FILENAME),
                                 OmegaConf.to_yaml(cfg, resolve=True))
        ckpt_layout.write_tracker(os.path.join(root, "checkpoints"), 20)
        # The trainer also writes the run's config into the run dir: msa-eval RUN finds the save dir there.
        ckpt_layout.write_atomic(os.path.join(root, ckpt_layout.RUN_CONFIG_FILENAME),
                                 OmegaConf.to_yaml(cfg, resolve=True))
        destroy_parallel()

    if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file
        main(sys.argv[1])
""")


def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MSA_TRAIN_CACHE=str(tmp_path / "cache"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_ckpt")
    script = tmp / "make.py"
    script.write_text(MAKE_CKPT)
    r = subprocess.run([sys.executable, str(script), str(tmp / "run")], env=_env(tmp),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "run"


def _eval(run_dir, out, *args, tmp):
    return subprocess.run([sys.executable, "-m", "msa_train.eval.cli", str(run_dir), "--out", str(out),
                           *args], env=_env(tmp), capture_output=True, text=True, timeout=300)


def test_msa_eval_writes_the_documented_results(run_dir, tmp_path):
    tasks = tmp_path / "copy.jsonl"
    tasks.write_text("".join(json.dumps({"context": "abcabcabc" * 3, "answer": "abc"}) + "\n"
                             for _ in range(2)))
    out = tmp_path / "eval"
    # 40 tokens fit in top-3 blocks of 16 (sparse == dense); 160 do not.
    r = _eval(run_dir, out, "--lengths", "40,160", "--num-samples", "2", "--num-examples", "2",
              "--retrieval-tasks", "needle,vartrack", "--jsonl", str(tasks), tmp=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["iteration"] == 20 and res["checkpoint"].endswith("iter_0000020")
    ppl = res["perplexity"]
    assert set(ppl) == {"sparse", "dense"}
    for mode in ppl.values():
        buckets = mode["by_position"]
        assert buckets[0]["start"] == 0 and buckets[-1]["end"] == 160
        assert all(a["end"] == b["start"] for a, b in zip(buckets, buckets[1:]))
        assert all(np.isfinite(b["ppl"]) and b["ppl"] > 1 for b in buckets)
    # Positions < TOPK * BLOCK see at most TOPK blocks: the sparse model is the dense model there.
    for s, d in zip(ppl["sparse"]["by_position"], ppl["dense"]["by_position"]):
        if s["end"] <= TOPK * BLOCK:
            assert s["ppl"] == pytest.approx(d["ppl"], rel=1e-5)
    assert ppl["sparse"]["overall"] != pytest.approx(ppl["dense"]["overall"], rel=1e-7)
    assert set(res["retrieval"]) == {"needle", "vartrack"}
    for per in res["retrieval"].values():
        assert set(per) <= {"40", "160"}
        for r_ in per.values():
            assert r_["n"] == 2 and 0.0 <= r_["accuracy"] <= 1.0
    assert set(res["recall"]) == {"layer_01", "layer_02"}
    for layer in res["recall"].values():
        assert 0 < layer["block_recall"] <= 1 and 0 < layer["score_recall"] <= 1 + 1e-6
        assert layer["kl"] >= 0 and np.isfinite(layer["kl"])
    assert res["tasks"]["copy"]["n"] == 2 and res["tasks"]["copy"]["mean_answer_logprob"] < 0
    for png in ("perplexity_by_position.png", "retrieval.png", "recall.png", "patterns.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "layer_02" in md and "| needle |" in md


def test_short_context_recall_is_perfect(run_dir, tmp_path):
    """With every visible block selected, the indexer cannot miss: recall 1, KL on the full
    support is the dense KL (finite, >= 0)."""
    out = tmp_path / "eval"
    r = _eval(run_dir, out, "--tasks", "recall", "--lengths", "48", "--num-samples", "1",
              tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for layer in res["recall"].values():
        assert layer["block_recall"] == pytest.approx(1.0)
        assert layer["score_recall"] == pytest.approx(1.0, abs=1e-5)


def test_selection_patterns_are_causal_and_keep_the_local_block(run_dir, tmp_path):
    script = tmp_path / "patterns.py"
    script.write_text(textwrap.dedent(f"""
        import sys, numpy as np, torch
        from msa_train.eval import checkpoint, scoring
        em = checkpoint.load_eval_model(sys.argv[1])
        try:
            freqs = scoring.selection_patterns(em, torch.arange(100) % 250)
        finally:
            checkpoint.close()
        assert sorted(freqs) == [1, 2], sorted(freqs)
        for f in freqs.values():
            nb = 7  # ceil(100 / 16)
            assert f.shape == (2, nb, nb), f.shape
            assert np.allclose(np.diagonal(f, axis1=1, axis2=2), 1.0)   # local block always in
            assert np.all(np.triu(f, k=1) == 0)                         # causal
            assert np.allclose(f.sum(-1)[:, {TOPK - 1}:], {TOPK}.0)     # top-k once k blocks exist
        print("ok")
    """))
    r = subprocess.run([sys.executable, str(script), str(run_dir)], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "ppl,bogus"], "unknown ['bogus']"),
    (["--lengths", "12,abc"], "--lengths must be comma-separated integers"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--retrieval-tasks", "haystack"], "unknown ['haystack']"),
], ids=["task", "lengths", "num-samples", "retrieval-task"])
def test_bad_arguments_are_rejected_before_loading(tmp_path, args, message):
    r = _eval(tmp_path / "nothing", tmp_path / "out", *args, tmp=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_too_long_lengths_name_the_problem(run_dir, tmp_path):
    r = _eval(tmp_path / "nothing", tmp_path / "out", tmp=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr[-2000:]
    r = _eval(run_dir, tmp_path / "out2", "--tasks", "ppl", "--lengths", "9999999", tmp=tmp_path)
    assert r.returncode == 2 and "max_position_embeddings" in r.stderr, r.stderr[-2000:]


def test_data_parallel_eval_under_torchrun_matches_one_process(run_dir, tmp_path):
    """torchrun, 2 CPU ranks (gloo): each rank scores every other sequence and example; the
    gathered results equal the single-process ones, and only rank 0 writes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--tasks", "ppl,retrieval,recall", "--lengths", "64,160", "--num-samples", "3",
            "--num-examples", "3", "--retrieval-tasks", "needle,multikey", "--device", "cpu"]
    one = _eval(run_dir, tmp_path / "one", *args, tmp=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "msa_train.eval.cli",
         str(run_dir), "--out", str(tmp_path / "two"), *args],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("msa-eval: wrote") == 1  # rank 0 only
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    for mode in ("sparse", "dense"):
        pa, pb = a["perplexity"][mode], b["perplexity"][mode]
        assert pb["overall"] == pytest.approx(pa["overall"], rel=1e-6)
        assert [x["ppl"] for x in pb["by_position"]] == pytest.approx(
            [x["ppl"] for x in pa["by_position"]], rel=1e-6)
    assert b["retrieval"] == a["retrieval"]
    for layer, r in a["recall"].items():
        assert b["recall"][layer] == pytest.approx(r, rel=1e-5)
