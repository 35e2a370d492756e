#!/usr/bin/env python
"""Parallel-layout validation: the same MSA-MoE training run at several TP/CP/EP/PP layouts vs one GPU.

Every run starts from ONE initial checkpoint and reads the same global batches, so a correct layout
reproduces the one-GPU loss curve up to bf16 rounding noise. The script
  1. writes the initial checkpoint (1 process, 1 step at lr=0: Adam's update is lr-scaled, so the
     saved weights are exactly the random init);
  2. trains one-GPU references from it: `ref`, `ref_det` (identical except attention.deterministic:
     atomics vs a fixed reduction order) and, in bf16, `ref_pert` (its initial weights perturbed by
     one bf16 rounding step, the size of the differences a TP/CP split makes in every forward GEMM).
     Their gaps to `ref` are the noise floor that derives the tolerance;
  3. trains each layout that fits the GPU count (2 GPUs: TP2, CP2, EP2, PP2; 4 GPUs: TP2xCP2,
     PP2xEP2; 8+: those two with data parallelism), each under a timeout (a hang fails the run);
  4. resumes full state (model, optimizer, scheduler, data position) saved mid-run at one layout at
     another layout and checks that the curve continues;
  5. writes report.json / report.md (per-layout pass/fail, deviations, tokens/s per GPU),
     loss_curves.png and metrics.tar.gz (every run's metrics.jsonl and log tail) to --out.

    # GPU (2 GPUs, the small model, 50 bf16 steps, seq 8192: 10 indexer-warmup + 40 sparse steps)
    PYTHONUNBUFFERED=1 python tools/parallel_validation.py run --gpus 2 --out $OUT
    # CPU / gloo smoke of the same pipeline (tiny model, fp32, a few steps)
    OMP_NUM_THREADS=1 python tools/parallel_validation.py run --preset tiny --device cpu \
        --gpus 2 --out /tmp/pv
    python tools/parallel_validation.py plan --gpus 4       # print layouts and commands only
    python tools/parallel_validation.py compare --work /tmp/pv_work --out /tmp/pv  # re-report
    python tools/parallel_validation.py render --report report.json --out DIR  # re-check, re-plot

Each run is `torchrun --standalone --nproc-per-node N <this file> worker -- <Hydra overrides>`; the
worker makes `import msa_kernels` work without an editable install (a checkout on PYTHONPATH) and
then calls msa-train's own entry point. Which layouts can run is decided by msa-train's own config
validation on the exact overrides each run uses. See docs/PARALLEL_VALIDATION.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# Presets: model size, sequence and schedule of the validation run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    model: str  # configs/model/<model>.yaml
    attention: str  # configs/attention/<attention>.yaml
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    steps: int  # optimizer steps of the whole run (indexer warmup + sparse)
    warmup_steps: int  # steps of the dense indexer-warmup stage
    resume_step: int  # the resume source saves here; the resumed run continues from it
    lr: float
    min_lr: float
    lr_warmup_steps: int
    precision: str  # bf16 on GPU; fp32 on CPU (bf16 is GPU-only in the trainer)


PRESETS: Dict[str, Preset] = {
    # 8192 tokens with 128-token blocks and top-16: each query reads at most 2048 of up to 8192 keys.
    "small": Preset(model="small", attention="paper", seq_length=8192, global_batch_size=2,
                    micro_batch_size=1, steps=50, warmup_steps=10, resume_step=30, lr=3.0e-4,
                    min_lr=3.0e-5, lr_warmup_steps=5, precision="bf16"),
    # CPU smoke: 512 tokens, 16-token blocks, top-4 (64 of up to 512 keys); seconds per step.
    "tiny": Preset(model="tiny", attention="tiny", seq_length=512, global_batch_size=4,
                   micro_batch_size=1, steps=6, warmup_steps=2, resume_step=4, lr=3.0e-3,
                   min_lr=3.0e-4, lr_warmup_steps=2, precision="fp32"),
}


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("cp", self.cp), ("ep", self.ep))
                 if v > 1]
        return "".join(parts) or "single"

    @property
    def label(self) -> str:
        parts = [f"{k.upper()}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("cp", self.cp),
                                                ("ep", self.ep)) if v > 1]
        return " x ".join(parts) or "single"

    def dp(self, world: int) -> int:
        return world // self.model_parallel


def parse_layout(text: str) -> Layout:
    """'tp2', 'tp2xcp2', 'pp2+ep2' (factors joined by x or +) -> Layout."""
    fields: Dict[str, int] = {}
    for token in text.lower().replace("+", "x").split("x"):
        token = token.strip()
        if not token:
            continue
        key, digits = token[:2], token[2:]
        if key not in ("tp", "pp", "cp", "ep") or not digits.isdigit() or int(digits) < 1:
            raise ValueError(f"--layouts: cannot parse {text!r} (use e.g. tp2, cp2, tp2xcp2, pp2xep2)")
        if key in fields:
            raise ValueError(f"--layouts: {key} given twice in {text!r}")
        fields[key] = int(digits)
    if not fields:
        raise ValueError(f"--layouts: empty layout {text!r}")
    return Layout(**fields)


def parse_layout_list(text: str) -> List[Layout]:
    """'tp2,cp2 ep2' (comma or space separated) -> layouts."""
    return [parse_layout(item) for item in text.replace(",", " ").split()]


def default_layouts(num_gpus: int) -> List[Layout]:
    """The layouts the validation runs at this GPU count (the rest of the GPUs is data parallel)."""
    if num_gpus < 1 or num_gpus & (num_gpus - 1):
        raise ValueError(f"--gpus={num_gpus}: use a power of two (1, 2, 4, 8, ...)")
    if num_gpus == 1:
        return []
    if num_gpus == 2:
        return [Layout(tp=2), Layout(cp=2), Layout(ep=2), Layout(pp=2)]
    return [Layout(tp=2, cp=2), Layout(pp=2, ep=2)]


def layout_problems(preset: Preset, device: str, layout: Layout, world: int) -> List[str]:
    """Why msa-train would refuse `layout` on `world` ranks (empty: it runs). The trainer's own
    validation decides, on the overrides a run at this layout uses (paths are not checked: the
    checkpoints do not exist yet when the plan is made)."""
    from msa_train.config.validate import ConfigError, validate_config
    from msa_train.dry_run import compose

    overrides = run_overrides(preset, device, Path("/nonexistent"), layout.name, layout, layout.tp)
    try:
        validate_config(compose(overrides), world, check_paths=False)
    except ConfigError as exc:
        return [line.strip()[2:] for line in str(exc).splitlines() if line.strip().startswith("- ")]
    return []


def default_resume_pairs(layouts: Sequence[Layout]) -> List[Tuple[Layout, Layout]]:
    """Save at one layout, resume at another: TP2 -> CP2 on 2 GPUs, TP2xCP2 -> PP2xEP2 on 4+."""
    names = {layout.name: layout for layout in layouts}
    if "tp2" in names and "cp2" in names:
        return [(names["tp2"], names["cp2"])]
    if len(layouts) >= 2:
        return [(layouts[0], layouts[1])]
    return []


def parse_resume(text: str, layouts: Sequence[Layout],
                 problems_of: Callable[[Layout], List[str]]) -> List[Tuple[Layout, Layout]]:
    """'tp2:cp2,ep2:tp2' -> pairs. The source must be a planned layout (its run writes the
    checkpoint); the target only has to fit (problems_of(target) empty)."""
    known = {layout.name: layout for layout in layouts}
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if ":" not in item:
            raise ValueError(f"--resume: {item!r} is not SOURCE:TARGET (e.g. tp2:cp2)")
        src, dst = (parse_layout(s) for s in item.split(":", 1))
        if src.name not in known:
            raise ValueError(f"--resume: source {src.name} is not one of the planned layouts "
                             f"{sorted(known)} (add it to --layouts)")
        if src == dst:
            raise ValueError(f"--resume: {item!r} saves and resumes at the same layout")
        problems = problems_of(dst)
        if problems:
            raise ValueError(f"--resume: target {dst.label} cannot run here: " + "; ".join(problems))
        pairs.append((known[src.name], dst))
    return pairs


# ------------------------------------------------------------------------------------------------
# Runs and their commands
# ------------------------------------------------------------------------------------------------

INIT, REF, REF_ALT, REF_PERT = "init", "ref", "ref_det", "ref_pert"
# Relative size of ref_pert's weight perturbation: bf16 keeps 8 significant bits, so 2^-8 x N(0, 1)
# moves about half of the weights by one rounding step, the size of the rounding differences a
# TP/CP layout makes from its first forward on (different GEMM splits and reduction orders).
PERTURB_REL = 2.0 ** -8


@dataclass
class RunSpec:
    name: str
    role: str  # init | reference | layout | resume
    layout: Layout
    nproc: int
    overrides: List[str]
    source: Optional[str] = None  # resume: the run whose checkpoint it loads
    worker_args: List[str] = field(default_factory=list)  # worker options before the overrides


@dataclass
class Plan:
    preset: Preset
    device: str  # cuda | cpu
    num_gpus: int
    work: Path
    layouts: List[Layout]
    skipped: Dict[str, List[str]]
    resume_pairs: List[Tuple[Layout, Layout]]
    runs: List[RunSpec] = field(default_factory=list)

    def run(self, name: str) -> RunSpec:
        for spec in self.runs:
            if spec.name == name:
                return spec
        raise KeyError(name)


def resume_name(src: Layout, dst: Layout) -> str:
    return f"{src.name}_to_{dst.name}"


def stage_tokens(preset: Preset) -> Tuple[int, int]:
    per_step = preset.global_batch_size * preset.seq_length
    return preset.warmup_steps * per_step, (preset.steps - preset.warmup_steps) * per_step


def vocab_divisor(layout_tp: int, max_tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of divisor x TP; a fixed divisor x TP product
    keeps the embedding shape (and so the initial checkpoint) identical at every TP size."""
    return 128 * max_tp // layout_tp


