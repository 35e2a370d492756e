"""tools/parallel_validation.py: layout planning (decided by the trainer's own validation), the
commands it builds (composed and validated by the trainer's own Hydra config), the bf16-noise
comparison on synthetic curves, the report, the worker's msa_kernels alias, and a 2-rank gloo run
end to end."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "parallel_validation.py"


@pytest.fixture(scope="module")
def pv():
    spec = importlib.util.spec_from_file_location("parallel_validation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parallel_validation"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("parallel_validation", None)


def small_plan(pv, tmp_path, gpus, **kw):
    return pv.build_plan(pv.PRESETS["small"], "cuda", gpus, tmp_path, **kw)


# -- layouts --------------------------------------------------------------------------------------

def test_default_layouts_per_gpu_count(pv):
    assert [l.name for l in pv.default_layouts(1)] == []
    assert [l.name for l in pv.default_layouts(2)] == ["tp2", "cp2", "ep2", "pp2"]
    assert [l.label for l in pv.default_layouts(4)] == ["TP2 x CP2", "PP2 x EP2"]
    assert [l.name for l in pv.default_layouts(8)] == ["tp2cp2", "pp2ep2"]
    with pytest.raises(ValueError, match="--gpus=3"):
        pv.default_layouts(3)


def test_parse_layout(pv):
    assert pv.parse_layout("tp2xcp2") == pv.Layout(tp=2, cp=2)
    assert pv.parse_layout("PP2+EP2") == pv.Layout(pp=2, ep=2)
    assert pv.parse_layout_list("tp2, cp2 pp2xep2") == [pv.Layout(tp=2), pv.Layout(cp=2),
                                                         pv.Layout(pp=2, ep=2)]
    for bad in ("dp2", "tp", "tp0", "tp2xtp2", ""):
        with pytest.raises(ValueError, match="--layouts"):
            pv.parse_layout(bad)


def test_layout_problems_are_the_trainers_own(pv):
    """The plan drops a layout with exactly the errors msa-train's validation would stop it with
    (small: 12 layers, 16/4 heads, 16 experts, block 128)."""
    small = pv.PRESETS["small"]
    for layout in pv.default_layouts(2):
        assert pv.layout_problems(small, "cuda", layout, 2) == []

    def why(layout, world, **preset):
        return " ".join(pv.layout_problems(dataclasses.replace(small, **preset), "cuda", layout, world))

    assert "model.num_layers=12 must be divisible by parallel.pp" in why(pv.Layout(pp=5), 5)
    assert "model.num_query_groups=4" in why(pv.Layout(tp=8), 8)
    assert "2 x parallel.cp x attention.block_size" in why(pv.Layout(cp=2), 2, seq_length=4224)
    assert "data x context parallel" in why(pv.Layout(tp=2, ep=2), 2)
    assert "train.global_batch_size=3" in why(pv.Layout(ep=2), 2, global_batch_size=3)
    assert "parallel.tp x parallel.pp x parallel.cp = 4" in why(pv.Layout(tp=2, cp=2), 2)


# -- the plan and its commands ---------------------------------------------------------------------

def test_plan_two_gpus(pv, tmp_path):
    plan = small_plan(pv, tmp_path, 2)
    names = [r.name for r in plan.runs]
    assert names == ["init", "ref", "ref_det", "ref_pert", "tp2", "cp2", "ep2", "pp2", "tp2_to_cp2"]
    assert [r.nproc for r in plan.runs] == [1, 1, 1, 1, 2, 2, 2, 2, 2]
    init = plan.run("init")
    assert "train.lr=0.0" in init.overrides and "train.lr_warmup_steps=0" in init.overrides
    assert f"stage.warmup.tokens={2 * 8192}" in init.overrides and "stage.run=warmup" in init.overrides
    # 10 warmup + 40 sparse steps of 2 x 8192 tokens
    for name in names[1:-1]:
        o = plan.run(name).overrides
        assert "stage.warmup.tokens=163840" in o and "stage.sparse.tokens=655360" in o
        assert f"checkpoint.init_from={tmp_path / 'init_ckpt'}" in o
    assert "attention.deterministic=true" in plan.run("ref_det").overrides
    assert "attention.deterministic=false" in plan.run("ref").overrides
    pert = pv.worker_command(plan.run("ref_pert"), python="py")
    assert pert[6:10] == [str(SCRIPT), "worker", f"--perturb-init={2.0 ** -8!r}", "--"]
    assert plan.run("ref_pert").overrides[-1] == "attention.deterministic=false"
    tp2 = plan.run("tp2")
    assert "checkpoint.save_interval=30" in tp2.overrides
    assert "parallel.sequence_parallel=true" in tp2.overrides
    resume = plan.run("tp2_to_cp2")
    assert resume.source == "tp2" and resume.layout == pv.Layout(cp=2)
    assert f"checkpoint.load={tmp_path / 'runs' / 'tp2' / 'ckpt' / 'iter_0000030'}" in resume.overrides
    assert not any(o.startswith("checkpoint.init_from") for o in resume.overrides)
    cmd = pv.worker_command(resume, python="py")
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "--max-restarts=0"]
    assert cmd[6:9] == [str(SCRIPT), "worker", "--"]


def test_vocab_padding_identical_at_every_tp(pv, tmp_path):
    plan = small_plan(pv, tmp_path, 4)
    products = set()
    for run in plan.runs:
        div = [int(o.split("=")[1]) for o in run.overrides if o.startswith("data.tokenizer.make_vocab")]
        products.add(div[0] * run.layout.tp)
    assert products == {256}


def test_plan_four_gpus_and_explicit_choices(pv, tmp_path):
    plan = small_plan(pv, tmp_path, 4)
    assert [r.name for r in plan.runs] == ["init", "ref", "ref_det", "ref_pert", "tp2cp2", "pp2ep2",
                                           "tp2cp2_to_pp2ep2"]
    assert plan.run("pp2ep2").layout.dp(4) == 2
    plan = small_plan(pv, tmp_path, 2, layouts=[pv.Layout(ep=2), pv.Layout(pp=5)], resume="ep2:tp2")
    assert [l.name for l in plan.layouts] == ["ep2"] and "PP5" in plan.skipped
    assert plan.runs[-1].name == "ep2_to_tp2"  # a target needs no run of its own, only to fit
    with pytest.raises(ValueError, match="source cp2"):
        small_plan(pv, tmp_path, 2, layouts=[pv.Layout(ep=2)], resume="cp2:ep2")
    with pytest.raises(ValueError, match="target PP2 x CP2"):
        small_plan(pv, tmp_path, 2, resume="tp2:pp2xcp2")
    with pytest.raises(ValueError, match="--resume-step"):
        pv.build_plan(dataclasses.replace(pv.PRESETS["small"], resume_step=5), "cuda", 2, tmp_path)


def test_global_batch_covers_every_data_parallel_size(pv, tmp_path):
    assert small_plan(pv, tmp_path, 2).preset.global_batch_size == 2
    plan = small_plan(pv, tmp_path, 8)  # PP2 x EP2 on 8 GPUs is DP4
    assert plan.preset.global_batch_size == 4 and [l.name for l in plan.layouts] == ["tp2cp2", "pp2ep2"]


def test_execution_order_and_budget(pv, tmp_path, monkeypatch):
    plan = small_plan(pv, tmp_path, 2)
    order = [[r.name for r in batch] for batch in pv.execution_order(plan)]
    assert order == [["init"], ["ref", "ref_det"], ["ref_pert"], ["tp2"], ["tp2_to_cp2"], ["cp2"],
                     ["ep2"], ["pp2"]]
    four = [[r.name for r in batch] for batch in pv.execution_order(small_plan(pv, tmp_path, 4))]
    assert four[1] == ["ref", "ref_det", "ref_pert"]  # side by side, one GPU each

    launched = []

    class FakeLaunch:
        def __init__(self, spec, plan, gpu_ids, timeout):
            self.spec = spec
            launched.append((spec.name, gpu_ids, timeout))

        def wait(self):
            ok = self.spec.name != "tp2"  # the resume source fails: its resume must not start
            return pv.RunResult(self.spec.name, 0 if ok else 1, 1.0, False, "log")

    monkeypatch.setattr(pv, "Launched", FakeLaunch)
    results = pv.execute(plan, timeout=100.0)
    assert [n for n, _, _ in launched] == ["init", "ref", "ref_det", "ref_pert", "tp2", "cp2", "ep2", "pp2"]
    assert launched[1][1] == [0] and launched[2][1] == [1] and launched[3][1] == [0]
    assert launched[4][1] is None
    assert results["tp2_to_cp2"].rc is None and "tp2 did not finish" in results["tp2_to_cp2"].log
    launched.clear()
    results = pv.execute(plan, timeout=100.0, budget=10.0)  # < timeout / 4: nothing starts
    assert launched == [] and "time budget" in results["init"].log
    assert all(r.rc is None and "init did not finish" in r.log
               for name, r in results.items() if name not in ("init", "tp2_to_cp2"))


def _fake_checkpoint(directory: Path, iteration: int) -> None:
    it = directory / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    (directory / "latest_checkpointed_iteration.txt").write_text(str(iteration))


@pytest.mark.parametrize("gpus", [2, 4])
def test_every_command_composes_and_validates(pv, tmp_path, gpus):
    """The overrides are real: Hydra composes them with the repo's configs and the trainer's
    validate_config accepts each at its world size."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from msa_train.config import register_configs
    from msa_train.config.validate import validate_config

    plan = small_plan(pv, tmp_path, gpus)
    _fake_checkpoint(tmp_path / "init_ckpt", 1)
    for src, _ in plan.resume_pairs:
        _fake_checkpoint(tmp_path / "runs" / src.name / "ckpt", plan.preset.resume_step)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for run in plan.runs:
            cfg = compose(config_name="config", overrides=run.overrides)
            validate_config(cfg, run.nproc)
            assert cfg.train.precision == "bf16" and cfg.model.name == "small"
            assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep) == (
                run.layout.tp, run.layout.pp, run.layout.cp, run.layout.ep)
    GlobalHydra.instance().clear()


