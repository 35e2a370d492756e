"""Small-scale replication of the MSA paper's claims: train variants with the project's own trainer
(`python -m msa_train.train` + Hydra overrides, one run directory each), evaluate each final
checkpoint with msa-eval, and compare the results with the paper's claims.

Variants (one size preset fixes model, context and tokens for all of them):

  dense         dense baseline (no MSA layer), W + S tokens
  msa_pt        MSA pretraining: W tokens indexer warmup (dense), then S tokens sparse
  no_warmup     ablation: sparse from step 0 (W + S sparse tokens)
  no_stop_grad  ablation: the KL's gradient also reaches the backbone (attention.index_stop_grad=false)
  fixed_window  ablation: sink block + the most recent blocks, as many as top-k (the indexer's
                choice is overridden: attention.force_sink=true, local_window=topk-2)
  dense_cont    the dense baseline continued for W2 + S2 more tokens
  msa_cpt       the dense baseline converted to MSA (checkpoint.init_from), W2 warmup + S2 sparse

Equal tokens: the first five see the same W + S tokens in the same order, the last two the same
W2 + S2 tokens after the same dense checkpoint. The first five also share the stage split, so the
learning-rate schedule (a fresh one per stage) is the same; only the attention differs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional

RESULTS_JSON = "replication.json"
RESULTS_MD = "REPLICATION_RESULTS.md"
SETTINGS_FILE = "settings.json"  # the size and overrides the variants in OUT were made with
DONE_FILE = "DONE.json"  # per variant, written after its eval: a re-run skips the variant


@dataclass(frozen=True)
class Size:
    """Model, context and token budget shared by every variant of one replication."""
    name: str
    overrides: List[str]  # Hydra overrides of the model/attention/train groups
    seq_length: int
    global_batch: int
    topk: int
    block_size: int
    warmup_steps: int  # W
    sparse_steps: int  # S
    cpt_warmup_steps: int  # W2
    cpt_sparse_steps: int  # S2
    eval_args: List[str] = field(default_factory=list)  # extra msa-eval arguments
    eval_cost_steps: float = 5.0  # an eval's cost in training steps (progress-bar ETA only)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.global_batch


def scaled(size: Size, factor: float) -> Size:
    """The same size with every stage's step count multiplied by `factor` (at least 1 step)."""
    if not factor > 0:
        raise ValueError(f"--scale must be > 0, got {factor}")
    steps = lambda n: max(1, round(n * factor))  # noqa: E731
    return replace(size, warmup_steps=steps(size.warmup_steps), sparse_steps=steps(size.sparse_steps),
                   cpt_warmup_steps=steps(size.cpt_warmup_steps),
                   cpt_sparse_steps=steps(size.cpt_sparse_steps))


def _common(seq: int, micro: int, gbs: int, lr_warmup: int) -> List[str]:
    return [f"train.seq_length={seq}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={gbs}", f"train.lr_warmup_steps={lr_warmup}",
            "logging.console=false", "logging.log_interval=1", "logging.recall_interval=0",
            "checkpoint.keep_last_k=1"]


