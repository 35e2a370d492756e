"""msa-eval: long-context quality, indexer recall and selection patterns of a checkpoint.

    msa-eval runs/tiny_cpu --out runs/tiny_cpu/eval
    msa-eval /ckpt/pt_109b --out eval/ --tasks ppl,retrieval --lengths 4096,32768 --device cuda
    msa-eval RUN --out OUT --jsonl my_tasks.jsonl --tasks ppl
    torchrun --nproc_per_node 8 -m msa_train.eval.cli RUN --out OUT     # data parallel

Under torchrun every rank loads the whole model and scores its share of the sequences and examples
(msa_train.eval.shard); rank 0 writes the results. Writes OUT/results.json (schema in the README), OUT/results.md and PNG figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Dict, List

# Megatron-Core's import-time notices (no TransformerEngine / Apex: the supported setup) and the
# deprecation notices of the checkpoint loader it calls are not for the user of an eval tool.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch\.distributed)")
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron")

TASKS = ("ppl", "retrieval", "recall", "patterns")
MODES = ("sparse", "dense")


def _csv(value: str, allowed=None, name: str = "") -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{name} is empty")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{name}: unknown {bad}; choose from {list(allowed)}")
    return items


def _lengths(value: str) -> List[int]:
    try:
        out = sorted({int(v) for v in _csv(value, name="--lengths")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths must be comma-separated integers, got {value!r}")
    if out[0] < 2:
        raise argparse.ArgumentTypeError("--lengths must be >= 2 tokens")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="msa-eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run dir, save dir (latest iteration) or iter_XXXXXXX dir")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--tasks", default="ppl,retrieval,recall,patterns",
                    type=lambda v: _csv(v, TASKS, "--tasks"))
    ap.add_argument("--jsonl", nargs="+", default=[], metavar="FILE",
                    help='task files, one {"context": ..., "answer": ...} per line')
    ap.add_argument("--lengths", type=_lengths, default=None,
                    help="context lengths in tokens (default: the run's train.seq_length)")
    ap.add_argument("--modes", default="sparse,dense", type=lambda v: _csv(v, MODES, "--modes"),
                    help="sparse: MSA layers use their top-k blocks; dense: full attention, same weights")
    ap.add_argument("--num-samples", type=int, default=4,
                    help="validation sequences per length for ppl and recall")
    ap.add_argument("--num-examples", type=int, default=8,
                    help="examples per retrieval task and length")
    ap.add_argument("--retrieval-tasks", default="needle,multikey,multivalue,vartrack",
                    type=lambda v: _csv(v, None, "--retrieval-tasks"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="default: cuda when available")
    ap.add_argument("--config", default=None, help="run_config.yaml (default: the checkpoint's)")
    ap.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")
    args = ap.parse_args(argv)
    for name in ("num_samples", "num_examples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    from msa_train.eval.tasks import SYNTHETIC_TASKS

    bad = [t for t in args.retrieval_tasks if t not in SYNTHETIC_TASKS]
    if bad:
        ap.error(f"--retrieval-tasks: unknown {bad}; choose from {list(SYNTHETIC_TASKS)}")
    return args


def _validation_sequences(em, length: int, num: int):
    """The run's own validation split at `length` tokens (+1 for the last label)."""
    from msa_train.data import build_datasets

    cfg = em.cfg
    _, valid, _ = build_datasets(cfg.data, em.tokenizer, length, int(cfg.train.seed), 1, num)
    if valid is None or len(valid) == 0:
        raise ValueError(f"the run's data has no validation split (data.split={cfg.data.split!r}, "
                         "data.valid_paths empty): ppl and recall need one")
    import torch

    out = []
    for i in range(min(num, len(valid))):
        sample = valid[i]
        tokens = torch.as_tensor(sample["tokens"])
        labels = torch.as_tensor(sample["labels"])
        out.append(torch.cat([tokens, labels[-1:]]))  # length + 1 ids: every position scored
    return out


