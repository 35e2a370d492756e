"""wandb: offline by default, and a resumed job continues the same run id (offline, tmp dir)."""
import glob
from pathlib import Path
import os

import pytest

from msa_train.metrics import LoggingConfig, MetricsLogger, keys
from msa_train.metrics.wandb_run import load_run_id

REPO = Path(__file__).resolve().parents[2]
wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def _offline_run_ids(run_dir):
    # Each offline session writes <dir>/wandb/offline-run-<timestamp>-<id>[-n]/run-<id>.wandb
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    return [os.path.basename(f)[len("run-"):-len(".wandb")] for f in files]


def test_resumed_job_continues_same_wandb_run(offline_env, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = LoggingConfig(wandb=True, console=False)
    first = MetricsLogger(cfg, run_dir, group="pt-tiny", job_type="dense", wandb_config={"a": 1})
    first.log(1, {keys.LM_LOSS: 3.0})
    run_id = first.wandb_run_id
    first.close()
    assert run_id and load_run_id(run_dir, "dense") == run_id

    # The requeued job: a fresh process knows only run_dir.
    second = MetricsLogger(cfg, run_dir, group="pt-tiny", job_type="dense")
    second.log(2, {keys.LM_LOSS: 2.5})
    assert second.wandb_run_id == run_id
    second.close()

    # The next stage is another run of the same group.
    sparse = MetricsLogger(cfg, run_dir, group="pt-tiny", job_type="sparse")
    assert sparse.wandb_run_id != run_id
    sparse.close()
    assert _offline_run_ids(run_dir).count(run_id) == 2
    assert load_run_id(run_dir, "sparse") == sparse.wandb_run_id


def test_logging_none_needs_no_wandb(tmp_path):
    """logging=none (configs/logging/none.yaml) must work where wandb is not installed."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.modules["wandb"] = None  # any `import wandb` now raises ImportError
        from omegaconf import OmegaConf
        from msa_train.metrics import LoggingConfig, MetricsLogger, keys
        cfg = OmegaConf.merge(OmegaConf.structured(LoggingConfig),
                              OmegaConf.load({str(REPO / "configs/logging/none.yaml")!r}))
        with MetricsLogger(cfg, {str(tmp_path)!r}, job_type="dense") as lg:
            lg.log(1, {{keys.LM_LOSS: 1.0}})
        cfg.wandb, cfg.mode = True, "offline"
        try:
            MetricsLogger(cfg, {str(tmp_path / "w")!r}, job_type="dense")
        except ImportError as e:
            assert "logging=none" in str(e), e
        else:
            raise AssertionError("wandb=true without wandb must fail with a clear error")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "metrics.jsonl").exists()
