"""Training-side hook: `checkpoint.init_from` = an import-hf OUT_DIR with model=from_init
(experiment=cpt_from_hf) takes the model shape and the tokenizer from it.

Called on the composed config before validation. Rules:
  - every model.* field takes the checkpoint's value; a field set to something else than the
    placeholder's default and the checkpoint's value is an error naming both;
  - the index branch's layout (MSA layer map, index_dim, index norm / RoPE, block size, top-k)
    is the one the import initialised (`--attention`), unless the command line overrides the
    attention group or one of its fields;
  - the saved Hugging Face tokenizer is used unless data.tokenizer.name_or_path is set (or the
    data is the byte-level stdlib corpus);
  - the tokenizer must fit the checkpoint's vocabulary, and the embedding keeps exactly the
    checkpoint's rows (make_vocab_size_divisible_by is set so that the padding adds none).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional

from msa_train.convert import converted
from msa_train.model.config import ModelConfig

PLACEHOLDER = "from_init"


class CPTConfigError(ValueError):
    """The CPT config and the converted checkpoint disagree; the message names both values."""


def _manifest(init_from: str) -> Optional[Dict[str, Any]]:
    for root in (init_from, os.path.dirname(os.path.normpath(init_from))):
        manifest = converted.read_manifest(root)
        if manifest is not None:
            manifest["_root"] = root
            return manifest
    return None


def apply_converted_model(cfg) -> None:
    """Fill cfg.model (and the tokenizer) from an import-hf checkpoint; no-op for other models."""
    if cfg.model.get("name") != PLACEHOLDER:
        return
    init_from = cfg.checkpoint.get("init_from")
    if not init_from:
        raise CPTConfigError("model=from_init (experiment=cpt_from_hf) takes the model from "
                             "checkpoint.init_from: set it to an `msa-convert import-hf` OUT_DIR")
    manifest = _manifest(str(init_from)) if os.path.isdir(str(init_from)) else None
    if manifest is None:
        raise CPTConfigError(f"checkpoint.init_from={init_from} is not an `msa-convert import-hf` "
                             f"output (no {converted.MANIFEST}); model=from_init needs one")
    saved = converted.model_from_dict(manifest["model"])
    defaults = ModelConfig(name=PLACEHOLDER)
    overridden = {o.split("=")[0].lstrip("+~")[len("model."):] for o in _cli_overrides()
                  if o.lstrip("+~").startswith("model.")}
    conflicts = []
    for f in dataclasses.fields(ModelConfig):
        if f.name == "name" or f.name not in cfg.model:
            continue
        value, want = _plain(cfg.model[f.name]), getattr(saved, f.name)
        # Set on the command line, or in a config file (then it differs from the placeholder).
        touched = f.name in overridden or value != getattr(defaults, f.name)
        if touched and value != want:
            conflicts.append(f"model.{f.name}={value!r} but checkpoint.init_from={init_from} has "
                             f"{want!r}")
    if conflicts:
        raise CPTConfigError("; ".join(conflicts) + ": drop the model override (the shape comes "
                             "from the checkpoint) or convert another model")
    for f in dataclasses.fields(ModelConfig):
        cfg.model[f.name] = getattr(saved, f.name)
    if not any(o.split("=")[0].lstrip("+~").startswith("attention") for o in _cli_overrides()):
        imported = converted.attention_from_dict(manifest["attention"])
        for name in _ATTENTION_LAYOUT:
            cfg.attention[name] = _plain_value(getattr(imported, name))
    _apply_tokenizer(cfg, manifest, saved, str(init_from))


# AttentionConfig fields that shape (or place) the imported index branch.
_ATTENTION_LAYOUT = ("block_size", "topk", "index_dim", "dense_first_layers", "layer_map",
                     "layer_ids", "force_sink", "local_window", "index_norm", "index_rope")


def _cli_overrides():
    """The command line's Hydra overrides (empty when not run through Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - no Hydra context: nothing was overridden
        pass
    return []


def _plain_value(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _apply_tokenizer(cfg, manifest: Dict[str, Any], model: ModelConfig, init_from: str) -> None:
    from msa_train.data import build_tokenizer

    tok = cfg.data.tokenizer
    if manifest.get("tokenizer") and not tok.get("name_or_path") and cfg.data.source != "stdlib":
        tok.type = "huggingface"
        tok.name_or_path = os.path.join(manifest["_root"], manifest["tokenizer"])
    tp = int(cfg.parallel.tp)
    rows = model.vocab_size
    if rows % tp:
        raise CPTConfigError(f"the checkpoint's vocabulary ({rows} rows) does not split over "
                             f"parallel.tp={tp}: pick a tp that divides it")
    size = build_tokenizer(tok).vocab_size
    if size > rows:
        raise CPTConfigError(
            f"data.tokenizer ({tok.type} {tok.get('name_or_path') or ''}) has {size} tokens but "
            f"checkpoint.init_from={init_from} has {rows} embedding rows: use the model's tokenizer")
    # padded_vocab_size(size, rows / tp, tp) == rows: the embedding keeps the checkpoint's rows.
    tok.make_vocab_size_divisible_by = rows // tp