def run(args) -> Dict:
    import torch
    from tqdm import tqdm

    from msa_train.eval import checkpoint, report, scoring, shard, tasks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("msa-eval: --device cuda but no CUDA device is visible")
    task_files = {tasks.task_name(p): tasks.load_task_file(p) for p in args.jsonl}
    os.makedirs(args.out, exist_ok=True)
    em = checkpoint.load_eval_model(args.checkpoint, device, config=args.config,
                                    max_seq_len=max(args.lengths or [0]) + 1)
    rank, world = shard.rank_world()
    try:
        lengths = args.lengths or [int(em.cfg.train.seq_length)]
        longest = max(lengths)
        if task_files:
            longest = max(longest, max(len(em.tokenizer.tokenize(e.prompt + e.answer))
                                       for ex in task_files.values() for e in ex))
        if longest + 1 > int(em.cfg.model.max_position_embeddings):
            raise ValueError(f"length {longest} exceeds the model's max_position_embeddings "
                             f"{em.cfg.model.max_position_embeddings}")
        modes = [m for m in args.modes if m == "dense" or em.msa_layers]
        results: Dict = {"checkpoint": os.path.abspath(em.iter_dir), "iteration": em.iteration}
        figures: List[str] = []
        count = lambda text: len(em.tokenizer.tokenize(text))  # noqa: E731

        need_valid = any(t in args.tasks for t in ("ppl", "recall", "patterns"))
        valid = {n: _validation_sequences(em, n, args.num_samples) for n in lengths} if need_valid else {}
        units = 0
        if "ppl" in args.tasks:
            units += sum(len(v) for v in valid.values()) * len(modes)
        if "recall" in args.tasks and em.msa_layers:
            units += sum(len(v) for v in valid.values())
        if "retrieval" in args.tasks:
            units += len(args.retrieval_tasks) * len(lengths) * args.num_examples
        units += sum(len(v) for v in task_files.values())
        # Rank 0 shows the progress of all ranks: its own share, counted world times.
        bar = tqdm(total=units, desc="msa-eval", unit="seq", dynamic_ncols=True, disable=rank != 0)
        step = lambda: bar.update(min(world, bar.total - bar.n))  # noqa: E731

        if "ppl" in args.tasks:
            results["perplexity"] = {}
            for mode in modes:
                em.set_mode(mode)
                acc = scoring.LossByPosition(longest)
                for n in lengths:
                    for ids in shard.shard(valid[n]):
                        acc.add(scoring.token_losses(em, ids))
                        step()
                acc.sums = shard.all_sum(acc.sums, em.device)
                acc.counts = shard.all_sum(acc.counts, em.device)
                results["perplexity"][mode] = acc.perplexity(
                    scoring.position_buckets(longest, em.block_size))
            if rank == 0:
                figures.append(report.plot_perplexity(results["perplexity"], args.out))

        if "retrieval" in args.tasks:
            em.set_mode("sparse" if em.msa_layers else "dense")
            results["retrieval"] = {}
            for task in args.retrieval_tasks:
                per = results["retrieval"][task] = {}
                for n in lengths:
                    try:
                        examples = tasks.synthetic_examples(task, n, args.num_examples, args.seed,
                                                            count)
                    except tasks.TooShort as err:
                        if rank == 0:
                            bar.write(f"msa-eval: skipped: {err}")
                        bar.update(args.num_examples)
                        continue
                    hits = 0
                    for ex in shard.shard(examples):
                        hits += scoring.score_answer(em, em.tokenizer.tokenize(ex.prompt),
                                                     em.tokenizer.tokenize(ex.answer)).correct
                        step()
                    hits = int(shard.all_sum([hits], em.device)[0])
                    per[str(n)] = {"accuracy": hits / len(examples), "n": len(examples)}
            if rank == 0:
                figures.append(report.plot_retrieval(results["retrieval"], args.out))

        if "recall" in args.tasks and em.msa_layers:
            # Not sharded: the recall and KL trackers reduce over all ranks in every call, so each
            # rank runs every sequence (the sums scale by the world size, the ratios do not).
            em.set_mode("sparse")
            by_length = {}
            for n in lengths:
                runs = []
                for ids in valid[n]:
                    runs.append(scoring.recall_and_kl(em, ids[:-1]))
                    bar.update()
                by_length[str(n)] = scoring.average_layers(runs)
            results["recall"] = by_length[str(max(lengths))]
            results["recall_by_length"] = by_length
            if rank == 0:
                figures.append(report.plot_recall(results["recall"], args.out))

        if task_files:
            em.set_mode("sparse" if em.msa_layers else "dense")
            results["tasks"] = {}
            for name, examples in task_files.items():
                scores = []
                for ex in shard.shard(examples):
                    scores.append(scoring.score_answer(em, em.tokenizer.tokenize(ex.prompt),
                                                       em.tokenizer.tokenize(ex.answer)))
                    step()
                correct, logprob = shard.all_sum([sum(s.correct for s in scores),
                                                  sum(s.mean_logprob for s in scores)], em.device)
                results["tasks"][name] = {
                    "accuracy": float(correct) / len(examples), "n": len(examples),
                    "mean_answer_logprob": float(logprob) / len(examples)}
        bar.close()

        if "patterns" in args.tasks and em.msa_layers and rank == 0:
            from msa_train.metrics.pattern import plot_selection

            ids = valid[longest][0][:-1]
            freqs = scoring.selection_patterns(em, ids)
            title = (f"iteration {em.iteration}: {len(ids)} tokens, block {em.block_size}, "
                     f"top-{em.topk}")
            figures.append(plot_selection(freqs, os.path.join(args.out, "patterns.png"), title=title))
    finally:
        checkpoint.close()

    if rank == 0:
        report.write_json(results, args.out)
        report.write_markdown(results, args.out, figures)
        if args.wandb:
            _log_wandb(args, results, figures)
    return results


def _log_wandb(args, results: Dict, figures: List[str]) -> None:
    import wandb

    flat = {}
    for mode, r in (results.get("perplexity") or {}).items():
        flat[f"eval/ppl/{mode}"] = r["overall"]
    for task, per in (results.get("retrieval") or {}).items():
        for n, r in per.items():
            flat[f"eval/retrieval/{task}/{n}"] = r["accuracy"]
    for layer, r in (results.get("recall") or {}).items():
        for key, value in r.items():
            flat[f"eval/{key}/{layer}"] = value
    for name, r in (results.get("tasks") or {}).items():
        flat[f"eval/tasks/{name}/accuracy"] = r["accuracy"]
    run = wandb.init(project=args.wandb, job_type="eval", config={"checkpoint": results["checkpoint"],
                                                                  "iteration": results["iteration"]})
    run.log({**flat, **{os.path.basename(f): wandb.Image(f) for f in figures}})
    run.finish()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"msa-eval: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank (the group is closed by now)
        print(f"msa-eval: wrote {os.path.join(args.out, 'results.json')} and results.md "
              f"(iteration {results['iteration']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