def base_overrides(plan: Plan, name: str, layout: Layout, max_tp: int) -> List[str]:
    return run_overrides(plan.preset, plan.device, plan.work, name, layout, max_tp)


def run_overrides(p: Preset, device: str, work: Path, name: str, layout: Layout, max_tp: int) -> List[str]:
    """msa-train's Hydra overrides of one run (without its checkpoint source or save)."""
    warmup_tokens, sparse_tokens = stage_tokens(p)
    return [
        f"name=pv_{name}", f"run_dir={work / 'runs' / name}",
        f"model={p.model}", f"attention={p.attention}", "data=stdlib", "logging=debug",
        # On GPUs the Triton kernels, never a silent fallback to the PyTorch reference.
        f"attention.kernels={'triton' if device == 'cuda' else 'auto'}",
        "logging.log_interval=1", "logging.recall_interval=0", "logging.plot_at_end=false",
        "logging.wandb=false", "stage.run=both",
        f"stage.warmup.tokens={warmup_tokens}", f"stage.sparse.tokens={sparse_tokens}",
        f"train.seq_length={p.seq_length}", f"train.global_batch_size={p.global_batch_size}",
        f"train.micro_batch_size={p.micro_batch_size}", f"train.lr={p.lr}", f"train.min_lr={p.min_lr}",
        f"train.lr_warmup_steps={p.lr_warmup_steps}", f"train.device={device}",
        f"train.precision={p.precision}", "train.eval_interval=null",
        f"data.tokenizer.make_vocab_size_divisible_by={vocab_divisor(layout.tp, max_tp)}",
        f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", f"parallel.cp={layout.cp}",
        f"parallel.ep={layout.ep}", f"parallel.sequence_parallel={str(layout.tp > 1).lower()}",
        "parallel.world_size=null",
        "checkpoint=none",
    ]


