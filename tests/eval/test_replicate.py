"""tools/replicate.py's logic without training: the variants' configs, the random-selection
baseline, the claim verdicts and the CI check. (The replication itself runs as its own CI step.)"""
import random

import pytest

from msa_train.eval import replicate


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from msa_train.config import register_configs
    from msa_train.train import CONFIG_PATH

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("config", overrides=overrides)


# ids without "gpu": the root conftest skips GPU-marked (and -named) tests on CPU machines, and
# composing the GPU size needs no GPU.
@pytest.mark.parametrize("size", [pytest.param(s, id=f"size_{i}") for i, s in enumerate(sorted(replicate.SIZES))])
def test_every_variant_composes_and_validates(tmp_path, size):
    from omegaconf import OmegaConf

    from msa_train.config import validate_config

    s = replicate.SIZES[size]
    vs = {v.name: v for v in replicate.variants(s)}
    for v in vs.values():
        if v.init_from:  # the run it starts from must exist for validation: fake a checkpoint
            ck = tmp_path / v.init_from / "checkpoints" / "iter_0000001"
            ck.mkdir(parents=True, exist_ok=True)
            (ck.parent / "latest_checkpointed_iteration.txt").write_text("1")
        cfg = _compose(replicate.train_overrides(s, v, str(tmp_path)))
        if size == "gpu":  # validation would look for a GPU
            cfg.train.device = "cpu"
        try:
            validate_config(cfg, 1, check_paths=False)
        except Exception as err:  # noqa: BLE001 - name the variant
            raise AssertionError(f"{size}/{v.name}: {err}") from err
        attn = OmegaConf.to_object(cfg.attention)
        mask = attn.layer_mask(cfg.model.num_layers)
        assert any(mask) == v.msa, v.name
        assert cfg.train.seq_length == s.seq_length and cfg.attention.topk == s.topk
        assert cfg.attention.block_size == s.block_size
        tokens = cfg.stage.warmup.tokens + cfg.stage.sparse.tokens
        assert tokens == v.steps * s.tokens_per_step
    # Equal tokens within each comparison group; fixed window = exactly top-k forced blocks.
    assert len({vs[n].steps for n in ("dense", "msa_pt", "no_warmup", "no_stop_grad",
                                       "fixed_window")}) == 1
    assert vs["dense_cont"].steps == vs["msa_cpt"].steps
    assert vs["no_warmup"].warmup_steps == 0
    fixed = _compose(replicate.train_overrides(s, vs["fixed_window"], str(tmp_path))).attention
    assert int(fixed.force_sink) + fixed.local_window + 1 == fixed.topk
    assert _compose(replicate.train_overrides(s, vs["no_stop_grad"], str(tmp_path))) \
        .attention.index_stop_grad is False


def _simulated_random_recall(length, block, topk, rows, trials=400, seed=0):
    """Monte Carlo of a local + random selection against a main top-k that holds the local block."""
    rng = random.Random(seed)
    total = 0.0
    for p in rows:
        n = p // block + 1
        if n <= topk:
            total += 1.0
            continue
        local = n - 1
        main = {local, *rng.sample(range(local), topk - 1)}
        hits = 0
        for _ in range(trials):
            sel = {local, *rng.sample(range(local), topk - 1)}
            hits += len(main & sel)
        total += hits / trials / topk
    return total / len(rows)


def test_random_block_recall_matches_a_simulation():
    import torch

    from msa_train.model.recall import sample_rows

    rows = sample_rows(512, 16, torch.device("cpu")).tolist()
    exact = replicate.random_block_recall(512, 16, 4, 16)
    assert exact == pytest.approx(_simulated_random_recall(512, 16, 4, rows), abs=0.02)
    # Sanity of the bound's shape: more blocks to choose from -> lower recall; top-k >= all -> 1.
    assert replicate.random_block_recall(4096, 16, 4, 64) < exact < 1.0
    assert replicate.random_block_recall(64, 16, 4, 64) == 1.0