# -- comparison -----------------------------------------------------------------------------------

def _curve(n, offset=0.0, noise=0.0, seed=0):
    # A decaying loss with deterministic pseudo-noise that grows along the run (like bf16 drift).
    return {s: 7.0 * math.exp(-s / 30) + 3.0 + offset + noise * (s / n) * math.sin(1.7 * s + seed)
            for s in range(1, n + 1)}



@pytest.fixture
def tol(pv):
    return pv.Tolerance(factor=3.0, rel_floor=2.0 ** -8, within_fraction=0.9, final_window=10)


def test_noise_envelope_is_a_running_max(pv):
    env = pv.noise_envelope({1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}, {1: 1.0, 2: 1.3, 3: 1.1, 4: 0.6})
    assert env == pytest.approx({1: 0.0, 2: 0.3, 3: 0.3, 4: 0.4})


def test_band_floor_and_envelope(pv, tol):
    band = pv.tolerance_band({1: 4.0, 2: 4.0}, {1: 0.0, 2: 0.1}, tol)
    assert band[1] == pytest.approx(4.0 * 2 ** -8) and band[2] == pytest.approx(0.3)


def _noise(pv, tol, ref, alt):
    gap = {s: abs(ref[s] - alt[s]) for s in ref}
    return pv.tolerance_band(ref, pv.noise_envelope(ref, alt), tol), gap