def build_plan(preset: Preset, device: str, num_gpus: int, work: Path,
               layouts: Optional[Sequence[Layout]] = None, resume: Optional[str] = None) -> Plan:
    if preset.resume_step <= preset.warmup_steps or preset.resume_step >= preset.steps:
        raise ValueError(f"--resume-step={preset.resume_step} must lie inside the sparse stage "
                         f"({preset.warmup_steps} < step < {preset.steps})")
    if not 0 < preset.warmup_steps < preset.steps:
        raise ValueError(f"--warmup-steps={preset.warmup_steps} must be in 1..--steps-1={preset.steps - 1}")
    candidates = list(layouts) if layouts is not None else default_layouts(num_gpus)
    # Every run reads the same global batches: make the batch divisible by each layout's DP size.
    batch = preset.global_batch_size
    for layout in candidates:
        if num_gpus % layout.model_parallel == 0:
            batch = math.lcm(batch, preset.micro_batch_size * layout.dp(num_gpus))
    if batch != preset.global_batch_size:
        print(f"global batch {preset.global_batch_size} -> {batch} (a multiple of every layout's "
              "micro batch x data-parallel size)", flush=True)
        preset = dataclasses.replace(preset, global_batch_size=batch)
    good, skipped = [], {}
    for layout in candidates:
        problems = layout_problems(preset, device, layout, num_gpus)
        if layout.model_parallel == 1 and layout.ep == 1:
            problems.append("a pure data-parallel layout is not what this validates")
        if problems:
            skipped[layout.label] = problems
        else:
            good.append(layout)

    def problems_of(layout: Layout) -> List[str]:
        return layout_problems(preset, device, layout, num_gpus)

    pairs = parse_resume(resume, good, problems_of) if resume is not None else default_resume_pairs(good)
    plan = Plan(preset=preset, device=device, num_gpus=num_gpus, work=work, layouts=good,
                skipped=skipped, resume_pairs=pairs)
    max_tp = max([layout.tp for layout in good] + [1])
    single = Layout()
    init_dir = work / "init_ckpt"
    # 1 step at lr=0 and no LR warmup: the checkpoint holds the untouched initial weights.
    init = base_overrides(plan, INIT, single, max_tp)
    init = [o for o in init if not o.startswith(("stage.", "train.lr", "train.min_lr"))]
    init += ["stage.run=warmup", f"stage.warmup.tokens={preset.global_batch_size * preset.seq_length}",
             "stage.sparse.tokens=0", "train.lr=0.0", "train.min_lr=0.0", "train.lr_warmup_steps=0",
             f"checkpoint.save={init_dir}", "checkpoint.save_at_stage_end=true"]
    plan.runs.append(RunSpec(INIT, "init", single, 1, init))
    from_init = [f"checkpoint.init_from={init_dir}"]
    plan.runs.append(RunSpec(REF, "reference", single, 1,
                             base_overrides(plan, REF, single, max_tp) + from_init
                             + ["attention.deterministic=false"]))
    if device == "cuda":
        # On CPU the kernels run the PyTorch reference, deterministic either way: a second
        # reference would be identical by construction, and the tolerance is the fp32 floor.
        plan.runs.append(RunSpec(REF_ALT, "reference", single, 1,
                                 base_overrides(plan, REF_ALT, single, max_tp) + from_init
                                 + ["attention.deterministic=true"]))
        if preset.precision == "bf16":
            # The pair above differs only in backward atomics: bitwise equal at step 1. A layout's
            # forward differs from step 1 (other GEMM splits, bf16 all-reduces, top-k near-ties
            # flipping), noise the pair cannot show; a bf16-sized weight perturbation does.
            plan.runs.append(RunSpec(REF_PERT, "reference", single, 1,
                                     base_overrides(plan, REF_PERT, single, max_tp) + from_init
                                     + ["attention.deterministic=false"],
                                     worker_args=[f"--perturb-init={PERTURB_REL!r}"]))
    sources = {src.name for src, _ in pairs}
    for layout in good:
        overrides = base_overrides(plan, layout.name, layout, max_tp) + from_init
        if layout.name in sources:
            # Full state at resume_step only (no stage-end saves: they cost time, nobody reads them).
            overrides += [f"checkpoint.save={work / 'runs' / layout.name / 'ckpt'}",
                          f"checkpoint.save_interval={preset.resume_step}",
                          "checkpoint.save_at_stage_end=false", "checkpoint.keep_last_k=null"]
        plan.runs.append(RunSpec(layout.name, "layout", layout, num_gpus, overrides))
    for src, dst in pairs:
        name = resume_name(src, dst)
        ckpt = work / "runs" / src.name / "ckpt" / f"iter_{preset.resume_step:07d}"
        overrides = base_overrides(plan, name, dst, max_tp) + [f"checkpoint.load={ckpt}"]
        plan.runs.append(RunSpec(name, "resume", dst, num_gpus, overrides, source=src.name))
    return plan


def worker_command(spec: RunSpec, python: str = sys.executable, script: Path = Path(__file__)) -> List[str]:
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec.nproc}",
           "--max-restarts=0", str(script), "worker", *spec.worker_args]
    return cmd + ["--"] + list(spec.overrides)