SIZES: Dict[str, Size] = {
    # The default tiny recipe (4 layers, 3 MSA, block 16, top-4, index RoPE) with a dense FFN and
    # shorter steps: 8 x 512 tokens would not fit seven runs into a few CPU minutes.
    "cpu": Size(
        name="cpu",
        overrides=["model.num_moe_experts=null", "attention.recall_num_queries=64",
                   *_common(512, 2, 2, 3)],
        seq_length=512, global_batch=2, topk=4, block_size=16,
        warmup_steps=30, sparse_steps=30, cpt_warmup_steps=10, cpt_sparse_steps=20,
        eval_args=["--num-samples", "4", "--num-examples", "4", "--retrieval-tasks",
                   "needle,multikey"],
        eval_cost_steps=8.0,
    ),
    # One H100, 4K context: 6 layers (1 full + 5 MSA), hidden 512, GQA 8/2 x 64, dense FFN,
    # byte tokenizer; blocks of 64, top-8 (512 of up to 4096 keys per query: 1/8 of the context
    # at the end of a sequence, the ratio of the paper's 2K of 16K).
    "gpu": Size(
        name="gpu",
        overrides=["model.num_layers=6", "model.hidden_size=512", "model.ffn_hidden_size=1408",
                   "model.num_attention_heads=8", "model.num_query_groups=2",
                   "model.kv_channels=64", "model.num_moe_experts=null",
                   "model.max_position_embeddings=8192",
                   "attention.block_size=64", "attention.topk=8", "attention.index_dim=64",
                   "attention.recall_num_queries=128",
                   *_common(4096, 4, 8, 5)],
        seq_length=4096, global_batch=8, topk=8, block_size=64,
        warmup_steps=20, sparse_steps=40, cpt_warmup_steps=10, cpt_sparse_steps=20,
        eval_args=["--num-samples", "4", "--num-examples", "8"],
        eval_cost_steps=15.0,
    ),
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    warmup_steps: int
    sparse_steps: int
    overrides: List[str] = field(default_factory=list)
    init_from: Optional[str] = None  # another variant whose final checkpoint this one starts from
    msa: bool = True  # has MSA layers (dense variants: attention.layer_ids=[])

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.sparse_steps


def variants(size: Size) -> List[Variant]:
    """In dependency order (dense before the two runs that start from it)."""
    w, s, w2, s2 = size.warmup_steps, size.sparse_steps, size.cpt_warmup_steps, size.cpt_sparse_steps
    dense = ["attention.layer_ids=[]"]
    return [
        Variant("dense", "dense baseline", w, s, dense, msa=False),
        Variant("msa_pt", "MSA-PT (warmup + sparse)", w, s),
        Variant("no_warmup", "MSA, no indexer warmup", 0, w + s),
        Variant("no_stop_grad", "MSA, no stop-gradient", w, s, ["attention.index_stop_grad=false"]),
        Variant("fixed_window", "fixed sink + local window", w, s,
                ["attention.force_sink=true", f"attention.local_window={size.topk - 2}"]),
        Variant("dense_cont", "dense continued", w2, s2, dense, init_from="dense", msa=False),
        Variant("msa_cpt", "MSA-CPT (from dense)", w2, s2, init_from="dense"),
    ]


def train_overrides(size: Size, v: Variant, out_dir: str) -> List[str]:
    run_dir = os.path.join(out_dir, v.name)
    tps = size.tokens_per_step
    args = [f"name={v.name}", f"run_dir={run_dir}", *size.overrides,
            f"stage.warmup.tokens={v.warmup_steps * tps}",
            f"stage.sparse.tokens={v.sparse_steps * tps}", *v.overrides]
    if v.init_from:
        args.append(f"checkpoint.init_from={os.path.join(out_dir, v.init_from, 'checkpoints')}")
    return args


# ----------------------------------------------------------------------------- running
def _last_step(metrics_path: str) -> int:
    """The last optimizer step logged so far (0 when none)."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def train(size: Size, v: Variant, out_dir: str, on_step: Callable[[int], None],
          extra: List[str]) -> None:
    """One msa-train run in a subprocess (a fresh Megatron state per run); a run directory that
    already holds a checkpoint resumes it."""
    run_dir = os.path.join(out_dir, v.name)
    os.makedirs(run_dir, exist_ok=True)
    overrides = [*train_overrides(size, v, out_dir), *extra]
    cmd = [sys.executable, "-m", "msa_train.train", *overrides]
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(shlex.join(["msa-train", *overrides]) + "\n")
    log_path = os.path.join(run_dir, "train.log")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(0.5)
            on_step(_last_step(metrics))
    on_step(_last_step(metrics))
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"training variant {v.name!r} failed (exit {proc.returncode}); "
                           f"log: {log_path}\n{tail}")


def evaluate(size: Size, v: Variant, out_dir: str, device: Optional[str]) -> Dict:
    """msa-eval on the variant's final checkpoint, in this process (its output goes to eval.log)."""
    from msa_train.eval import cli

    run_dir = os.path.join(out_dir, v.name)
    tasks = "ppl,retrieval,recall" + (",patterns" if v.name == "msa_pt" else "")
    argv = [run_dir, "--out", os.path.join(run_dir, "eval"), "--tasks", tasks, *size.eval_args]
    if device:
        argv += ["--device", device]
    try:
        with open(os.path.join(run_dir, "eval.log"), "w") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return cli.run(cli.parse_args(argv))
    finally:
        import torch

        if torch.cuda.is_available():  # give the next training run the memory back
            torch.cuda.empty_cache()


def read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    by_step: Dict[int, Dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec  # a resumed run re-logs nothing twice; keep last
    return [by_step[s] for s in sorted(by_step)]


def run_all(size: Size, out_dir: str, names: Optional[List[str]] = None,
            device: Optional[str] = None, extra: Optional[List[str]] = None) -> Dict:
    """Train and evaluate every variant not finished yet (DONE.json), then summarize."""
    from tqdm import tqdm

    out_dir = os.path.abspath(out_dir)
    todo = variants(size)
    if names:
        unknown = sorted(set(names) - {v.name for v in todo})
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {[v.name for v in todo]}")
        need = set(names) | {v.init_from for v in todo if v.name in names and v.init_from}
        todo = [v for v in todo if v.name in need]
    if device:
        extra = [f"train.device={device}", *(extra or [])]
    os.makedirs(out_dir, exist_ok=True)
    _check_same_settings(out_dir, {**asdict(size), "extra_overrides": list(extra or [])})
    cost = {v.name: v.steps + size.eval_cost_steps for v in todo}
    done = {v.name: _read_done(out_dir, v.name) for v in todo}
    bar = tqdm(total=sum(cost.values()), desc="replicate", unit="step", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} steps [{elapsed}<{remaining}]{postfix}")
    bar.update(sum(cost[n] for n, d in done.items() if d))
    timings: Dict[str, Dict] = {}
    try:
        for i, v in enumerate(todo):
            if done[v.name]:
                timings[v.name] = done[v.name]
                continue
            bar.set_postfix_str(f"{i + 1}/{len(todo)} {v.name}: train")
            start_n, t0 = bar.n, time.time()

            def on_step(step: int, _base=start_n, _steps=v.steps) -> None:
                bar.update(_base + min(step, _steps) - bar.n)

            train(size, v, out_dir, on_step, extra or [])
            t1 = time.time()
            bar.update(start_n + v.steps - bar.n)
            bar.set_postfix_str(f"{i + 1}/{len(todo)} {v.name}: eval")
            try:
                evaluate(size, v, out_dir, device)
            except (ValueError, FileNotFoundError, RuntimeError) as err:
                raise RuntimeError(f"msa-eval of variant {v.name!r} failed: {err} (log: "
                                   f"{os.path.join(out_dir, v.name, 'eval.log')})") from err
            t2 = time.time()
            bar.update(start_n + cost[v.name] - bar.n)
            timings[v.name] = {"train_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1)}
            with open(os.path.join(out_dir, v.name, DONE_FILE), "w") as f:
                json.dump(timings[v.name], f)
    finally:
        bar.close()
    summary = summarize(size, out_dir, todo, timings)
    from msa_train.eval import replicate_report

    replicate_report.write_all(summary, out_dir)
    return summary


def _check_same_settings(out_dir: str, settings: Dict) -> None:
    """Finished variants are reused on a re-run only if they were made with the same settings."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(f"{out_dir} holds a replication made with other settings ({diff}); "
                             "use a new --out or the same --size/--scale/overrides")
        return
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


def _read_done(out_dir: str, name: str) -> Optional[Dict]:
    path = os.path.join(out_dir, name, DONE_FILE)
    results = os.path.join(out_dir, name, "eval", "results.json")
    if os.path.isfile(path) and os.path.isfile(results):
        with open(path) as f:
            return json.load(f)
    return None


# ----------------------------------------------------------------------------- analysis
def random_block_recall(length: int, block_size: int, topk: int, num_queries: int) -> float:
    """Upper bound of the expected block recall of a random selection (the local block plus
    topk-1 blocks drawn uniformly from the other visible ones), at the query rows msa-eval samples.

    A query at position p sees n = p // block_size + 1 blocks; with n <= topk every selection is
    complete (recall 1). Otherwise, when the main branch's top-k holds the local block, the expected
    overlap is 1 + (topk-1)^2 / (n-1), i.e. recall (1 + (topk-1)^2/(n-1)) / topk; when it does not,
    (topk-1)/(n-1), which is never larger. The bound therefore favours the random baseline.
    """
    import torch

    from msa_train.model.recall import sample_rows

    rows = sample_rows(length, num_queries, torch.device("cpu"))
    total = 0.0
    for p in rows.tolist():
        n = p // block_size + 1
        total += 1.0 if n <= topk else (1 + (topk - 1) ** 2 / (n - 1)) / topk
    return total / len(rows)


def uniform_score_recall(length: int, block_size: int, topk: int, num_queries: int) -> float:
    """Score recall of any selection (local block + topk-1 full blocks) when the main branch
    attends uniformly to every visible token, at the rows msa-eval samples. Score recalls near
    this value mean the model's attention is nearly uniform over blocks, so no selection can
    matter much yet."""
    import torch

    from msa_train.model.recall import sample_rows

    rows = sample_rows(length, num_queries, torch.device("cpu"))
    total = 0.0
    for p in rows.tolist():
        n = p // block_size + 1
        total += 1.0 if n <= topk else ((p % block_size) + 1 + (topk - 1) * block_size) / (p + 1)
    return total / len(rows)


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def kl_summary(records: List[Dict], warmup_steps: int) -> Dict[str, float]:
    """Indexer KL at the start and end of the warmup and at the end of the sparse stage."""
    kl = [(int(r["step"]), r["train/indexer_kl"]) for r in records if "train/indexer_kl" in r]
    warm = [x for s, x in kl if s <= warmup_steps]
    sparse = [x for s, x in kl if s > warmup_steps]
    head = lambda xs: _mean(xs[:3])  # noqa: E731
    tail = lambda xs: _mean(xs[-max(3, len(xs) // 4):])  # noqa: E731
    out = {}
    if warm:
        out.update(warmup_start=head(warm), warmup_end=tail(warm))
    if sparse:
        out.update(sparse_start=head(sparse), sparse_end=tail(sparse))
    return out


def _ppl(results: Dict, msa: bool) -> Optional[float]:
    """The model's own perplexity: sparse mode for MSA variants, dense for dense ones."""
    ppl = results.get("perplexity") or {}
    mode = "sparse" if msa else "dense"
    return ppl[mode]["overall"] if mode in ppl else None


def summarize(size: Size, out_dir: str, todo: List[Variant], timings: Dict[str, Dict]) -> Dict:
    out: Dict = {"size": size.name, "seq_length": size.seq_length, "block_size": size.block_size,
                 "topk": size.topk, "tokens_per_step": size.tokens_per_step, "variants": {}}
    num_queries = None
    for v in todo:
        run_dir = os.path.join(out_dir, v.name)
        with open(os.path.join(run_dir, "eval", "results.json")) as f:
            results = json.load(f)
        records = read_metrics(run_dir)
        recall = results.get("recall") or {}
        entry = {
            "label": v.label, "msa": v.msa, "init_from": v.init_from,
            "warmup_steps": v.warmup_steps, "sparse_steps": v.sparse_steps,
            "tokens": v.steps * size.tokens_per_step,
            "command": open(os.path.join(run_dir, "command.txt")).read().strip(),
            "timing": timings.get(v.name, {}),
            "final_train_loss": _mean([r.get("train/lm_loss") for r in records[-5:]]),
            "curves": {"step": [int(r["step"]) for r in records],
                       "lm_loss": [r.get("train/lm_loss") for r in records],
                       "indexer_kl": [r.get("train/indexer_kl") for r in records]},
            "kl": kl_summary(records, v.warmup_steps) if v.msa else {},
            "ppl": _ppl(results, v.msa),
            "ppl_dense_mode": ((results.get("perplexity") or {}).get("dense") or {}).get("overall"),
            "eval": results,
        }
        if recall:
            entry["block_recall"] = _mean([r["block_recall"] for r in recall.values()])
            entry["score_recall"] = _mean([r["score_recall"] for r in recall.values()])
        out["variants"][v.name] = entry
        if num_queries is None and v.msa:
            from msa_train.eval.checkpoint import load_run_config, resolve_checkpoint

            cfg = load_run_config(resolve_checkpoint(run_dir))
            num_queries = int(cfg.attention.recall_num_queries)
    out["random_block_recall"] = random_block_recall(size.seq_length, size.block_size, size.topk,
                                                     num_queries or 64)
    out["uniform_score_recall"] = uniform_score_recall(size.seq_length, size.block_size, size.topk,
                                                       num_queries or 64)
    out["claims"] = claims(out)
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


# Thresholds of the verdicts (documented in docs/REPLICATION.md): a perplexity within 5% is
# "close"; an ablation "matters" when it is worse by more than 1%.
CLOSE = 1.05
MATTERS = 1.01
UNIFORM_MARGIN = 0.05


def claims(summary: Dict) -> List[Dict]:
    """Each paper claim next to what this replication measured, with a verdict."""
    var = summary["variants"]
    rows: List[Dict] = []

    def add(claim: str, paper: str, measured: str, ok: Optional[bool], inconclusive: bool = False) -> None:
        verdict = "not measured" if ok is None else ("reproduces" if ok else "does not reproduce")
        if ok is not None and inconclusive:
            verdict = "inconclusive"
        rows.append({"claim": claim, "paper": paper, "measured": measured, "verdict": verdict})

    pt = var.get("msa_pt")
    if pt and pt["kl"]:
        k = pt["kl"]
        add("indexer KL falls during the warmup", "falls fast",
            f"{k['warmup_start']:.3g} -> {k['warmup_end']:.3g}", k["warmup_end"] < k["warmup_start"])
        if "sparse_end" in k:
            add("KL stays low after the switch to sparse", "stays low",
                f"sparse stage: {k['sparse_start']:.3g} -> {k['sparse_end']:.3g} "
                f"(warmup started at {k['warmup_start']:.3g})",
                k["sparse_end"] < k["warmup_start"])
    if pt and "block_recall" in pt:
        rnd = summary["random_block_recall"]
        add("indexer block recall", "about 0.7",
            f"{pt['block_recall']:.3f} (random selection <= {rnd:.3f})", pt["block_recall"] >= 0.6)
        add("indexer score recall", "about 0.9",
            f"{pt['score_recall']:.3f} (any selection under uniform attention: "
            f"{summary['uniform_score_recall']:.3f})", pt["score_recall"] >= 0.8)

    # When the main branch attends almost uniformly over blocks (score recall within UNIFORM_MARGIN
    # of the uniform-attention value), no selection can change quality yet: the quality claims
    # are then not tested by this run, whatever the perplexities say.
    uniform = summary.get("uniform_score_recall")
    flat = bool(pt and "score_recall" in pt and uniform is not None
                and pt["score_recall"] - uniform < UNIFORM_MARGIN)

    def ppl_claim(claim: str, a: str, b: str, better: bool) -> None:
        """better=False: a within CLOSE of b; better=True: b worse than a by more than MATTERS."""
        if a not in var or b not in var:
            return
        r = _ratio(var[b]["ppl"], var[a]["ppl"]) if better else _ratio(var[a]["ppl"], var[b]["ppl"])
        if r is None:
            return add(claim, "", "no perplexity", None)
        measured = (f"ppl {var[a]['label']} {var[a]['ppl']:.3f} vs {var[b]['label']} "
                    f"{var[b]['ppl']:.3f} (ratio {var[b]['ppl'] / var[a]['ppl']:.3f})")
        if flat:
            measured += "; attention nearly uniform over blocks"
        add(claim, "yes", measured, r > MATTERS if better else r <= CLOSE, inconclusive=flat)

    ppl_claim("MSA-PT quality close to dense (same tokens)", "msa_pt", "dense", False)
    ppl_claim("MSA-CPT close to dense continued (same tokens)", "msa_cpt", "dense_cont", False)
    ppl_claim("indexer warmup matters", "msa_pt", "no_warmup", True)
    ppl_claim("stop-gradient on the index input matters", "msa_pt", "no_stop_grad", True)
    ppl_claim("dynamic selection beats a fixed sink + local window", "msa_pt", "fixed_window", True)
    return rows


def check(summary: Dict) -> List[str]:
    """The robust facts CI asserts; returns the failures (empty = pass)."""
    failures = []
    pt = summary["variants"].get("msa_pt")
    if pt is None:
        return ["variant msa_pt was not run"]
    k = pt["kl"]
    if not k.get("warmup_end", math.inf) < k.get("warmup_start", -math.inf):
        failures.append(f"msa_pt: indexer KL did not fall during the warmup ({k})")
    rnd = summary["random_block_recall"]
    if not pt.get("block_recall", 0.0) > rnd:
        failures.append(f"msa_pt: indexer block recall {pt.get('block_recall')} does not beat a "
                        f"random selection's expected recall ({rnd:.3f})")
    return failures