def test_layout_inside_noise_passes(pv, tol):
    ref, alt = _curve(50), _curve(50, noise=0.02, seed=1)
    band, gap = _noise(pv, tol, ref, alt)
    check = pv.compare_curves(_curve(50, noise=0.03, seed=2), ref, band, gap, tol, "ref")
    assert check.passed, check.reasons
    assert check.within_fraction >= 0.9 and check.max_abs_diff < 0.03
    assert check.mean_abs_diff < check.mean_abs_tol


def test_drift_fails_even_inside_a_loose_band(pv, tol):
    ref = _curve(50)
    alt = {s: v + 0.05 * math.sin(1.7 * s + 1) for s, v in ref.items()}  # reruns differ by ~0.03
    band, gap = _noise(pv, tol, ref, alt)
    # A steady 0.12 bias (a layout that learns slower): inside 3x the running-max envelope at
    # almost every step, but 4x the references' mean gap.
    biased = {s: v + 0.12 for s, v in ref.items()}
    check = pv.compare_curves(biased, ref, band, gap, tol, "ref")
    assert check.within_fraction >= 0.9
    assert not check.passed and any("mean |deviation|" in r for r in check.reasons)
    assert any("systematic drift" in r for r in check.reasons)


def test_wrong_layout_missing_steps_and_nan_fail(pv, tol):
    ref, alt = _curve(50), _curve(50, noise=0.01, seed=1)
    band, gap = _noise(pv, tol, ref, alt)
    wrong = pv.compare_curves(_curve(50, offset=0.2), ref, band, gap, tol, "ref")
    assert not wrong.passed and "inside the band" in wrong.reasons[0]
    short = pv.compare_curves({s: v for s, v in ref.items() if s <= 40}, ref, band, gap, tol, "ref")
    assert not short.passed and short.missing == list(range(41, 51))
    nan = dict(ref)
    nan[7] = float("nan")
    check = pv.compare_curves(nan, ref, band, gap, tol, "ref")
    assert not check.passed and check.non_finite == [7]
    assert not pv.compare_curves({}, ref, band, gap, tol, "ref").passed


