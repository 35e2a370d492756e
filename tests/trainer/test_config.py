"""Composition (schemas in the ConfigStore) and validation before any compute."""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from msa_train.config import ConfigError, register_configs, validate_config
from tests.trainer.helpers import REPO, run_train

CONFIG_DIR = os.path.join(REPO, "configs")
register_configs()


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def errors_of(cfg, world_size=1):
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size)
    return str(info.value)


def test_default_is_tiny_cpu_with_real_sparsity():
    cfg = compose_cfg()
    validate_config(cfg, 1)
    assert cfg.name == "tiny_cpu"
    keys_per_query = cfg.attention.topk * cfg.attention.block_size
    assert cfg.train.seq_length >= 8 * keys_per_query
    assert cfg.stage.run == "both" and cfg.stage.warmup.tokens > 0 and cfg.stage.sparse.tokens > 0


@pytest.mark.parametrize("override, error", [
    ("train.seq_lenght=512", (ConfigCompositionException, ConfigKeyError)),
    ("train.seq_length=long", (ConfigCompositionException, ValidationError)),
    ("parallel.tp=two", (ConfigCompositionException, ValidationError)),
])
def test_typos_and_wrong_types_fail_at_compose_time(override, error):
    with pytest.raises(error):
        compose_cfg(override)


def test_typo_inside_a_group_file_fails_at_compose_time(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nstage:\n  warmup:\n    token: 5\n")
    with pytest.raises(ConfigCompositionException, match="token"):
        compose_cfg(f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo")


def test_unknown_experiment_names_the_group():
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="experiment"):
        compose_cfg("experiment=does_not_exist")


@pytest.mark.parametrize("overrides, world, needles", [
    (["train.seq_length=500"], 1, ["train.seq_length=500", "attention.block_size=16"]),
    (["train.seq_length=8"], 1, ["shorter than one attention.block_size"]),
    (["attention.topk=40"], 1, ["attention.topk=40 exceeds the 32 blocks"]),
    (["attention.topk=32"], 1, ["covers the whole", "attention.topk"]),
    (["parallel.tp=2"], 1, ["world size 1 is not divisible by parallel.tp"]),
    (["parallel.tp=8", "parallel.sequence_parallel=true"], 8,
     ["model.num_attention_heads=4", "model.num_query_groups=2"]),
    (["parallel.world_size=16"], 8, ["parallel.world_size=16 but this job has 8 ranks"]),
    (["parallel.ep=3"], 1, ["parallel.ep=3 must divide model.num_moe_experts=4"]),
    (["train.global_batch_size=6"], 4, ["train.global_batch_size=6 must be a multiple"]),
    (["stage.warmup.trainable=backbone"], 1, ["stage.warmup.trainable='backbone'"]),
    (["stage.run=sparse"], 1, ["checkpoint.init_from"]),
    (["checkpoint.init_from=/nonexistent/ckpt"], 1, ["checkpoint.init_from=/nonexistent/ckpt does not exist"]),
    (["checkpoint.load=/nonexistent/ckpt"], 1, ["checkpoint.load=/nonexistent/ckpt does not exist"]),
    (["data=indexed", "data.paths=[/nonexistent/corpus]"], 1, ["data.paths[0]"]),
    (["attention.topk=0"], 1, ["attention.topk"]),
])
def test_bad_configs_name_the_field(overrides, world, needles):
    message = errors_of(compose_cfg(*overrides), world)
    for needle in needles:
        assert needle in message, message


def test_directory_without_checkpoint_is_an_error(tmp_path):
    message = errors_of(compose_cfg(f"checkpoint.init_from={tmp_path}"))
    assert "holds no checkpoint" in message and "checkpoint.init_from" in message


def _fake_data_prefix(tmp_path):
    """A small but valid indexed dataset (validation reads its .idx header and sizes)."""
    from msa_train.data.indexed import IndexedWriter

    prefix = str(tmp_path / "corpus_text_document")
    with IndexedWriter(prefix, 257, 256) as w:
        w.add(list(range(100)))
    return prefix


def _fake_checkpoint(tmp_path):
    root = tmp_path / "dense"
    (root / "iter_0000100").mkdir(parents=True)
    (root / "iter_0000100" / "metadata.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text("100\n")
    return str(root)


@pytest.mark.parametrize("experiment, world", [
    ("pilot_pt", 16), ("pilot_cpt", 16), ("msa_109b_pt", 256), ("msa_109b_cpt", 256),
])
def test_recipes_compose_and_validate_at_their_world_size(tmp_path, experiment, world):
    overrides = [f"experiment={experiment}", f"data.paths=[{_fake_data_prefix(tmp_path)}]",
                 f"checkpoint.save={tmp_path}/save"]
    if experiment.endswith("cpt"):
        overrides.append(f"checkpoint.init_from={_fake_checkpoint(tmp_path)}")
    cfg = compose_cfg(*overrides)
    validate_config(cfg, world)
    assert cfg.name == experiment and cfg.train.precision == "bf16"
    assert cfg.parallel.world_size == world
    # The recipe must be genuinely sparse at its sequence length.
    assert cfg.train.seq_length >= 8 * cfg.attention.topk * cfg.attention.block_size


def test_cpt_recipe_requires_init_from(tmp_path):
    cfg = compose_cfg("experiment=msa_109b_cpt", f"data.paths=[{_fake_data_prefix(tmp_path)}]",
                      f"checkpoint.save={tmp_path}/save")
    with pytest.raises(Exception, match="init_from"):
        validate_config(cfg, 256)


def test_cli_rejects_bad_config_before_any_compute(tmp_path):
    result = run_train(["train.seq_length=500", f"checkpoint.save={tmp_path}/ckpt"],
                       str(tmp_path / "run"), expect_rc=2, timeout=120)
    assert "train.seq_length=500" in result.stdout and "attention.block_size" in result.stdout
    assert "stage warmup" not in result.stdout and not os.path.exists(tmp_path / "ckpt")


def test_dry_run_flag_prints_the_plan_and_trains_nothing(tmp_path):
    result = run_train(["dry_run=true", f"checkpoint.save={tmp_path}/ckpt"], str(tmp_path / "run"),
                       timeout=120)
    assert "warmup" in result.stdout and "sparse" in result.stdout and "parameters" in result.stdout
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(tmp_path / "run")