def test_uniform_score_recall_is_what_the_recall_metric_gives_for_uniform_attention():
    """q = 0 makes the main branch's attention uniform over the visible tokens; the project's
    recall metric then gives exactly the reference value, whatever blocks the indexer picked."""
    import msa_kernels
    import torch

    from msa_train.model.packing import batch_layout
    from msa_train.model.recall import compute_recall, sample_rows

    t, block, topk, nq = 256, 16, 4, 40
    gen = torch.Generator().manual_seed(3)
    q = torch.zeros(t, 4, 8)
    k = torch.randn(t, 2, 8, generator=gen)
    layout = batch_layout(t, 1, torch.device("cpu"))
    topk_idx = msa_kernels.select_blocks(torch.randn(t, 2, 8, generator=gen),
                                         torch.randn(t, 8, generator=gen), layout.cu_seqlens,
                                         block, topk)
    sums = compute_recall(q, k, topk_idx, layout, block, 1.0, sample_rows(t, nq, q.device))
    assert float(sums[1] / sums[2]) == pytest.approx(
        replicate.uniform_score_recall(t, block, topk, nq), rel=1e-5)


def _summary(kl_start=1e-3, kl_end=2e-4, block=0.7, ppl=None):
    ppl = ppl or {}

    def var(name, msa=True, warmup=10):
        steps = list(range(1, 21))
        kl = [kl_start + (kl_end - kl_start) * (s - 1) / 9 if s <= warmup else kl_end for s in steps]
        return {"label": name, "msa": msa, "init_from": None, "warmup_steps": warmup,
                "sparse_steps": 10, "ppl": ppl.get(name, 10.0),
                "kl": replicate.kl_summary([{"step": s, "train/indexer_kl": k}
                                            for s, k in zip(steps, kl)], warmup) if msa else {},
                "block_recall": block, "score_recall": 0.9}

    names = ["dense", "msa_pt", "no_warmup", "no_stop_grad", "fixed_window", "dense_cont", "msa_cpt"]
    return {"variants": {n: var(n, msa=not n.startswith("dense")) for n in names},
            "random_block_recall": 0.45, "uniform_score_recall": 0.37}


def test_claims_and_check_follow_the_measurements():
    good = _summary(ppl={"msa_pt": 10.0, "dense": 9.9, "no_warmup": 11.0, "no_stop_grad": 10.5,
                         "fixed_window": 10.0})
    good["claims"] = replicate.claims(good)
    verdicts = {c["claim"]: c["verdict"] for c in good["claims"]}
    assert verdicts["indexer KL falls during the warmup"] == "reproduces"
    assert verdicts["MSA-PT quality close to dense (same tokens)"] == "reproduces"
    assert verdicts["indexer warmup matters"] == "reproduces"
    assert verdicts["dynamic selection beats a fixed sink + local window"] == "does not reproduce"
    assert replicate.check(good) == []

    # Attention nearly uniform over blocks (score recall at the uniform value): the quality
    # claims are inconclusive, the KL and recall ones are not.
    flat = _summary(ppl={"msa_pt": 10.0, "dense": 9.9, "no_warmup": 11.0})
    flat["uniform_score_recall"] = 0.88
    verdicts = {c["claim"]: c["verdict"] for c in replicate.claims(flat)}
    assert verdicts["indexer warmup matters"] == "inconclusive"
    assert verdicts["MSA-PT quality close to dense (same tokens)"] == "inconclusive"
    assert verdicts["indexer KL falls during the warmup"] == "reproduces"

    bad = _summary(kl_start=1e-4, kl_end=5e-4, block=0.4)
    failures = replicate.check(bad)
    assert len(failures) == 2 and "did not fall" in failures[0] and "random" in failures[1]


def test_unknown_variant_is_an_error_naming_the_choices(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="choose from"):
        replicate.run_all(replicate.SIZES["cpu"], str(out), names=["msa_ptt"])
    assert not out.exists()  # nothing written


def test_a_directory_made_with_other_settings_is_refused(tmp_path):
    replicate._check_same_settings(str(tmp_path), {"warmup_steps": 30})
    replicate._check_same_settings(str(tmp_path), {"warmup_steps": 30})  # same: fine
    with pytest.raises(ValueError, match="warmup_steps"):
        replicate._check_same_settings(str(tmp_path), {"warmup_steps": 60})