def test_throughput_skips_stage_starts(pv):
    recs = [{"step": s, "stage": "dense" if s <= 4 else "sparse",
             "perf/tokens_per_sec_per_gpu": 10.0 if s in (1, 2, 5, 6) else 100.0 + s,
             "perf/tflops_per_gpu": 1.0, "mem/max_allocated_gib": float(s)} for s in range(1, 11)]
    tp = pv.throughput(recs)
    assert tp["dense/tokens_per_sec_per_gpu"] == pytest.approx(103.5)
    assert tp["sparse/tokens_per_sec_per_gpu"] == pytest.approx(108.5)
    assert tp["sparse/max_allocated_gib"] == 10.0


def _write_metrics(directory: Path, curve, warmup=10):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "metrics.jsonl", "w") as f:
        for s, v in sorted(curve.items()):
            f.write(json.dumps({"step": s, "stage": "dense" if s <= warmup else "sparse",
                                "train/lm_loss": v, "perf/tokens_per_sec_per_gpu": 1000.0}) + "\n")
        f.write('{"step": 5, "trunc')  # a killed run's partial last line is skipped


def test_report_from_fake_runs(pv, tmp_path, tol):
    plan = small_plan(pv, tmp_path, 2)
    ref = _curve(50)
    curves = {"init": {1: ref[1]}, "ref": ref, "ref_det": _curve(50, noise=0.02, seed=1),
              "ref_pert": _curve(50, noise=0.02, seed=5),
              "tp2": _curve(50, noise=0.02, seed=2), "cp2": _curve(50, noise=0.02, seed=3),
              "ep2": _curve(50, offset=0.3),  # a broken layout
              "tp2_to_cp2": {s: v for s, v in _curve(50, noise=0.02, seed=4).items() if s > 30}}
    results = {}
    for name, curve in curves.items():
        _write_metrics(tmp_path / "runs" / name, curve)
        log = tmp_path / f"{name}.log"
        log.write_text("resume: /x/iter_0000030 (step 30, stage sparse, 120 samples)\n"
                       if name == "tp2_to_cp2" else "")
        results[name] = pv.RunResult(name, 0, 1.0, False, str(log))
    results["pp2"] = pv.RunResult("pp2", None, 300.0, True, str(tmp_path / "pp2.log"))  # hung
    report = pv.build_report(plan, results, tol, "FakeGPU")
    runs = report["runs"]
    assert runs["tp2"]["passed"] and runs["cp2"]["passed"] and runs["ref_det"]["passed"]
    assert not runs["ep2"]["passed"]
    assert not runs["pp2"]["passed"] and runs["pp2"]["problems"] == ["timed out (hang)"]
    assert runs["tp2_to_cp2"]["passed"] and runs["tp2_to_cp2"]["resumed_from_step"] == 30
    assert runs["tp2_to_cp2"]["vs_source"]["steps"] == 20
    assert runs["tp2"]["throughput"]["sparse/tokens_per_sec_per_gpu"] == 1000.0
    assert not report["passed"]
    md = pv.report_markdown(report)
    table = _markdown_table(md)
    assert [row["run"] for row in table] == list(runs)  # one row per run, in run order
    rows = {row["run"]: row for row in table}
    assert rows["ref_pert"]["result"] == "noise ref" and rows["ref_pert"]["layout"] == "single"
    assert rows["ep2"]["result"] == "FAIL" and rows["ep2"]["GPUs (dp)"] == "2 (2)"
    assert rows["tp2"]["result"] == "PASS" and rows["pp2"]["result"] == "FAIL"
    assert "(ref_det, ref_pert)" in md and "timed out (hang)" in md and "Overall: FAIL" in md
    pv.write_outputs(plan, report, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"report.json", "report.md", "metrics.tar.gz"}

    # A resume whose log shows no resume (e.g. it silently started from scratch) fails.
    (tmp_path / "tp2_to_cp2.log").write_text("")
    assert not pv.build_report(plan, results, tol, "FakeGPU")["runs"]["tp2_to_cp2"]["passed"]

    # render re-evaluates a saved report.json (e.g. with another factor) without the run folders.
    out = tmp_path / "rendered"
    rc = pv.main(["render", "--report", str(tmp_path / "out" / "report.json"), "--out", str(out),
                  "--factor", "100", "--within", "0.8"])
    again = json.loads((out / "report.json").read_text())
    assert rc == 1 and again["tolerance"]["factor"] == 100.0
    ep2 = again["runs"]["ep2"]["vs_reference"]
    # 100 x the reference gap swallows the 0.3 offset in the band and the mean bound; a constant
    # offset is still a one-signed drift, which the drift bound (the references' own signed mean) flags.
    assert ep2["within_fraction"] >= 0.8 and ep2["mean_abs_diff"] < ep2["mean_abs_tol"]
    assert ep2["reasons"] and all("systematic drift" in r for r in ep2["reasons"])
    assert not again["runs"]["pp2"]["passed"]  # a hang stays a failure at any tolerance


