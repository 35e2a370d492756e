"""The training run: resume or initialize, then the stages of this job, step by step.

Start rule (checked by msa_train.config.validate before any compute):
  checkpoint.save holds a checkpoint   -> full resume from it (model, optimizer, scheduler, RNG,
                                          data position, stage)
  else checkpoint.load is set          -> full resume from that directory
  else checkpoint.init_from is set     -> weights only (stage hand-off or dense -> MSA conversion)
  else                                 -> random initialization
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Dict, List, Optional

import msa_kernels
import torch
from omegaconf import DictConfig, OmegaConf

from msa_train.trainer import checkpointing, rng
from msa_train.trainer import ckpt_layout as layout
from msa_train.trainer.ckpt_layout import CheckpointError
from msa_train.trainer.divergence import DivergenceError, DivergencePolicy
from msa_train.trainer.init_from import load_weights
from msa_train.metrics.progress import Progress, RunProgress
from msa_train.trainer.schedule import RunPlan, StagePlan, build_plan
from msa_train.trainer.setup import StageObjects, build_stage, index_param_predicate
from msa_train.trainer.step import eval_step, train_step

log = logging.getLogger("msa_train.trainer")


def _print0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


class Trainer:
    def __init__(self, cfg: DictConfig, runtime):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.runtime = runtime
        self.plan: RunPlan = build_plan(cfg.stage, cfg.train)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.cp_size = ps.get_context_parallel_world_size()
        train = cfg.train
        self.num_microbatches = int(train.global_batch_size) // (int(train.micro_batch_size) * self.dp_size)
        self.is_logging_rank = (ps.is_pipeline_last_stage(ignore_virtual=True)
                                and self.dp_rank == 0 and ps.get_tensor_model_parallel_rank() == 0
                                and ps.get_context_parallel_rank() == 0)
        self.run_config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.save_dir: Optional[str] = cfg.checkpoint.save
        self.progress = Progress()
        self.init_report: Optional[Dict] = None
        self.wandb_run_ids: Dict[str, Optional[str]] = {}
        self.job_steps = 0  # optimizer steps taken by this process (train.max_steps_per_job)
        # Iterations keep_last_k may prune: the ones this job wrote and its resumed lineage.
        self.owned_iterations: set = set()
        self.divergence = DivergencePolicy.from_config(cfg.train)
        self._bad_loss = None  # device flag: a non-finite loss since the last log step
        self.steps_since_log = 0  # optimizer steps the KL / MoE trackers hold
        self._build_data()

    # -- data ------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        from msa_train.data import build_datasets, build_tokenizer, collator_for, padded_vocab_size

        cfg = self.cfg
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self._check_vocab()
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size,
                                            int(cfg.data.tokenizer.make_vocab_size_divisible_by),
                                            int(cfg.parallel.tp))
        eval_samples = 0
        if cfg.train.eval_interval:
            evals = self.plan.total_steps // int(cfg.train.eval_interval) + 1
            eval_samples = evals * int(cfg.train.eval_iters) * self.plan.samples_per_step
        # Always sized for the WHOLE schedule (both stages), so every job layout shuffles alike.
        self.train_ds, self.valid_ds, _ = build_datasets(
            cfg.data, self.tokenizer, int(cfg.train.seq_length), int(cfg.train.seed),
            self.plan.total_samples + self._rollback_margin_samples(), eval_samples)
        self.collator = collator_for(cfg.data, self.tokenizer)

    def _check_vocab(self) -> None:
        from msa_train.config.validate import ConfigError, check_model_vocab

        errors: List[str] = []
        check_model_vocab(int(self.cfg.model.vocab_size), int(self.tokenizer.vocab_size),
                          str(self.cfg.data.tokenizer.type), errors)
        if errors:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))

    def _rollback_margin_samples(self) -> int:
        """Rollbacks skip the data read since the last checkpoint; size the index for it
        (only with the policy on, so the sample order of other runs is unchanged)."""
        train = self.cfg.train
        if not train.get("rollback_on_divergence", False):
            return 0
        window = int(self.cfg.checkpoint.save_interval or self.plan.total_steps)
        steps = int(train.max_rollbacks) * (window + int(train.max_skipped_steps))
        return steps * self.plan.samples_per_step

    def _iterators(self, dataset, consumed_samples: int, num_chunks: int):
        from msa_train.data import build_data_loader, cycle

        def one():
            loader = build_data_loader(dataset, consumed_samples, int(self.cfg.train.micro_batch_size),
                                       self.dp_rank, self.dp_size, int(self.cfg.data.num_workers),
                                       self.collator)
            return iter(loader) if dataset is self.train_ds else cycle(loader)

        # The interleaved schedule draws from each virtual stage's iterator separately.
        its = [one() for _ in range(num_chunks)]
        return its[0] if num_chunks == 1 else its

    # -- start -----------------------------------------------------------------------------------
    def _resume_dir(self) -> Optional[str]:
        """The iteration to resume, verified against its manifest (collective)."""
        ck = self.cfg.checkpoint
        verify = bool(ck.get("verify", True))
        if layout.has_checkpoint(ck.save):
            return checkpointing.select_intact(ck.save, "checkpoint.save", verify)
        if ck.load:
            return checkpointing.select_intact(ck.load, "checkpoint.load", verify)
        return None

    def run(self) -> int:
        from msa_train.lifecycle import LifecycleGuard

        self.guard = LifecycleGuard.from_config(self.cfg.cluster).install()
        try:
            return self._run()
        finally:
            self.guard.uninstall()

    def _own_lineage(self, resume_dir: str) -> None:
        """Earlier iterations of the save dir that hold this run's model belong to this run."""
        from msa_train.trainer.ckpt_shape import same_shape

        root = os.path.dirname(os.path.normpath(resume_dir))
        if not self.save_dir or os.path.normpath(root) != os.path.normpath(self.save_dir):
            return
        latest = layout.read_tracker(root)
        for it in layout.list_iterations(root):
            if latest is not None and it <= latest and same_shape(layout.iteration_dir(root, it),
                                                                  self.cfg):
                self.owned_iterations.add(it)

    def _run(self) -> int:
        resume_dir = self._resume_dir()
        if resume_dir:
            self._own_lineage(resume_dir)
        init_dir = handoff_dir = None
        if resume_dir:
            saved = layout.read_state_json(resume_dir) or {}
            self.progress = Progress.from_dict(saved.get("progress", {}))
            self.wandb_run_ids = dict(saved.get("wandb_run_ids", {}))
            self.init_report = saved.get("init_from")
            _print0(f"resume: {resume_dir} (step {self.progress.iteration}, stage "
                    f"{self.progress.stage}, {self.progress.consumed_samples} samples)")
            at_boundary = any(s.end_step == self.progress.iteration for s in self.plan.stages)
            if at_boundary and 0 < self.progress.iteration < self.plan.job_end_step:
                # The checkpoint ends a stage: start the next one exactly as a continuous run
                # switches (its weights, a fresh optimizer and LR schedule, the stage's seed),
                # never with the finished stage's optimizer state.
                handoff_dir, resume_dir = resume_dir, None
        elif self.cfg.checkpoint.init_from:
            init_dir = checkpointing.select_intact(self.cfg.checkpoint.init_from,
                                                   "checkpoint.init_from",
                                                   bool(self.cfg.checkpoint.get("verify", True)))
            saved = layout.read_state_json(init_dir)
            prev = Progress.from_dict((saved or {}).get("progress", {}))
            first = self.plan.job_stages[0]
            if (saved and self.cfg.checkpoint.init_continue_data
                    and prev.iteration == first.start_step > 0):
                # Stage hand-off: the checkpoint ends exactly where this job's first stage starts,
                # so keep its data position (no sample is seen twice, as in a continuous run).
                self.progress = Progress(iteration=prev.iteration, consumed_samples=prev.consumed_samples)
        first_stage = self.plan.job_stages[0]
        if not resume_dir and self.progress.iteration < first_stage.start_step:
            # Separate stage job without a hand-off position: start at the stage boundary.
            self.progress = Progress(iteration=first_stage.start_step,
                                     consumed_samples=first_stage.start_step * self.plan.samples_per_step)
        if self.progress.iteration >= self.plan.job_end_step:
            _print0(f"nothing to do: step {self.progress.iteration} >= this job's last step "
                    f"{self.plan.job_end_step} (checkpoint.save already holds the finished run)")
            return 0

        prev_weights: Optional[List[Dict[str, torch.Tensor]]] = None
        for stage in self.plan.job_stages:
            if self.progress.iteration >= stage.end_step:
                continue
            objs = self._start_stage(stage, prev_weights, resume_dir, init_dir, handoff_dir)
            resume_dir = init_dir = handoff_dir = None
            code = self._train_stage(stage, objs)
            if code is not None:
                return code
            # Stage switch: keep only the weights (on the host) and free the model, grad buffers
            # and optimizer state before the next stage builds its own.
            prev_weights = [{k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor)
                                 else v)
                             for k, v in checkpointing.unwrap(c).state_dict().items()}
                            for c in objs.chunks]
            del objs
            if self.runtime.is_cuda:
                torch.cuda.empty_cache()
        self._finish()
        return 0

    def _start_stage(self, stage: StagePlan, prev_weights: Optional[List[Dict[str, torch.Tensor]]],
                     resume_dir: Optional[str], init_dir: Optional[str],
                     handoff_dir: Optional[str]) -> StageObjects:
        rng.seed_everything(int(self.cfg.train.seed), stage.index)
        init_weights = None
        if handoff_dir is not None:
            def init_weights(chunks: List[torch.nn.Module]) -> None:
                report = load_weights(handoff_dir, chunks, index_param_predicate(chunks),
                                      field_name="checkpoint.save")
                if report.added or report.ignored:
                    raise CheckpointError(f"{handoff_dir} does not match this model:\n"
                                          f"{report.summary()}")
        elif resume_dir is None and prev_weights is not None:
            def init_weights(chunks: List[torch.nn.Module]) -> None:
                with torch.no_grad():
                    for chunk, state in zip(chunks, prev_weights):
                        chunk.load_state_dict(state, strict=True)
        elif resume_dir is None and init_dir is not None:
            def init_weights(chunks: List[torch.nn.Module]) -> None:
                report = load_weights(init_dir, chunks, index_param_predicate(chunks))
                _print0(report.summary())
                self.init_report = report.to_dict()
        objs = build_stage(self.cfg, self.runtime, stage, self.vocab_size, init_weights)
        if resume_dir is not None:
            saved = layout.read_state_json(resume_dir) or {}
            checkpointing.load(resume_dir, objs.chunks, objs.optimizer, objs.scheduler,
                               saved.get("world_size"))
        self.progress.stage = stage.name
        kernels = msa_kernels.backend_for(torch.empty(0, device=self.runtime.device),
                                          str(self.cfg.attention.kernels))
        _print0(f"stage {stage.name}: attention={stage.mode} (msa kernels: {kernels}) "
                f"trainable={stage.trainable} "
                f"({objs.trainable_params:,} trainable / {objs.frozen_params:,} frozen params on "
                f"rank 0), steps {stage.start_step}->{stage.end_step}, "
                f"{stage.steps * self.plan.tokens_per_step:,} tokens")
        return objs

    # -- the stage loop --------------------------------------------------------------------------
    def _new_logger(self, stage: StagePlan):
        from msa_train.metrics.logger import MetricsLogger

        logger = MetricsLogger(
            self.cfg.logging, str(self.cfg.run_dir), run_id=self.wandb_run_ids.get(stage.mode),
            is_logging_rank=self.is_logging_rank, group=str(self.cfg.name), job_type=stage.mode,
            total_steps=self.plan.total_steps,
            wandb_config=OmegaConf.to_container(self.cfg, resolve=True))
        return logger

    def _train_stage(self, stage: StagePlan, objs: StageObjects) -> Optional[int]:
        from msa_train.metrics import keys

        cfg = self.cfg
        train_iter = self._iterators(self.train_ds, self.progress.consumed_samples, len(objs.chunks))
        logger = self._new_logger(stage)
        self.wandb_run_ids[stage.mode] = logger.wandb_run_id
        meter = self._throughput_meter(stage)
        seq = int(cfg.train.seq_length)
        progress_meter = RunProgress(self.plan.total_steps * self.plan.tokens_per_step,
                                     start_tokens=self.progress.consumed_samples * seq)
        max_steps = cfg.train.max_steps_per_job
        try:
            while self.progress.iteration < stage.end_step:
                t0 = time.perf_counter()
                sample_recall = logger.should_sample_recall(self.progress.iteration + 1)
                if sample_recall:
                    from msa_train.model import request_recall

                    request_recall()
                result = train_step(
                    objs.chunks, objs.optimizer, objs.scheduler, objs.config, train_iter,
                    num_microbatches=self.num_microbatches, seq_length=seq,
                    micro_batch_size=int(cfg.train.micro_batch_size),
                    global_batch_size=int(cfg.train.global_batch_size),
                    device=self.runtime.device, cp_size=self.cp_size)
                self.progress.advance(self.plan.samples_per_step)
                self.job_steps += 1
                step = self.progress.iteration
                self._note_loss(result.lm_loss)
                if result.skipped:
                    _print0(f"step {step}: non-finite gradient norm ({result.grad_norm}): update "
                            f"skipped ({self.divergence.in_a_row + 1} in a row, limit "
                            f"train.max_skipped_steps={self.divergence.max_skipped_steps})")
                action = self.divergence.record(result.skipped)
                if action == "stop":
                    raise DivergenceError(self._divergence_message(step))
                if action == "rollback":
                    _drop_step_metrics()  # what the rolled-back steps recorded
                    self.steps_since_log = 0
                    if sample_recall:
                        from msa_train.model import get_recall_metrics

                        get_recall_metrics(reset=True)  # collective: every rank rolls back
                    self._rollback(stage, objs)
                    continue
                self.steps_since_log += 1
                recall_metrics = {}
                if sample_recall:
                    from msa_train.model import get_recall_metrics

                    recall_metrics = get_recall_metrics(reset=True)  # collective: every rank
                seconds = time.perf_counter() - t0
                self.guard.note_step_time(seconds)
                evaluate = bool(cfg.train.eval_interval) and step % int(cfg.train.eval_interval) == 0
                log_now = logger.should_log(step) or step == stage.end_step or evaluate
                if log_now:
                    # The KL and MoE trackers accumulate on the device between log steps and are
                    # reduced (collectives, host reads) only here: means over the log interval.
                    kl = _kl_metrics()
                    moe = _moe_metrics(objs.config, self.steps_since_log)
                    moe.update(recall_metrics)
                    self.steps_since_log = 0
                valid_loss = None
                if evaluate:
                    valid_loss = self._evaluate(objs)
                if log_now:
                    self._report_bad_loss(step)
                    metrics = {keys.LM_LOSS: None if result.lm_loss is None
                               else float(result.lm_loss),
                               keys.GRAD_NORM: result.grad_norm,
                               keys.LR: result.lr, keys.STEP_TIME_S: seconds}
                    if kl:
                        from msa_train.model.kl_tracker import mean_kl

                        metrics[keys.INDEXER_KL] = mean_kl(kl)
                        if getattr(cfg.logging, "per_layer_kl", False):
                            metrics.update({keys.indexer_kl_layer(k - 1): v for k, v in kl.items()})
                    metrics.update(moe)
                    tokens = self.progress.consumed_samples * seq
                    metrics[keys.CONSUMED_TOKENS] = tokens
                    metrics.update(progress_meter.update(tokens))
                    if meter is not None:
                        metrics.update(meter.rates(tokens=self.plan.tokens_per_step, seconds=seconds))
                    if result.skipped:
                        metrics["train/skipped_update"] = 1.0
                    # One record per step: the metrics file keeps the last record of a step.
                    metrics["valid/lm_loss"] = valid_loss
                    logger.log(step, metrics)
                stage_done = step == stage.end_step
                job_done = (max_steps is not None and self.job_steps >= int(max_steps)
                            and step < self.plan.job_end_step)
                stop = self.guard.should_stop_all(self.runtime.device)
                interval = cfg.checkpoint.save_interval
                if self.save_dir and (
                        (interval and step % int(interval) == 0)
                        or (stage_done and cfg.checkpoint.save_at_stage_end)
                        or job_done or stop):
                    self._save(objs)
                if stop:
                    return self._requeue()
                if job_done:
                    _print0(f"stopping after {self.job_steps} steps (train.max_steps_per_job); "
                            "run again to resume")
                    return 0
        finally:
            self.wandb_run_ids[stage.mode] = logger.wandb_run_id or self.wandb_run_ids.get(stage.mode)
            logger.close()
        return None

    # -- divergence policy -----------------------------------------------------------------------
    def _note_loss(self, loss: Optional[torch.Tensor]) -> None:
        """Accumulate 'loss was non-finite' on the device; read at the next log step only."""
        if loss is None:
            return
        bad = ~torch.isfinite(loss)
        self._bad_loss = bad if self._bad_loss is None else (self._bad_loss | bad)

    def _report_bad_loss(self, step: int) -> None:
        if self._bad_loss is not None and bool(self._bad_loss):
            _print0(f"step {step}: a non-finite loss occurred since the last logged step "
                    "(steps with non-finite gradients were skipped)")
        self._bad_loss = None

    def _divergence_message(self, step: int) -> str:
        latest = layout.read_tracker(self.save_dir) if self.save_dir else None
        kept = (f"the last checkpoint ({layout.iteration_dir(self.save_dir, latest)}) is untouched"
                if latest is not None else "there is no checkpoint to go back to")
        return (f"training diverged: {self.divergence.in_a_row} steps in a row up to step {step} "
                f"had a non-finite gradient norm ({self.divergence.total_skipped} skipped in this "
                f"job, {self.divergence.rollbacks} rollbacks); stopped without saving, {kept}. "
                "Lower train.lr / raise train.lr_warmup_steps, set train.rollback_on_divergence="
                "true to restart from the last checkpoint on fresh data, or raise "
                "train.max_skipped_steps")

    def _rollback(self, stage: StagePlan, objs: StageObjects) -> None:
        """Reload the last checkpoint of this stage; the data position keeps moving forward."""
        latest = layout.read_tracker(self.save_dir) if self.save_dir else None
        if latest is None:
            raise DivergenceError(self._divergence_message(self.progress.iteration)
                                  + " (no checkpoint to roll back to)")
        directory = checkpointing.select_intact(self.save_dir, "checkpoint.save",
                                                bool(self.cfg.checkpoint.get("verify", True)))
        saved = layout.read_state_json(directory) or {}
        back = Progress.from_dict(saved.get("progress", {}))
        if back.iteration <= stage.start_step:
            # A checkpoint at or before the stage boundary holds another stage's optimizer.
            raise DivergenceError(self._divergence_message(self.progress.iteration)
                                  + f" (the last checkpoint, step {back.iteration}, is not inside "
                                  f"this stage: nothing to roll back to)")
        checkpointing.load(directory, objs.chunks, objs.optimizer, objs.scheduler,
                           saved.get("world_size"))
        skipped = self.progress.consumed_samples - back.consumed_samples
        _print0(f"ROLLBACK {self.divergence.rollbacks + 1}/{self.divergence.max_rollbacks}: "
                f"{self.divergence.in_a_row} non-finite steps in a row at step "
                f"{self.progress.iteration}; reloaded {directory} (step {back.iteration}) and "
                f"skip the {skipped} samples read since it")
        self.progress.iteration = back.iteration  # consumed_samples stays: fresh data from here
        self.divergence.rolled_back()
        self._bad_loss = None

    def _throughput_meter(self, stage: StagePlan):
        from msa_train.metrics.throughput import FlopsPerToken, ThroughputMeter
        from msa_train.metrics.peaks import resolve_peak_tflops

        try:
            flops = FlopsPerToken.for_model(OmegaConf.to_object(self.cfg.model),
                                            OmegaConf.to_object(self.cfg.attention),
                                            int(self.cfg.train.seq_length), stage.mode)
        except ImportError:
            flops = None
        peak = resolve_peak_tflops(self.cfg.logging.peak_tflops) if self.runtime.is_cuda else None
        return ThroughputMeter(num_gpus=self.runtime.world_size, flops=flops, peak_tflops=peak)

    def _evaluate(self, objs: StageObjects) -> Optional[float]:
        """Mean LM loss over train.eval_iters global batches of the validation split."""
        if self.valid_ds is None:
            return None
        iters = int(self.cfg.train.eval_iters)
        # Validation always reads the same first batches, so its curve compares across steps.
        it = self._iterators(self.valid_ds, 0, len(objs.chunks))
        losses = [eval_step(objs.chunks, it, num_microbatches=self.num_microbatches,
                            seq_length=int(self.cfg.train.seq_length),
                            micro_batch_size=int(self.cfg.train.micro_batch_size),
                            device=self.runtime.device, cp_size=self.cp_size) for _ in range(iters)]
        _drop_step_metrics()  # validation forwards are not training metrics
        if not losses or losses[0] is None:
            return None  # not the last pipeline stage: only it holds the loss
        return sum(losses) / len(losses)

    # -- checkpoints and exit --------------------------------------------------------------------
    def _save(self, objs: StageObjects) -> None:
        p = self.progress
        with self.guard.deferred():  # a stop signal during the save acts after it
            directory = self._write_checkpoint(objs)
        self.owned_iterations.add(p.iteration)
        _print0(f"saved checkpoint {directory}")

    def _write_checkpoint(self, objs: StageObjects) -> str:
        p = self.progress
        return checkpointing.save(
            self.save_dir, p.iteration, objs.chunks, objs.optimizer, objs.scheduler, p.to_dict(),
            layout.state_json(self.cfg, self.plan, p, self.wandb_run_ids, self.init_report,
                              self.runtime.world_size),
            self.run_config_yaml, self.cfg.checkpoint.keep_last_k, owned=self.owned_iterations)

    def _requeue(self) -> int:
        from msa_train.lifecycle import REQUEUE_EXIT_CODE, write_requeue_request

        reason = self.guard.stop_reason
        if torch.distributed.get_rank() == 0 and self.save_dir:
            write_requeue_request(self.save_dir, reason, self.progress.iteration)
        _print0(f"stopping at step {self.progress.iteration} ({reason}): exit {REQUEUE_EXIT_CODE} "
                "asks the launcher to requeue")
        return REQUEUE_EXIT_CODE

    def _finish(self) -> None:
        if self.is_logging_rank and getattr(self.cfg.logging, "plot_at_end", False):
            from msa_train.metrics.jsonl import METRICS_FILENAME
            from msa_train.metrics.plots import plot_run

            path = os.path.join(str(self.cfg.run_dir), METRICS_FILENAME)
            if os.path.isfile(path):
                try:
                    _print0(f"plot: {plot_run(path)}")
                except Exception as exc:  # a plot must never fail a finished run
                    print(f"plot_run failed: {exc}", file=sys.stderr)
        _print0(f"done: {self.progress.iteration} steps, "
                f"{self.progress.consumed_samples * int(self.cfg.train.seq_length):,} tokens")


def _kl_metrics() -> Dict[int, float]:
    from msa_train.model.kl_tracker import get_kl_metrics

    return get_kl_metrics(reset=True)


def _drop_step_metrics() -> None:
    """Forget what the KL and MoE trackers accumulated (steps that were rolled back)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from msa_train.model.kl_tracker import clear

    clear()
    clear_aux_losses_tracker()


def _moe_metrics(config, steps: int = 1) -> Dict[str, float]:
    """Load-balancing loss per MoE layer, averaged over the `steps` optimizer steps that Megatron's
    tracker accumulated since the last call."""
    if getattr(config, "num_moe_experts", None) is None:
        return {}
    from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                          get_moe_layer_wise_logging_tracker,
                                                          reduce_aux_losses_tracker_across_ranks)
    from msa_train.metrics import keys

    reduce_aux_losses_tracker_across_ranks()
    tracker = get_moe_layer_wise_logging_tracker()
    out = {}
    for name, entry in tracker.items():
        values = entry["values"].float()
        layers = int((values != 0).sum().item()) or 1
        if name == "load_balancing_loss":
            out[keys.MOE_LB_LOSS] = float(values.sum().item()) / layers / max(steps, 1)
    clear_aux_losses_tracker()
    return out
