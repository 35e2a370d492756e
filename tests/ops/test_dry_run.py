"""Dry run: exact parameter counting over the layer map, sharding per GPU, memory estimate, and the
109B recipe's printout at 256 GPUs."""
import io
import os

import pytest
from omegaconf import OmegaConf

from msa_train.dry_run import ParallelLayout, count_parameters, dry_run, param_kind

pytest.importorskip("megatron.core")


def _small_moe():
    from msa_train.model import AttentionConfig, ModelConfig

    m = ModelConfig(name="small", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=256,
                    num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                    moe_shared_expert_intermediate_size=32, moe_first_k_dense=1)
    a = AttentionConfig(dense_first_layers=1, block_size=16, topk=2, index_dim=16)
    return m, a


def _layout(**kw):
    base = dict(world=1, tp=1, pp=1, vpp=None, cp=1, ep=1, etp=1, gpus_per_node=8)
    base.update(kw)
    return ParallelLayout(**base)


def test_counts_match_a_full_model_and_shard_per_gpu():
    import torch

    from msa_train.compat import destroy_parallel, init_parallel
    from msa_train.model import build_model, build_transformer_config

    m, a = _small_moe()
    single = count_parameters(m, a, _layout(), vocab=256, seq_len=64)
    # Oracle: the whole 4-layer model, built the normal way.
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    init_parallel({})
    try:
        full = build_model(build_transformer_config(m, a, {}, torch.float32), vocab_size=256,
                           max_seq_len=64)
        expected = sum(p.numel() for p in full.parameters())
        experts = sum(p.numel() for n, p in full.named_parameters() if param_kind(n) == "routed_experts")
    finally:
        destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert single.total == expected
    assert single.by_kind["routed_experts"] == experts > 0
    assert single.by_kind["index_branch"] > 0 and single.by_kind["router"] > 0
    assert single.active == expected - experts + experts * 2 // 4
    assert single.per_stage_gpu == [(expected - experts, experts)]

    sharded = count_parameters(m, a, _layout(world=8, tp=2, pp=2, ep=2, etp=1), vocab=256, seq_len=64)
    assert sharded.total == expected
    (d0, e0), (d1, e1) = sharded.per_stage_gpu
    assert e0 + e1 == experts // 2  # EP2: half the experts on each GPU, split over 2 stages
    # TP halves the linears and the vocabulary; norms, router and the shared index key stay whole.
    assert (expected - experts) // 2 < d0 + d1 < expected - experts


def test_layout_lines_flag_groups_that_leave_the_node():
    lay = _layout(world=256, tp=2, cp=2, ep=8, etp=2)
    assert (lay.dp, lay.edp, lay.nodes) == (64, 16, 32)
    text = "\n".join(lay.lines())
    assert "TP group inside a node" in text and "EP group spans 2 nodes" in text
    assert "EP group inside a node" in "\n".join(_layout(world=256, tp=2, ep=8, etp=1).lines())


def _compose_109b(tmp_path):
    from msa_train.dry_run import compose

    try:
        return compose(["experiment=msa_109b_pt", f"checkpoint.save={tmp_path / 'ckpt'}",
                        "data.source=mock"])  # the layout does not depend on the corpus
    except Exception as e:  # the recipe's model/attention groups come from other packages
        if "Could not find" in str(e):
            pytest.skip(f"109B recipe not composable yet: {e}")
        raise


def test_dry_run_109b_recipe_at_256_gpus(tmp_path):
    cfg = _compose_109b(tmp_path)
    out = io.StringIO()
    report = dry_run(cfg, 256, stream=out)
    text = out.getvalue()
    assert "on 256 GPUs" in text and "32 nodes x 8" in text
    p = cfg.parallel
    assert f"TP {p.tp} x CP {p.cp} x PP {p.pp}" in text
    assert report["dp"] == 256 // (p.tp * p.cp * p.pp)
    assert "-- parameters" in text and "per GPU, PP stage 0" in text
    assert "-- memory per GPU" in text and "GiB of" in text
    assert "-- training FLOPs per token" in text
    # Cross-check against the model package's analytic count.

    from msa_train.model.flops import count_parameters as analytic

    ref = analytic(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.attention))
    assert report["params_total"] == ref.total and report["params_active"] == ref.active
    # The paper's model: ~109B total, ~6B active.
    assert 90e9 < report["params_total"] < 130e9
    assert 4e9 < report["params_active"] < 9e9


def test_dry_run_rejects_a_conflicting_world_size(tmp_path):
    cfg = _compose_109b(tmp_path)
    with pytest.raises(ValueError, match="parallel.world_size"):
        dry_run(cfg, 128, stream=io.StringIO())


def test_cli_dry_run_plans_at_the_recipe_world_size_without_seeing_its_storage(tmp_path):
    """`msa-train ... dry_run=true` on a laptop: one process, data and checkpoints on a cluster
    filesystem this machine does not have. It must still validate and print the 256-GPU plan."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "msa_train.train", "experiment=msa_109b_pt", "dry_run=true",
         "data.paths=[/nonexistent/cluster/corpus]", "checkpoint.save=/nonexistent/cluster/ckpt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "on 256 GPUs" in proc.stdout and "TP 2 x CP 2" in proc.stdout
    # Everything else is still validated: a layout that cannot fit the world size is refused.
    bad = subprocess.run(
        [sys.executable, "-m", "msa_train.train", "experiment=msa_109b_pt", "dry_run=true",
         "data.paths=[/nonexistent/cluster/corpus]", "parallel.world_size=100"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "parallel" in (bad.stdout + bad.stderr)
