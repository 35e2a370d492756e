"""The pilot and 109B configs build on the meta device (no weights) with the documented counts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("name, total", [("pilot_10b", "10,521,741,312"), ("msa_109b", "109,299,557,376")])
def test_builds_on_meta_with_documented_counts(name, total):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "model_stats.py"), name, "--build", "--seq-len", "131072"],
        cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"({total})" in proc.stdout
    assert "matches the analytic count" in proc.stdout
