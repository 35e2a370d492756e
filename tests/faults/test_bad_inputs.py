"""The bad-input table: every case is refused before compute, the message names the field or file
to change, and nothing on disk is lost. Config cases are validated in-process (what `msa-train`
and the dry run both call); a few subprocess cases pin the exit codes and the disk state."""

import json
import os
import shutil

import pytest
from omegaconf import OmegaConf

from msa_train.config import ConfigError, validate_config
from msa_train.dry_run import compose
from tests.faults.conftest import write_prefix

# (id, overrides, text the message must contain: the field to change)
CONFIG_CASES = [
    ("lr-warmup-beyond-run", ["train.lr_warmup_steps=100"], "train.lr_warmup_steps=100 is longer"),
    ("stage-warmup-beyond-stage", ["stage.warmup.tokens=81920", "stage.warmup.lr_warmup_steps=21"],
     "stage.warmup.lr_warmup_steps=21 is longer"),
    ("sparse-lr-warmup-negative", ["stage.sparse.lr_warmup_steps=-1"],
     "stage.sparse.lr_warmup_steps=-1"),
    ("adam-beta1-above-one", ["train.adam_beta1=1.5"], "train.adam_beta1=1.5"),
    ("adam-beta2-negative", ["train.adam_beta2=-0.1"], "train.adam_beta2=-0.1"),
    ("adam-eps-zero", ["train.adam_eps=0"], "train.adam_eps"),
    ("weight-decay-negative", ["train.weight_decay=-1"], "train.weight_decay"),
    ("signal-unknown", ["cluster.signals=[SIGFOO]"], "SIGFOO"),
    ("signal-uncatchable", ["cluster.signals=[SIGKILL]"], "SIGKILL cannot be caught"),
    ("exit-grace-negative", ["cluster.exit_grace_s=-1"], "cluster.exit_grace_s"),
    ("walltime-zero", ["cluster.walltime_s=0"], "cluster.walltime_s"),
    ("gpus-per-node-zero", ["cluster.gpus_per_node=0"], "cluster.gpus_per_node"),
    ("layer-ids-out-of-range", ["attention.layer_ids=[10]"], "attention.layer_ids"),
    ("layer-map-wrong-length", ["attention.layer_map=[1,1]"], "attention.layer_map"),
    ("model-vocab-below-tokenizer", ["model.vocab_size=100"], "model.vocab_size=100"),
    ("max-skipped-steps-zero", ["train.max_skipped_steps=0"], "train.max_skipped_steps"),
    ("max-rollbacks-negative", ["train.max_rollbacks=-1"], "train.max_rollbacks"),
    ("rollback-without-save", ["train.rollback_on_divergence=true", "checkpoint.save=null"],
     "train.rollback_on_divergence"),
    ("seq-length-zero", ["train.seq_length=0"], "train.seq_length"),
    ("micro-batch-zero", ["train.micro_batch_size=0"], "train.micro_batch_size"),
    ("global-batch-not-multiple", ["train.global_batch_size=6"], "train.global_batch_size=6"),
    ("eval-iters-zero", ["train.eval_iters=0"], "train.eval_iters"),
    ("lr-negative", ["train.lr=-1"], "train.lr"),
    ("min-lr-above-lr", ["train.min_lr=1.0"], "min_lr"),
    ("lr-warmup-negative", ["train.lr_warmup_steps=-1"], "train.lr_warmup_steps=-1"),
    ("clip-grad-negative", ["train.clip_grad=-1"], "train.clip_grad"),
    ("eval-interval-zero", ["train.eval_interval=0"], "train.eval_interval"),
    ("max-steps-per-job-zero", ["train.max_steps_per_job=0"], "train.max_steps_per_job"),
    ("recompute-bogus", ["train.recompute_granularity=bogus"], "train.recompute_granularity"),
    ("lr-decay-bogus", ["train.lr_decay_style=bogus"], "train.lr_decay_style"),
    ("precision-fp8", ["train.precision=fp8"], "train.precision"),
    ("device-tpu", ["train.device=tpu"], "train.device"),
    ("seq-beyond-positions", ["train.seq_length=8192"], "model.max_position_embeddings"),
    ("stage-run-unknown", ["stage.run=middle"], "stage.run"),
    ("stage-tokens-negative", ["stage.warmup.tokens=-5"], "stage.warmup.tokens"),
    ("trainable-unknown", ["stage.warmup.trainable=some"], "stage.warmup.trainable"),
    ("stage-lr-negative", ["stage.sparse.lr=-1"], "stage.sparse.lr"),
    ("run-stage-without-tokens", ["stage.run=warmup", "stage.warmup.tokens=0"],
     "stage.warmup.tokens=0"),
    ("nothing-to-train", ["stage.warmup.tokens=0", "stage.sparse.tokens=0"], "nothing to train"),
    ("tp-zero", ["parallel.tp=0"], "parallel.tp"),
    ("tp-not-dividing-heads", ["parallel.tp=3", "parallel.world_size=null"], "parallel"),
    ("world-size-mismatch", ["parallel.world_size=8"], "parallel.world_size=8"),
    ("vpp-without-pp", ["parallel.vpp=2"], "parallel.vpp"),
    ("save-interval-zero", ["checkpoint.save_interval=0"], "checkpoint.save_interval"),
    ("keep-last-zero", ["checkpoint.keep_last_k=0"], "checkpoint.keep_last_k"),
    ("interval-without-save", ["checkpoint.save=null", "checkpoint.save_interval=5"],
     "checkpoint.save_interval=5"),
    ("max-steps-without-save", ["checkpoint.save=null", "train.max_steps_per_job=2"],
     "train.max_steps_per_job"),
    ("required-unknown", ["checkpoint.required=[save,foo]"], "checkpoint.required"),
    ("load-missing", ["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load"),
    ("init-from-missing", ["checkpoint.init_from=/nonexistent/ckpt"], "checkpoint.init_from"),
    ("sparse-without-init", ["stage.run=sparse"], "checkpoint.init_from"),
    ("block-longer-than-seq", ["attention.block_size=1024"], "attention.block_size"),
    ("seq-not-block-multiple", ["attention.block_size=48"], "attention.block_size=48"),
    ("topk-beyond-blocks", ["attention.topk=100"], "attention.topk"),
    ("split-garbage", ["data.split=abc"], "data.split"),
    ("data-source-unknown", ["data.source=web"], "data.source"),
    ("indexed-without-paths", ["data=indexed"], "data.paths is empty"),
    ("paths-with-stdlib", ["data.paths=[/x]"], "data.paths is set"),
    ("hf-tokenizer-on-stdlib", ["data.tokenizer.type=huggingface"], "data.tokenizer.type"),
    ("vocab-divisor-zero", ["data.tokenizer.make_vocab_size_divisible_by=0"],
     "make_vocab_size_divisible_by"),
    ("num-workers-negative", ["data.num_workers=-1"], "data.num_workers"),
    ("max-files-zero", ["data.stdlib.max_files=0"], "data.stdlib.max_files"),
    ("indexed-prefix-missing", ["data=indexed", "data.paths=[/nonexistent/corpus]"],
     "data.paths[0]"),
    ("weights-length", ["data=indexed", "data.paths=[/a,/b]", "data.weights=[1.0]"],
     "data.weights"),
    ("num-layers-zero", ["model.num_layers=0"], "model.num_layers"),
]


def _validate(overrides, tmp_path):
    cfg = compose([f"run_dir={tmp_path}/run", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, 1)
    return str(err.value)


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_naming_the_field(tmp_path, overrides, expected):
    before = _snapshot(tmp_path)
    message = _validate(overrides, tmp_path)
    assert expected in message, message
    assert _snapshot(tmp_path) == before  # validation writes nothing


def test_config_table_is_large_enough():
    assert len(CONFIG_CASES) + len(DATA_CASES) + len(CHECKPOINT_CASES) >= 60


def test_dry_run_runs_the_same_checks(tmp_path, capsys):
    from msa_train.dry_run import main

    for overrides, expected in [(["cluster.signals=[SIGFOO]"], "SIGFOO"),
                                (["cluster.exit_grace_s=-1"], "cluster.exit_grace_s"),
                                (["attention.layer_ids=[10]"], "attention.layer_ids"),
                                (["train.adam_beta1=1.5"], "train.adam_beta1")]:
        assert main(["--world-size", "1", f"run_dir={tmp_path}/run", *overrides]) == 2
        assert expected in capsys.readouterr().err


# -- data files ---------------------------------------------------------------------------------
def _truncate(path, n):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - n)


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


DATA_CASES = [
    ("bin-truncated", lambda p: _truncate(p + ".bin", 3), ".bin", "truncated"),
    ("idx-truncated", lambda p: _truncate(p + ".idx", 8), ".idx", "truncated"),
    ("idx-bad-header", lambda p: _overwrite(p + ".idx", 0, b"XXXX"), ".idx", "header"),
    ("idx-float-dtype", lambda p: _overwrite(p + ".idx", 17, bytes([6])), ".idx", "float64"),
    ("bin-missing", lambda p: os.remove(p + ".bin"), ".bin", "not found"),
]


@pytest.mark.parametrize("damage, suffix, expected", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_refused_naming_the_file(tmp_path, small_docs, damage, suffix,
                                                  expected):
    prefix = write_prefix(tmp_path / "data" / "corpus", small_docs)
    damage(prefix)
    before = _snapshot(tmp_path / "data")
    message = _validate(["data=indexed", f"data.paths=[{prefix}]", "data.split='100,0,0'"],
                        tmp_path)
    assert prefix + suffix in message and expected in message and "data.paths[0]" in message
    assert _snapshot(tmp_path / "data") == before


# -- checkpoints ------------------------------------------------------------------------------
def _fake_checkpoint(save, overrides, iteration=3):
    """An iteration directory as msa-train lays it out (only the files validation reads)."""
    cfg = compose([f"run_dir={save}/../run", *overrides])
    it = os.path.join(str(save), f"iter_{iteration:07d}")
    os.makedirs(it)
    with open(os.path.join(it, "metadata.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(it, "run_config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    with open(os.path.join(str(save), "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")
    return it


CHECKPOINT_CASES = [
    ("fewer-layers", ["model.num_layers=4"], ["model.num_layers=2"],
     "model.num_layers: checkpoint 4, this config 2"),
    ("wider-model", [], ["model.hidden_size=128"], "model.hidden_size: checkpoint 64, this config 128"),
    ("other-experts", [], ["model.num_moe_experts=8"],
     "model.num_moe_experts: checkpoint 4, this config 8"),
    ("other-index-dim", [], ["attention.index_dim=16"],
     "attention.index_dim: checkpoint 32, this config 16"),
    ("other-msa-layers", [], ["attention.layer_ids=[2,3]"],
     "attention.layer_ids: checkpoint None, this config [2, 3]"),
]


@pytest.mark.parametrize("saved, now, expected", [c[1:] for c in CHECKPOINT_CASES],
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_resume_of_another_model_is_refused_and_nothing_deleted(tmp_path, saved, now, expected):
    save = tmp_path / "ckpt"
    _fake_checkpoint(save, saved)
    before = _snapshot(save)
    message = _validate([f"checkpoint.save={save}", *now], tmp_path)
    assert expected in message and "Nothing was loaded or deleted" in message, message
    assert _snapshot(save) == before


def test_checkpoint_load_of_another_model_is_refused(tmp_path):
    other = tmp_path / "other"
    _fake_checkpoint(other, [])
    message = _validate([f"checkpoint.load={other}", f"checkpoint.save={tmp_path}/new",
                         "model.num_layers=2"], tmp_path)
    assert "checkpoint.load" in message and "model.num_layers: checkpoint 4" in message


@pytest.mark.parametrize("damage, expected", [
    ("tracker-garbage", "expected an iteration number"),
    ("run-config-truncated", "run_config.yaml is damaged"),
    ("tracker-names-missing", "which is missing"),
], ids=["tracker-garbage", "run-config-truncated", "tracker-names-missing"])
def test_damaged_checkpoint_files_are_named(tmp_path, damage, expected):
    save = tmp_path / "ckpt"
    it = _fake_checkpoint(save, [])
    tracker = os.path.join(str(save), "latest_checkpointed_iteration.txt")
    if damage == "tracker-garbage":
        with open(tracker, "wb") as f:
            f.write(b"\x00\x17garbage")
    elif damage == "run-config-truncated":
        path = os.path.join(it, "run_config.yaml")
        text = open(path).read()
        with open(path, "w") as f:
            f.write(text[: len(text) // 3] + "\n  bad: [unclosed\n")
    else:
        shutil.move(it, it + ".moved")
    before = _snapshot(save)
    message = _validate([f"checkpoint.save={save}"], tmp_path)
    assert expected in message, message
    assert _snapshot(save) == before


def test_truncated_state_json_is_a_checkpoint_error(tmp_path):
    from msa_train.trainer.ckpt_layout import CheckpointError, read_state_json

    d = tmp_path / "iter_0000001"
    d.mkdir()
    (d / "msa_train_state.json").write_text(json.dumps({"progress": {"iteration": 1}})[:12])
    with pytest.raises(CheckpointError, match="msa_train_state.json is damaged"):
        read_state_json(str(d))
