"""tools/speed_switch_parity.py verdict: the switched run must stay within twice the run-to-run band."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("speed_switch_parity", REPO / "tools" / "speed_switch_parity.py")
parity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)


def test_within_band_passes_and_outside_fails():
    off_a = {1: 5.0, 2: 4.5, 3: 4.0}
    off_b = {1: 5.0, 2: 4.53, 3: 4.01}  # band 0.03 -> limit 0.06
    ok = parity.compare(off_a, off_b, {1: 5.0, 2: 4.55, 3: 4.02})
    assert ok["ok"] and ok["noise_band"] == pytest.approx(0.03) and ok["limit"] == pytest.approx(0.06)
    bad = parity.compare(off_a, off_b, {1: 5.0, 2: 4.5, 3: 4.2})
    assert not bad["ok"] and bad["max_gap"] == pytest.approx(0.2)


def test_identical_off_runs_use_the_noise_floor():
    curve = {s: 5.0 - 0.1 * s for s in range(1, 6)}
    assert parity.compare(curve, curve, {s: v + 0.015 for s, v in curve.items()})["ok"]
    assert not parity.compare(curve, curve, {s: v + 0.03 for s, v in curve.items()})["ok"]


def test_no_common_step_is_an_error():
    with pytest.raises(ValueError, match="no common step"):
        parity.compare({1: 1.0}, {2: 1.0}, {3: 1.0})
