"""A trained checkpoint as one in-process model for evaluation.

The model is rebuilt from the run_config.yaml that msa-train stores beside every iteration and
loaded with the trainer's own weights loader. torch_dist checkpoints are layout-independent, so a
checkpoint written under any TP/PP/EP/CP layout loads into this single-process (TP=1) model.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class EvalModel:
    cfg: object  # the run's config, typed by the schema
    model: torch.nn.Module
    tokenizer: object
    iter_dir: str
    iteration: int
    device: torch.device
    msa_layers: List[int]  # 0-based decoder layers with an index branch

    @property
    def block_size(self) -> int:
        return int(self.cfg.attention.block_size)

    @property
    def topk(self) -> int:
        return int(self.cfg.attention.topk)

    def set_mode(self, mode: str) -> None:
        """'sparse': MSA layers attend to their top-k blocks; 'dense': full causal attention
        on the same weights."""
        from msa_train.model import set_msa_mode

        set_msa_mode(self.model, mode)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [T] -> fp32 logits [T, V] (the padded vocabulary rows cut off)."""
        tokens = ids.to(self.device)[None]
        pos = torch.arange(tokens.shape[1], device=self.device)[None]
        out = self.model(tokens, pos, attention_mask=None)  # [1, T, V_padded]
        return out[0, :, : self.tokenizer.vocab_size].float()


def load_run_config(iter_dir: str, override: Optional[str] = None):
    from omegaconf import OmegaConf

    from msa_train.config.store import MSATrainConfig
    from msa_train.trainer.ckpt_layout import RUN_CONFIG_FILENAME

    path = override or os.path.join(iter_dir, RUN_CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no run config at {path}: pass --config <run_config.yaml>")
    # Typed by the schema, so model/attention become their dataclasses (layer maps, validation).
    return OmegaConf.merge(OmegaConf.structured(MSATrainConfig), OmegaConf.load(path))


def resolve_checkpoint(path: str, field: str = "checkpoint") -> str:
    """A run dir, a save dir or an iter_XXXXXXX dir -> the iteration directory."""
    from msa_train.trainer.ckpt_layout import resolve, save_dir_of_run

    return resolve(save_dir_of_run(path, field), field)


def _iteration_of(iter_dir: str) -> int:
    name = os.path.basename(os.path.normpath(iter_dir))
    return int(name.split("_")[-1]) if name.startswith("iter_") else -1


def load_eval_model(path: str, device: str = "cpu", max_seq_len: Optional[int] = None,
                    config: Optional[str] = None) -> EvalModel:
    """Build the checkpoint's model in this process (fp32 on CPU, bf16 on CUDA) and load it.

    The caller owns the process-group lifetime: call close() when done.
    """
    from omegaconf import OmegaConf

    from msa_train.compat import init_parallel
    from msa_train.data import build_tokenizer, padded_vocab_size
    from msa_train.model import build_model, build_transformer_config
    from msa_train.trainer.init_from import load_weights
    from msa_train.trainer.setup import index_param_predicate

    iter_dir = resolve_checkpoint(path)
    cfg = load_run_config(iter_dir, config)
    model_cfg = OmegaConf.to_object(cfg.model)
    attn_cfg = OmegaConf.to_object(cfg.attention)
    mask = attn_cfg.layer_mask(model_cfg.num_layers)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    # The checkpoint's global shapes use the vocabulary padded for the TRAINING tensor parallelism.
    vocab = padded_vocab_size(tokenizer.vocab_size,
                              int(cfg.data.tokenizer.make_vocab_size_divisible_by),
                              int(cfg.parallel.tp))
    dev = torch.device(device)
    init_parallel({})
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tconfig = build_transformer_config(model_cfg, attn_cfg, {}, dtype)
    model = build_model(tconfig, vocab_size=vocab,
                        max_seq_len=max(int(max_seq_len or 0), int(cfg.train.seq_length)))
    model.to(dev)
    report = load_weights(iter_dir, [model], index_param_predicate([model]), field_name="checkpoint")
    if report.added:
        print(f"warning: {len(report.added)} index-branch weights were not in the checkpoint (a "
              "dense checkpoint?): sparse-mode results use randomly initialised indexers",
              file=sys.stderr)
    model.eval()
    return EvalModel(cfg=cfg, model=model, tokenizer=tokenizer, iter_dir=iter_dir,
                     iteration=_iteration_of(iter_dir), device=dev,
                     msa_layers=[i for i, m in enumerate(mask) if m])


def close() -> None:
    from msa_train.compat import destroy_parallel

    destroy_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