def run_env(plan: Plan, gpu_ids: Optional[Sequence[int]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore",
               TRITON_CACHE_DIR=str(plan.work / "triton_cache"),  # compile once for all runs
               # NVLink multicast stays off on shared hosts (it can take the GPUs out of service).
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env.setdefault("OMP_NUM_THREADS", "1" if plan.device == "cpu" else "4")
    if plan.device == "cuda":
        if gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
    return env


# ------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    rc: Optional[int]
    seconds: float
    timed_out: bool
    log: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


class Launched:
    """One run in flight: its own process group, so a hang is killed with all its ranks."""

    def __init__(self, spec: RunSpec, plan: Plan, gpu_ids: Optional[Sequence[int]], timeout: float):
        self.spec, self.timeout = spec, timeout
        self.log_path = plan.work / "logs" / f"{spec.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 (the child writes it until wait())
        self._log.write("$ " + " ".join(worker_command(spec)) + "\n")
        self._log.flush()
        self.t0 = time.time()
        self.proc = subprocess.Popen(worker_command(spec), cwd=REPO, env=run_env(plan, gpu_ids),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> RunResult:
        timed_out = False
        try:
            rc = self.proc.wait(timeout=max(1.0, self.timeout - (time.time() - self.t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(self.proc)
            rc = self.proc.returncode
        self._log.close()
        result = RunResult(self.spec.name, rc, round(time.time() - self.t0, 1), timed_out,
                           str(self.log_path))
        status = "TIMEOUT (hang?)" if timed_out else f"rc={rc}"
        print(f"[{self.spec.name}] {status} in {result.seconds:.0f} s  ({self.log_path})", flush=True)
        if not result.ok:
            print(_tail(self.log_path, 40), flush=True)
        return result


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def execution_order(plan: Plan) -> List[List[RunSpec]]:
    """Batches of runs, each batch after the previous: the init, the references (side by side on
    separate GPUs when there are 2+), then the resume sources with their resumes right after (so a
    short time budget still covers a cross-layout resume), then the other layouts."""
    refs = [s for s in plan.runs if s.role == "reference"]
    width = max(1, plan.num_gpus) if plan.device == "cuda" else 1
    ref_batches = [refs[i:i + width] for i in range(0, len(refs), width)]
    sources = {s.source for s in plan.runs if s.role == "resume"}
    batches = [[plan.run(INIT)]] + ref_batches
    for spec in plan.runs:
        if spec.role == "layout" and spec.name in sources:
            batches.append([spec])
            batches += [[r] for r in plan.runs if r.role == "resume" and r.source == spec.name]
    batches += [[s] for s in plan.runs if s.role == "layout" and s.name not in sources]
    return batches


def execute(plan: Plan, timeout: float, budget: Optional[float] = None) -> Dict[str, RunResult]:
    """Run the batches of execution_order. A run whose prerequisite failed, or that would start
    with less than `timeout` / 4 of the time budget left, is recorded as not run; a run's timeout
    never reaches past the budget, so the report is always written in time."""
    results: Dict[str, RunResult] = {}
    t_start = time.time()

    def skip(spec: RunSpec, why: str) -> None:
        print(f"[{spec.name}] not run: {why}", flush=True)
        results[spec.name] = RunResult(spec.name, None, 0.0, False, f"not run: {why}")

    for batch in execution_order(plan):
        left = math.inf if budget is None else budget - (time.time() - t_start)
        launch = []
        for spec in batch:
            need = INIT if spec.name != INIT else None
            if spec.role == "resume":
                need = spec.source
            if need is not None and not (need in results and results[need].ok):
                skip(spec, f"{need} did not finish")
            elif left < timeout / 4:
                skip(spec, f"time budget: {max(left, 0):.0f} s left of --budget {budget:.0f}")
            else:
                launch.append(spec)
        # One-rank runs of a batch get a GPU each; multi-rank runs see every GPU.
        running = [Launched(spec, plan, [i] if plan.device == "cuda" and spec.nproc == 1 else None,
                            min(timeout, left)) for i, spec in enumerate(launch)]
        for item in running:
            results[item.spec.name] = item.wait()
    return results


# ------------------------------------------------------------------------------------------------
# Comparison (pure functions on {step: value} curves)
# ------------------------------------------------------------------------------------------------

LM_LOSS = "train/lm_loss"
TOKENS_PER_GPU = "perf/tokens_per_sec_per_gpu"
TFLOPS_PER_GPU = "perf/tflops_per_gpu"
MAX_MEM = "mem/max_allocated_gib"

# bf16 keeps 8 significant bits: unit roundoff 2^-8 = 0.39 %. No correct layout needs more than
# this relative slack at any step, noise envelope or not (it also covers steps where the two
# references happen to agree exactly, e.g. a warmup stage without atomics).
BF16_REL_FLOOR = 2.0 ** -8
FP32_REL_FLOOR = 1.0e-5


@dataclass(frozen=True)
class Tolerance:
    factor: float  # x the references' noise envelope
    rel_floor: float  # x |reference loss|
    within_fraction: float  # share of steps that must lie inside the band
    final_window: int  # steps whose mean deviation must lie inside the band (no drift)


def noise_envelope(a: Dict[int, float], b: Dict[int, float]) -> Dict[int, float]:
    """Running max over steps of |a - b|: bf16 differences only grow along a training run, so the
    gap two equivalent runs reached by step s bounds what an equivalent layout may show there."""
    env, worst = {}, 0.0
    for step in sorted(set(a) & set(b)):
        worst = max(worst, abs(a[step] - b[step]))
        env[step] = worst
    return env


def tolerance_band(ref: Dict[int, float], envelope: Dict[int, float], tol: Tolerance) -> Dict[int, float]:
    return {s: max(tol.factor * envelope.get(s, 0.0), tol.rel_floor * abs(v)) for s, v in ref.items()}


@dataclass
class CurveCheck:
    against: str
    steps: int
    missing: List[int]
    non_finite: List[int]
    max_abs_diff: Optional[float]
    max_diff_over_tol: Optional[float]
    within_fraction: Optional[float]
    first_step_diff: Optional[float]
    mean_abs_diff: Optional[float]
    mean_abs_tol: Optional[float]
    final_mean_diff: Optional[float]
    passed: bool
    reasons: List[str]


def compare_curves(candidate: Dict[int, float], ref: Dict[int, float], band: Dict[int, float],
                   gap: Dict[int, float], tol: Tolerance, against: str,
                   steps: Optional[Sequence[int]] = None, drift_tol: Optional[float] = None) -> CurveCheck:
    """candidate vs ref at `steps` (default: every ref step); gap = |ref - second reference| per step.

    Passes when every step is present and finite and
      - at least tol.within_fraction of the steps lie inside the per-step band (no excursion far
        beyond what the references ever showed by then);
      - the mean |deviation| is at most tol.factor x the references' mean gap over the same steps
        (floor: the mean of rel_floor x |ref|): a layout as noisy as a rerun, not more;
      - the mean SIGNED deviation over the last tol.final_window steps is inside `drift_tol`
        (default: that same bound): a wrong layout (a causal leak, a missing gradient reduction)
        trains faster or slower, which shows up as drift long before it shows up in any single step.
    """
    steps = sorted(ref) if steps is None else sorted(steps)
    missing = [s for s in steps if s not in candidate or s not in ref]
    present = [s for s in steps if s in candidate and s in ref]
    non_finite = [s for s in present if not math.isfinite(candidate[s])]
    good = [s for s in present if math.isfinite(candidate[s])]
    reasons = []
    if missing:
        reasons.append(f"{len(missing)} steps missing (first {missing[:5]})")
    if non_finite:
        reasons.append(f"non-finite loss at steps {non_finite[:5]}")
    if not good:
        return CurveCheck(against, len(steps), missing, non_finite, None, None, None, None, None, None,
                          None, False, reasons or ["no steps to compare"])
    diffs = {s: candidate[s] - ref[s] for s in good}
    ratios = {s: abs(d) / band[s] if band[s] > 0 else (0.0 if d == 0 else math.inf)
              for s, d in diffs.items()}
    within = sum(r <= 1.0 for r in ratios.values()) / len(ratios)
    if within < tol.within_fraction:
        worst = max(ratios, key=ratios.get)
        reasons.append(f"only {within:.0%} of steps inside the band (need {tol.within_fraction:.0%}); "
                       f"worst step {worst}: |diff| {abs(diffs[worst]):.4g} vs band {band[worst]:.4g}")
    mean_abs = statistics.fmean(abs(d) for d in diffs.values())
    mean_tol = max(tol.factor * statistics.fmean(gap.get(s, 0.0) for s in good),
                   tol.rel_floor * statistics.fmean(abs(ref[s]) for s in good))
    if mean_abs > mean_tol:
        reasons.append(f"mean |deviation| {mean_abs:.4g} exceeds {mean_tol:.4g} ({tol.factor:g} x the "
                       "references' mean gap)")
    tail = good[-tol.final_window:]
    final_diff = statistics.fmean(diffs[s] for s in tail)
    drift_bound = mean_tol if drift_tol is None else drift_tol
    if abs(final_diff) > drift_bound:
        reasons.append(f"mean deviation over the last {len(tail)} steps {final_diff:+.4g} exceeds "
                       f"{drift_bound:.4g} (systematic drift)")
    return CurveCheck(against=against, steps=len(steps), missing=missing, non_finite=non_finite,
                      max_abs_diff=max(abs(d) for d in diffs.values()),
                      max_diff_over_tol=max(ratios.values()), within_fraction=within,
                      first_step_diff=diffs[good[0]], mean_abs_diff=mean_abs, mean_abs_tol=mean_tol,
                      final_mean_diff=final_diff, passed=not reasons, reasons=reasons)


def throughput(records: List[dict], skip_after_stage_start: int = 2) -> Dict[str, Optional[float]]:
    """Median tokens/s and TFLOP/s per GPU per stage, leaving out each stage's first steps (Triton
    compilation, allocator warmup) and any step that logged no rate."""
    out: Dict[str, Optional[float]] = {}
    by_stage: Dict[str, List[dict]] = {}
    for rec in sorted(records, key=lambda r: r["step"]):
        by_stage.setdefault(str(rec.get("stage")), []).append(rec)
    for stage, recs in by_stage.items():
        steady = recs[skip_after_stage_start:] or recs[-1:]
        for key, short in ((TOKENS_PER_GPU, "tokens_per_sec_per_gpu"), (TFLOPS_PER_GPU, "tflops_per_gpu")):
            values = [float(r[key]) for r in steady if isinstance(r.get(key), (int, float))]
            out[f"{stage}/{short}"] = statistics.median(values) if values else None
        mem = [float(r[MAX_MEM]) for r in recs if isinstance(r.get(MAX_MEM), (int, float))]
        out[f"{stage}/max_allocated_gib"] = max(mem) if mem else None
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def read_run_metrics(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a killed run's partial last line
            if isinstance(rec, dict) and "step" in rec:
                records[int(rec["step"])] = rec  # a resumed run's later record of a step wins
    return [records[s] for s in sorted(records)]


def loss_curve(records: List[dict]) -> Dict[int, float]:
    return {int(r["step"]): float(r[LM_LOSS]) for r in records if r.get(LM_LOSS) is not None}


def _log_says_resumed(log_path: str, step: int) -> bool:
    text = Path(log_path).read_text(errors="replace") if Path(log_path).is_file() else ""
    return "resume: " in text and f"(step {step}," in text


def build_report(plan: Plan, results: Dict[str, RunResult], tol: Tolerance, device_name: str) -> dict:
    """Collect what each run produced (exit status, loss curve, throughput), then evaluate()."""
    p = plan.preset
    report = {"device": device_name, "num_gpus": plan.num_gpus, "preset": dataclasses.asdict(p),
              "skipped_layouts": plan.skipped, "runs": {}, "curves": {}}
    for spec in plan.runs:
        res = results.get(spec.name)
        records = read_run_metrics(plan.work / "runs" / spec.name)
        report["curves"][spec.name] = {str(s): v for s, v in loss_curve(records).items()}
        ok = res is not None and res.ok
        problems = []
        if not ok:
            problems.append("timed out (hang)" if res and res.timed_out else
                            (res.log if res and res.rc is None else f"exit code {res.rc if res else None}"))
        if spec.role == "resume" and ok and not _log_says_resumed(res.log, p.resume_step):
            problems.append(f"the log does not show a resume from step {p.resume_step}")
        report["runs"][spec.name] = {
            "role": spec.role, "source": spec.source, "layout": spec.layout.label, "nproc": spec.nproc,
            "dp": spec.layout.dp(spec.nproc), "rc": None if res is None else res.rc,
            "seconds": None if res is None else res.seconds, "timed_out": bool(res and res.timed_out),
            "finished": ok, "run_problems": problems, "throughput": throughput(records)}
    return evaluate(report, tol)


def evaluate(report: dict, tol: Tolerance) -> dict:
    """(Re)compute every check of `report` from its curves: the noise envelope of the reference
    pair, each layout vs the reference, each resume vs its source and the reference."""
    p = report["preset"]
    curves = {name: {int(s): v for s, v in c.items()} for name, c in report["curves"].items()}
    ref = curves.get(REF, {})
    # Every second reference is an equally valid rerun; the noise floor is their widest gap to ref.
    # Without any (CPU: the PyTorch reference is deterministic) the floor is rel_floor alone.
    others = [curves.get(n, {}) for n in (REF_ALT, REF_PERT) if n in report["runs"]] or [ref]
    gap = {s: max(abs(ref[s] - o[s]) for o in others) for s in ref if all(s in o for o in others)}
    envelopes = [noise_envelope(ref, o) for o in others]
    envelope = {s: max(e.get(s, 0.0) for e in envelopes) for s in set().union(*envelopes)}
    band = tolerance_band(ref, envelope, tol)
    # Drift bound: how far the noise references' own signed mean over the final window strays.
    # Chaotic bf16 noise has a wide envelope but averages out in sign; a layout bug does not, so
    # this bound stays tight when a perturbed reference widens the band.
    window = sorted(ref)[-tol.final_window:]
    drift_noise = max((abs(statistics.fmean(o[s] - ref[s] for s in window))
                       for o in others if window and all(s in o for s in window)), default=0.0)
    drift_tol = max(tol.factor * drift_noise,
                    tol.rel_floor * statistics.fmean(abs(ref[s]) for s in window) if window else 0.0)
    report.update(tolerance=dataclasses.asdict(tol), passed=True, problems=[], noise={
        "drift_tol": drift_tol,
        "references": [n for n in (REF_ALT, REF_PERT) if n in report["runs"]],
        "max_abs_ref_gap": max(envelope.values()) if envelope else None,
        "mean_abs_ref_gap": statistics.fmean(gap.values()) if gap else None,
        "first_step_ref_gap": envelope.get(1)})
    if len(ref) < p["steps"] or any(len(o) < p["steps"] for o in others):
        report["problems"].append("a reference run did not log every step: no tolerance")
    for name, entry in report["runs"].items():
        entry["steps_logged"] = len(curves.get(name, {}))
        entry["problems"] = list(entry["run_problems"])
        checks = []
        if entry["role"] == "resume":
            steps = list(range(p["resume_step"] + 1, p["steps"] + 1))
            entry["vs_source"] = dataclasses.asdict(compare_curves(
                curves.get(name, {}), curves.get(entry["source"], {}), band, gap, tol, entry["source"],
                steps, drift_tol))
            entry["vs_reference"] = dataclasses.asdict(compare_curves(
                curves.get(name, {}), ref, band, gap, tol, REF, steps, drift_tol))
            checks = [entry["vs_source"], entry["vs_reference"]]
            early = [s for s in curves.get(name, {}) if s <= p["resume_step"]]
            if early:
                entry["problems"].append(f"logged steps {early[:3]}... at or before the resume step")
            resumed = entry["finished"] and not any("resume from" in x for x in entry["problems"])
            entry["resumed_from_step"] = p["resume_step"] if resumed else None
        elif entry["role"] in ("layout", "reference") and name != REF:
            entry["vs_reference"] = dataclasses.asdict(compare_curves(
                curves.get(name, {}), ref, band, gap, tol, REF, list(range(1, p["steps"] + 1)),
                drift_tol))
            checks = [entry["vs_reference"]]
        entry["passed"] = entry["finished"] and not entry["problems"] and all(c["passed"] for c in checks)
        report["passed"] &= bool(entry["passed"])
    report["passed"] &= not report["problems"]
    return report


def _fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def report_markdown(report: dict) -> str:
    p = report["preset"]
    t = report["tolerance"]
    lines = [
        f"# Parallel validation: {report['device']} x {report['num_gpus']}",
        "",
        (f"model={p['model']} attention={p['attention']} seq={p['seq_length']} "
         f"global_batch={p['global_batch_size']} micro_batch={p['micro_batch_size']} "
         f"steps={p['steps']} (warmup {p['warmup_steps']} + sparse {p['steps'] - p['warmup_steps']}) "
         f"precision={p['precision']} resume_step={p['resume_step']}"),
        "",
        (f"Band at step s: max({t['factor']:g} x running max |ref - other| up to s, "
         f"{t['rel_floor']:.3g} x |ref loss|), other = the widest of the second references "
         f"({', '.join(report['noise'].get('references') or ['none'])}). Pass = every step logged and "
         f"finite, >= {t['within_fraction']:.0%} of steps inside the band, mean |diff| <= tol = "
         f"max({t['factor']:g} x mean |ref - other|, {t['rel_floor']:.3g} x mean |ref loss|) over "
         f"the compared steps, and |mean diff| of the last {t['final_window']} steps <= drift tol = "
         f"max({t['factor']:g} x the largest |mean (other - ref)| over those steps, "
         f"{t['rel_floor']:.3g} x mean |ref loss|) = {_fmt(report['noise'].get('drift_tol'), '.4g')}. "
         f"Reference gap: mean {_fmt(report['noise'].get('mean_abs_ref_gap'), '.4g')}, max "
         f"{_fmt(report['noise']['max_abs_ref_gap'], '.4g')}, step 1 "
         f"{_fmt(report['noise']['first_step_ref_gap'], '.4g')}."),
        "",
        ("| run | layout | GPUs (dp) | result | step-1 diff | max abs diff | max diff/band | in band | "
         "mean abs diff / tol | last-window mean diff | dense tok/s/GPU | sparse tok/s/GPU | "
         "sparse TFLOP/s/GPU | wall s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        c = r.get("vs_source") or r.get("vs_reference") or {}
        tp = r["throughput"]
        result = "PASS" if r["passed"] else "FAIL"
        if r["role"] == "reference" and name != REF:
            result = "noise ref" if r["passed"] else "FAIL (noise ref)"  # inside its own band by design
        lines.append(
            f"| {name} | {r['layout']} | {r['nproc']} ({r['dp']}) | {result} | "
            f"{_fmt(c.get('first_step_diff'), '+.2e')} | {_fmt(c.get('max_abs_diff'), '.2e')} | "
            f"{_fmt(c.get('max_diff_over_tol'), '.2f')} | {_fmt(c.get('within_fraction'), '.0%')} | "
            f"{_fmt(c.get('mean_abs_diff'), '.2e')} / {_fmt(c.get('mean_abs_tol'), '.2e')} | "
            f"{_fmt(c.get('final_mean_diff'), '+.2e')} | "
            f"{_fmt(tp.get('dense/tokens_per_sec_per_gpu'), ',.0f')} | "
            f"{_fmt(tp.get('sparse/tokens_per_sec_per_gpu'), ',.0f')} | "
            f"{_fmt(tp.get('sparse/tflops_per_gpu'), '.1f')} | {_fmt(r['seconds'], '.0f')} |")
    lines.append("")
    lines.append("Resume runs are compared with their source layout (and the reference) on the steps "
                 "after the resume step only.")
    for name, r in report["runs"].items():
        why = list(r.get("problems", []))
        for key in ("vs_reference", "vs_source"):
            if key in r and not r[key]["passed"]:
                why += [f"{key}: {x}" for x in r[key]["reasons"]]
        if why:
            lines.append(f"- {name}: " + "; ".join(why))
    for label, problems in report["skipped_layouts"].items():
        lines.append(f"- skipped {label}: " + "; ".join(problems))
    for problem in report["problems"]:
        lines.append(f"- {problem}")
    lines.append("")
    lines.append(f"**Overall: {'PASS' if report['passed'] else 'FAIL'}**")
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = {k: {int(s): v for s, v in c.items()} for k, c in report["curves"].items() if c}
    ref = curves.get(REF, {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [name for name in curves if name != INIT]
    for i, name in enumerate(names):
        c, color = curves[name], palette[i % len(palette)]  # one colour per run in both panels
        steps = sorted(c)
        ax1.plot(steps, [c[s] for s in steps], label=name, lw=1.2, color=color)
        common = [s for s in steps if s in ref]
        if name != REF and common:
            ax2.plot(common, [c[s] - ref[s] for s in common], label=name, lw=1.0, color=color)
    ax1.set(xlabel="step", ylabel="train/lm_loss", title="loss")
    ax2.set(xlabel="step", ylabel="loss - ref", title="deviation from the 1-GPU reference")
    ax2.axhline(0.0, color="k", lw=0.5)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['device']} x {report['num_gpus']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(plan: Plan, report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    plot_curves(report, out / "loss_curves.png")
    # One archive (the device tool returns few files): each run's metrics and the tail of its log.
    with tarfile.open(out / "metrics.tar.gz", "w:gz") as tar:
        for spec in plan.runs:
            metrics = plan.work / "runs" / spec.name / "metrics.jsonl"
            if metrics.is_file():
                tar.add(metrics, arcname=f"{spec.name}/metrics.jsonl")
            log = plan.work / "logs" / f"{spec.name}.log"
            if log.is_file():
                tail = plan.work / "logs" / f"{spec.name}.tail.log"
                tail.write_text(_tail(log, 300) + "\n")
                tar.add(tail, arcname=f"{spec.name}/log_tail.txt")


# ------------------------------------------------------------------------------------------------
# Worker (the torchrun entry point)
# ------------------------------------------------------------------------------------------------


def ensure_msa_kernels() -> None:
    """`import msa_kernels` maps to ./kernels through the editable install; a checkout run from
    PYTHONPATH (the GPU box) lacks it, so register the folder under that name."""
    try:
        import msa_kernels  # noqa: F401
        return
    except ModuleNotFoundError as exc:
        if exc.name != "msa_kernels":
            raise
    init = REPO / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location("msa_kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["msa_kernels"] = module
    spec.loader.exec_module(module)


def perturb_loaded_weights(rel: float, seed: int = 1234) -> None:
    """Make checkpoint.init_from's weight loading perturb what it loaded (the noise reference
    ref_pert): the trainer itself stays untouched, and the optimizer's fp32 main weights are built
    afterwards from the perturbed ones."""
    import torch

    import msa_train.trainer.loop as loop

    load = loop.load_weights

    def load_then_perturb(directory, chunks, *args, **kwargs):
        report = load(directory, chunks, *args, **kwargs)
        with torch.no_grad():
            for c, chunk in enumerate(chunks):
                for i, (_, param) in enumerate(sorted(chunk.named_parameters())):
                    gen = torch.Generator(device=param.device).manual_seed(seed + 1000 * c + i)
                    noise = torch.randn(param.shape, generator=gen, device=param.device)
                    param.copy_((param.float() * (1.0 + rel * noise)).to(param.dtype))
        print(f"perturb-init: {rel:g} x N(0, 1) relative noise on every loaded weight", flush=True)
        return report

    loop.load_weights = load_then_perturb


def worker_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="gpu_parallel_validation.py worker")
    parser.add_argument("--perturb-init", type=float, default=0.0,
                        help="multiply every loaded initial weight by 1 + REL x N(0, 1) (fixed seed)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    ensure_msa_kernels()
    from msa_train.train import main as msa_train_main

    if args.perturb_init:
        perturb_loaded_weights(args.perturb_init)

    sys.argv = [sys.argv[0]] + list(args.overrides)
    msa_train_main()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _device_name(device: str) -> str:
    if device == "cpu":
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, gloo)"
    import torch

    return torch.cuda.get_device_name(0)


def _plan_from_args(args) -> Plan:
    base = PRESETS[args.preset]
    preset = dataclasses.replace(
        base, **{k: v for k, v in (("steps", args.steps), ("warmup_steps", args.warmup_steps),
                                   ("resume_step", args.resume_step), ("seq_length", args.seq_length),
                                   ("global_batch_size", args.global_batch_size))
                 if v is not None})
    if args.device == "cpu" and preset.precision == "bf16":
        preset = dataclasses.replace(preset, precision="fp32")
    layouts = parse_layout_list(args.layouts) if args.layouts.strip() else None
    return build_plan(preset, args.device, args.gpus, Path(args.work).resolve(),
                      layouts=layouts, resume=args.resume)


def _tolerance(args, precision: str) -> Tolerance:
    floor = args.rel_floor if args.rel_floor is not None else (
        BF16_REL_FLOOR if precision == "bf16" else FP32_REL_FLOOR)
    return Tolerance(factor=args.factor, rel_floor=floor, within_fraction=args.within,
                     final_window=args.final_window)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # msa_train from this checkout when it is not installed
    if argv and argv[0] == "worker":
        rest = argv[1:]
        if "--" in rest:
            i = rest.index("--")
            rest = rest[:i] + rest[i + 1:]
        worker_main(rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "plan", "compare", "render"))
    parser.add_argument("--gpus", type=int, default=None,
                        help="ranks per layout run (default: visible GPUs; required with --device cpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--resume-step", type=int)
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--layouts", default="",
                        help="layouts, comma or space separated, e.g. 'tp2,cp2,ep2,pp2' or 'tp2xcp2,pp2xep2' "
                             "(default: the set for --gpus)")
    parser.add_argument("--resume", default=None,
                        help="SOURCE:TARGET[,...] save/resume pairs (default: tp2:cp2, or first:second)")
    parser.add_argument("--work", default="/tmp/msa_parallel_validation",
                        help="runs, checkpoints, logs (large; not --out)")
    parser.add_argument("--out", default=None, help="report.json, report.md, loss_curves.png, metrics.tar.gz")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it counts as hung")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all runs together (runs that would start too late are "
                             "reported as not run, and the report is still written)")
    parser.add_argument("--factor", type=float, default=3.0, help="tolerance: x the references' gap")
    parser.add_argument("--rel-floor", type=float, default=None,
                        help="tolerance floor relative to the loss (default 2^-8 in bf16, 1e-5 in fp32)")
    parser.add_argument("--within", type=float, default=0.9, help="share of steps that must be in band")
    parser.add_argument("--final-window", type=int, default=10)
    parser.add_argument("--report", default=None, help="render: report.json to turn into report.md")
    args = parser.parse_args(argv)
    if args.command == "render":
        if not args.report or not args.out:
            parser.error("render needs --report <report.json> and --out <directory>")
        report = json.loads(Path(args.report).read_text())
        for name, entry in report["runs"].items():  # reports written before these fields existed
            entry.setdefault("finished", entry.get("rc") == 0 and not entry.get("timed_out"))
            entry.setdefault("run_problems", list(entry.get("problems", [])))
            entry.setdefault("source", name.split("_to_")[0] if entry["role"] == "resume" else None)
        report = evaluate(report, _tolerance(args, report["preset"]["precision"]))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(report_markdown(report))
        plot_curves(report, out / "loss_curves.png")
        print(report_markdown(report))
        return 0 if report["passed"] else 1
    if args.gpus is None:
        if args.device == "cpu":
            parser.error("--device cpu needs --gpus (the number of gloo ranks)")
        import torch

        args.gpus = torch.cuda.device_count()
        if args.gpus < 1:
            parser.error("no CUDA device visible: use --device cpu --gpus N for a gloo run")
    plan = _plan_from_args(args)
    tol = _tolerance(args, plan.preset.precision)
    out = Path(args.out or plan.work / "report").resolve()
    if args.command == "plan":
        print(f"layouts: {[layout.label for layout in plan.layouts]}  skipped: {plan.skipped}")
        print(f"resume: {[resume_name(a, b) for a, b in plan.resume_pairs]}")
        for spec in plan.runs:
            print(f"\n[{spec.name}] ({spec.role})\n  " + " ".join(worker_command(spec)))
        return 0
    if args.command == "run":
        if plan.work.exists():
            shutil.rmtree(plan.work / "runs", ignore_errors=True)
            shutil.rmtree(plan.work / "init_ckpt", ignore_errors=True)
        plan.work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        results = execute(plan, args.timeout, args.budget)
        print(f"all runs done in {time.time() - t0:.0f} s", flush=True)
        (plan.work / "results.json").write_text(json.dumps(
            {k: dataclasses.asdict(v) for k, v in results.items()}, indent=1))
    else:
        saved = plan.work / "results.json"
        if not saved.is_file():
            raise SystemExit(f"--work {plan.work}: no results.json (run `run` first)")
        results = {k: RunResult(**v) for k, v in json.loads(saved.read_text()).items()}
    report = build_report(plan, results, tol, _device_name(plan.device))
    write_outputs(plan, report, out)
    print(report_markdown(report), flush=True)
    print(f"outputs: {out}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
