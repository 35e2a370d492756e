"""The directory `msa-convert import-hf` writes, and how a training run finds its model in it.

    OUT_DIR/latest_checkpointed_iteration.txt   "0": OUT_DIR is a checkpoint save directory
    OUT_DIR/iter_0000000/                       Megatron torch_dist weights (no optimizer state)
    OUT_DIR/msa_convert.json                    model and attention config, source config.json
    OUT_DIR/tokenizer/                          the Hugging Face tokenizer files, when present
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from msa_train.convert.families.base import ConversionError
from msa_train.model.config import AttentionConfig, ModelConfig

MANIFEST = "msa_convert.json"
TOKENIZER_DIR = "tokenizer"
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "configs")


def write_manifest(out_dir: str, manifest: Dict[str, Any]) -> None:
    with open(os.path.join(out_dir, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_manifest(root: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def model_from_dict(values: Dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in values.items() if k in names})


def attention_from_dict(values: Dict[str, Any]) -> AttentionConfig:
    names = {f.name for f in dataclasses.fields(AttentionConfig)}
    return AttentionConfig(**{k: v for k, v in values.items() if k in names})


def load_attention(name_or_path: str) -> AttentionConfig:
    """configs/attention/<name>.yaml, or a yaml file path."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(CONFIGS, "attention", f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIGS, "attention")) if f.endswith(".yaml"))
        raise ConversionError(f"--attention {name_or_path!r}: no such config (one of {names} or a yaml path)")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return attention_from_dict(values)