def _markdown_table(md):
    """The first pipe table of a markdown text as a list of {header: cell} rows."""
    lines = [line.strip() for line in md.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = cells[0], [row for row in cells[1:] if not set("".join(row)) <= set("-: ")]
    assert all(len(row) == len(header) for row in body), body
    return [dict(zip(header, row)) for row in body]


# -- the worker ----------------------------------------------------------------------------------

def test_worker_aliases_kernels_without_editable_install(tmp_path):
    """With site processing off (no editable-install finder), the worker's alias still makes
    msa_kernels and its submodules importable from the checkout."""
    site = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {site!r}]\n"
            "import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('pvw', {str(SCRIPT)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['pvw'] = m; spec.loader.exec_module(m)\n"
            "try:\n    import msa_kernels\nexcept ModuleNotFoundError:\n    print('absent')\n"
            "m.ensure_msa_kernels()\n"
            "import msa_kernels, msa_kernels.layout\n"
            "print(msa_kernels.__file__, callable(msa_kernels.select_blocks))\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0] == "absent"
    assert lines[1] == str(REPO / "kernels" / "__init__.py") and lines[2] == "True"


# -- end to end on CPU -----------------------------------------------------------------------------

@pytest.mark.slow
def test_gloo_end_to_end_tp2_then_resume_at_cp2(tmp_path):
    """2 gloo ranks, tiny model, 3 fp32 steps: init, the reference, TP2 (saves at step 2),
    then that checkpoint resumed at CP2; every curve must match the reference to fp32 precision."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--device", "cpu", "--gpus", "2", "--preset", "tiny",
         "--steps", "3", "--warmup-steps", "1", "--resume-step", "2", "--layouts", "tp2",
         "--resume", "tp2:cp2", "--work", str(tmp_path / "work"), "--out", str(out),
         "--timeout", "150"],
        cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"]
    assert set(report["runs"]) == {"init", "ref", "tp2", "tp2_to_cp2"}  # CPU: no second reference
    resume = report["runs"]["tp2_to_cp2"]
    assert resume["resumed_from_step"] == 2 and resume["steps_logged"] == 1
    assert resume["vs_source"]["max_abs_diff"] < 1e-4
    assert report["runs"]["tp2"]["vs_reference"]["max_abs_diff"] < 1e-4


def test_tolerance_takes_the_widest_noise_reference(pv, tol):
    """A layout whose forward numerics differ from step 1 (TP) is as noisy as a bf16-perturbed
    rerun, not as a rerun with other backward atomics: it passes against the perturbed reference's
    gap and fails against the atomics pair alone."""
    preset = {"steps": 50, "resume_step": 30}
    ref = _curve(50)
    curves = {"ref": ref, "ref_det": _curve(50, noise=0.01, seed=1),
              "ref_pert": _curve(50, noise=0.08, seed=2), "tp2": _curve(50, noise=0.08, seed=3)}
    runs = {name: {"role": "reference" if name.startswith("ref") else "layout", "source": None,
                   "finished": True, "run_problems": []} for name in curves}

    def verdict(names):
        report = {"preset": preset, "runs": {n: dict(runs[n]) for n in names},
                  "curves": {n: {str(s): v for s, v in curves[n].items()} for n in names}}
        return pv.evaluate(report, tol)

    both = verdict(["ref", "ref_det", "ref_pert", "tp2"])
    assert both["runs"]["tp2"]["passed"] and both["noise"]["references"] == ["ref_det", "ref_pert"]
    assert not verdict(["ref", "ref_det", "tp2"])["runs"]["tp2"]["passed"]
    # A broken layout stays broken whatever the noise references say, also a small steady bias
    # that the widened band alone would let through: the drift bound stays tight.
    curves["tp2"] = _curve(50, offset=0.3)
    assert not verdict(["ref", "ref_det", "ref_pert", "tp2"])["runs"]["tp2"]["passed"]
    curves["tp2"] = {s: v + 0.1 * s / 50 for s, v in ref.items()}  # learns ever slower
    slow = verdict(["ref", "ref_det", "ref_pert", "tp2"])["runs"]["tp2"]["vs_reference"]
    assert slow["mean_abs_diff"] < slow["mean_abs_tol"]  # the widened mean bound alone would pass it
    assert not slow["passed"] and any("systematic drift" in r for r in slow["reasons"])


def test_perturb_init_moves_weights_by_about_one_bf16_step(pv, monkeypatch):
    import torch

    import msa_train.trainer.loop as loop

    monkeypatch.setattr(loop, "load_weights", lambda directory, chunks, *a, **k: "report")
    pv.perturb_loaded_weights(2.0 ** -8)
    chunk = torch.nn.Linear(64, 64).to(torch.bfloat16)
    before = chunk.weight.detach().clone()
    assert loop.load_weights("dir", [chunk]) == "report"
    moved = (chunk.weight != before).float().mean().item()
    rel = ((chunk.weight.float() - before.float()).abs() / before.float().abs().clamp_min(1e-6))
    assert 0.2 < moved < 0.8 and rel.max().item() < 0.05  # about half move, by a step or two
