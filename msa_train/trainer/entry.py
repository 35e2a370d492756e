"""From a composed config to a finished (or requeued) job."""

from __future__ import annotations

import logging
import os

from omegaconf import DictConfig

from msa_train.config.validate import validate_config
from msa_train.lifecycle import clear_requeue_request
from msa_train.trainer.run_lock import lock_for_run
from msa_train.trainer.runtime import env_world_size, init_runtime, shutdown_runtime


def _write_run_config(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from msa_train.trainer.ckpt_layout import RUN_CONFIG_FILENAME, write_atomic

    run_dir = str(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    write_atomic(os.path.join(run_dir, RUN_CONFIG_FILENAME), OmegaConf.to_yaml(cfg, resolve=True))


def run_training(cfg: DictConfig) -> int:
    # experiment=cpt_from_hf: the model shape (and tokenizer) of an `msa-convert import-hf` output.
    from msa_train.convert.cpt import apply_converted_model

    apply_converted_model(cfg)
    if cfg.dry_run:
        # Plans (and validates) at the layout's target world size, not this process's.
        from msa_train.dry_run import dry_run

        dry_run(cfg, env_world_size())
        return 0
    # Fail on bad configs before any process group, model or dataset exists.
    validate_config(cfg, env_world_size())
    lock = None
    if os.environ.get("RANK", "0") == "0":
        # One job per run: global rank 0 holds the lock until the job ends (run_lock.py).
        lock = lock_for_run(cfg.checkpoint.save, str(cfg.run_dir)).acquire()
        for note in lock.took_over:
            print(f"msa-train: {note}", flush=True)
        if cfg.checkpoint.save:
            # A request left by an earlier job (already acted on by its launcher) is stale now.
            clear_requeue_request(str(cfg.checkpoint.save))
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig) -> int:
    logging.getLogger("megatron").setLevel(logging.WARNING)
    runtime = init_runtime(cfg.train, cfg.parallel)
    try:
        if runtime.rank == 0:
            # Only rank 0 writes the resolved config (no per-rank or timestamped directories).
            _write_run_config(cfg)
        from msa_train.trainer.loop import Trainer

        return Trainer(cfg, runtime).run()
    finally:
        shutdown_runtime()
