"""Does a checkpoint hold the model this config builds? Compared field by field, before compute.

Megatron's loader fills the tensors the current model asks for and ignores the rest, so resuming
a 4-layer checkpoint with model.num_layers=2 used to load half the model and carry on. The run
config saved beside each iteration (run_config.yaml) records the fields that fix the shapes of
the weights; a full resume must match them all.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from msa_train.trainer import ckpt_layout as layout
from msa_train.trainer.ckpt_layout import CheckpointError

# Fields that change the set or the shapes of the model's tensors (architecture, not training).
MODEL_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "position_embedding_type", "normalization", "gated_linear_unit",
    "qk_layernorm", "untie_embeddings_and_output_weights", "num_moe_experts",
    "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_first_k_dense",
    "moe_layer_freq")
ATTENTION_SHAPE_FIELDS = ("index_dim", "index_norm", "dense_first_layers", "layer_map",
                          "layer_ids")


def read_run_config(directory: str) -> Optional[Dict[str, Any]]:
    """The run config saved with an iteration as a plain dict; None if it has none."""
    path = os.path.join(directory, layout.RUN_CONFIG_FILENAME)
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is damaged ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0]}); restore it from a copy or resume "
                              "from an earlier iteration (see README: When things go wrong)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is damaged (not a mapping); restore it from a copy")
    return data


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def shape_differences(saved: Dict[str, Any], cfg) -> List[str]:
    """'section.field: checkpoint X, this config Y' for every shape field that differs."""
    out = []
    for section, fields in (("model", MODEL_SHAPE_FIELDS), ("attention", ATTENTION_SHAPE_FIELDS)):
        had = saved.get(section) or {}
        now = cfg[section]
        for name in fields:
            if name not in had or name not in now:
                continue
            a, b = had[name], _plain(now[name])
            if a != b:
                out.append(f"{section}.{name}: checkpoint {a!r}, this config {b!r}")
    return out


def check_same_shape(directory: str, cfg, field_name: str) -> None:
    """Refuse to resume `directory` when its model differs from cfg's; nothing is touched."""
    saved = read_run_config(directory)
    if saved is None:
        return  # written by another tool: the tensor-shape check at load time still runs
    diffs = shape_differences(saved, cfg)
    if diffs:
        raise CheckpointError(
            f"{field_name}: {directory} holds a different model than this config builds:\n    "
            + "\n    ".join(diffs)
            + "\n  Set these fields back to the checkpoint's values to resume it, or point "
              "checkpoint.save at a new directory (checkpoint.init_from loads weights only). "
              "Nothing was loaded or deleted.")


def same_shape(directory: str, cfg) -> bool:
    try:
        saved = read_run_config(directory)
    except CheckpointError:
        return False
    return saved is not None and not shape_differences(saved, cfg)
