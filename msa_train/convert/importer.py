"""`msa-convert import-hf`: a Hugging Face checkpoint -> an msa-train (Megatron torch_dist) one.

Everything is checked before anything is written (architecture, every tensor's shape, every
tensor used); the output appears under OUT_DIR only once complete (written to a sibling temporary
directory, then renamed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import warnings
import zlib
from typing import Any, Dict, List, Optional

import torch

from msa_train.convert import converted, tensors
from msa_train.convert.families import family_for_config
from msa_train.convert.families.base import ConversionError, Family
from msa_train.convert.hf_source import HFSource, copy_tokenizer, fp8_block_size, read_config
from msa_train.convert.plan import Item, check_head_counts, expand_rules, megatron_shapes, meta
from msa_train.model.config import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Tensors some Hugging Face checkpoints carry that are not weights (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def model_config_from_hf(cfg: Dict[str, Any]) -> ModelConfig:
    family = family_for_config(cfg)
    model = converted.model_from_dict(dict(family.to_model(cfg), name=f"hf_{family.name}",
                                           hf_family=family.name))
    check_head_counts(model)
    return model


def _hf_shape_of(item: Item, src: HFSource) -> List[Optional[tuple]]:
    return [src.shape(k) if k in src else None for k in item.hf_keys()]


def _combined_meta(item: Item, src: HFSource, model: ModelConfig) -> torch.Tensor:
    kind = tensors.per_expert_kind(item.rule.kind)
    per = [tensors.combine(kind, [meta(src.shape(k)) for k in group], model) for group in item.hf]
    return torch.stack(per) if item.per_expert else per[0]


def _fresh(key: str, shape, std: float, seed: int, norm_offset: float = 0.0) -> torch.Tensor:
    if "norm" in key:
        # One, or zero for a zero-centred norm (its weight is the offset from one).
        return torch.full(shape, 1.0 - norm_offset)
    gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    return torch.randn(shape, generator=gen) * std


def _producer(item: Item, src: HFSource, model: ModelConfig, shape, seed: int):
    def make() -> torch.Tensor:
        if item.rule.fresh_if_missing and not all(k in src for k in item.hf_keys()):
            return _fresh(item.megatron, shape, model.init_method_std, seed,
                          1.0 if model.norm_zero_centered else 0.0)
        kind = tensors.per_expert_kind(item.rule.kind)
        per = [tensors.combine(kind, [src.get(k) for k in group], model) for group in item.hf]
        return torch.stack(per) if item.per_expert else per[0]
    return make


def skipped_tensors(family: Family, src: HFSource, model: ModelConfig) -> Dict[str, List[str]]:
    """The Hugging Face tensors the table leaves out on purpose, per reason (vision, mtp)."""
    out: Dict[str, List[str]] = {}
    if family.skip is not None:
        for key in sorted(src.keys()):
            reason = family.skip(key, model.num_layers)
            if reason:
                out.setdefault(reason, []).append(key)
    return out


_SKIP_NOTES = {
    "vision": "{n} vision-tower tensors left out (the text model is converted)",
    "mtp": "WARNING: {n} multi-token-prediction (MTP) tensors left out: msa-train does not build "
           "MTP modules, so training runs without the MTP loss and an export has no MTP weights",
}


def skip_notes(skipped: Dict[str, List[str]]) -> List[str]:
    notes = []
    for reason, keys in sorted(skipped.items()):
        text = _SKIP_NOTES.get(reason, "{n} %s tensors left out" % reason).format(n=len(keys))
        notes.append(f"{text} (e.g. {', '.join(keys[:2])})")
    return notes


def check_plan(items: List[Item], src: HFSource, model: ModelConfig, expected: Dict[str, tuple],
               family: str, skip=None) -> List[str]:
    """Every Megatron tensor is produced with its shape, every Hugging Face tensor is used (or
    left out on purpose by `skip`, the table's (key, num_layers) -> reason).
    Returns the keys that start fresh (index branch)."""
    errors, fresh = [], []
    produced = {item.megatron for item in items}
    for key in sorted(set(expected) - produced):
        errors.append(f"no rule of table {family!r} produces Megatron tensor {key}")
    for item in items:
        if item.megatron not in expected:
            errors.append(f"table {family!r} writes {item.megatron}, which this model does not have")
            continue
        shapes = _hf_shape_of(item, src)
        if any(s is None for s in shapes):
            missing = [k for k, s in zip(item.hf_keys(), shapes) if s is None]
            if item.rule.fresh_if_missing and len(missing) == len(shapes):
                fresh.append(item.megatron)
                continue
            errors.append(f"{item.megatron} needs Hugging Face tensor(s) {missing[:4]}, which the "
                          "checkpoint lacks")
            continue
        try:
            got = tuple(_combined_meta(item, src, model).shape)
        except RuntimeError as exc:
            errors.append(f"{item.hf_keys()[:3]} -> {item.megatron}: shapes {shapes[:3]} do not fit "
                          f"config.json ({exc})")
            continue
        if got != tuple(expected[item.megatron]):
            errors.append(f"{item.megatron}: Hugging Face {item.hf_keys()[:3]} with shapes "
                          f"{shapes[:3]} give {got}, config.json implies {tuple(expected[item.megatron])}")
    used = {k for item in items for k in item.hf_keys()}
    for key in sorted(set(src.keys()) - used):
        if key.endswith(_IGNORED_SUFFIXES) or (skip is not None and skip(key, model.num_layers)):
            continue
        if key == "lm_head.weight" and not model.untie_embeddings_and_output_weights:
            continue  # tied: some checkpoints store the shared matrix twice
        errors.append(f"Hugging Face tensor {key} is not used by table {family!r}")
    if errors:
        raise ConversionError("cannot convert:\n  " + "\n  ".join(errors[:20])
                              + (f"\n  ... {len(errors) - 20} more" if len(errors) > 20 else ""))
    return fresh


def import_hf(hf_dir: str, out_dir: str, attention: Optional[str] = None, dtype: str = "bf16",
              seed: int = 1234, progress: bool = True) -> Dict[str, Any]:
    """Convert; returns the manifest written to OUT_DIR/msa_convert.json.

    attention: the MSA layout to give the model (a configs/attention name or yaml path; default
    "paper"); checkpoints that carry their own MSA layers (MiniMax-M3) take theirs instead."""
    from tqdm import tqdm

    from msa_train.trainer.ckpt_layout import iteration_dir, write_tracker

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: one of {sorted(DTYPES)}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConversionError(f"OUT_DIR {out_dir} exists and is not empty: pick a new directory")
    start = time.time()
    hf_cfg = read_config(hf_dir)
    family = family_for_config(hf_cfg)
    model = model_config_from_hf(hf_cfg)
    if family.to_attention is not None:
        if attention is not None:
            raise ConversionError(f"--attention {attention!r}: a {family.architecture} checkpoint "
                                  "carries its own MSA layout (sparse_attention_config); drop it")
        attn = converted.attention_from_dict(family.to_attention(hf_cfg))
        attention = "checkpoint"
    else:
        attention = attention or "paper"
        attn = converted.load_attention(attention)
    src = HFSource(hf_dir, fp8_block=fp8_block_size(hf_cfg))
    items = expand_rules(family, model, attn)
    expected = megatron_shapes(model, attn)
    fresh = check_plan(items, src, model, expected, family.name, skip=family.skip)
    skipped = skipped_tensors(family, src, model)
    notes = skip_notes(skipped)
    for note in notes:  # msa-convert prints the notes itself (it silences Python warnings)
        warnings.warn(note, stacklevel=2)

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".msa-convert-", dir=parent)
    try:
        target = DTYPES[dtype]
        specs = {item.megatron: (tuple(expected[item.megatron]),
                                 torch.float32 if item.rule.fp32 else target) for item in items}
        producers = {item.megatron: _producer(item, src, model, expected[item.megatron], seed)
                     for item in items}
        bar = tqdm(total=len(specs), desc="import-hf", unit="tensor", disable=not progress)
        from msa_train.convert.dcp_io import write_checkpoint

        write_checkpoint(iteration_dir(tmp, 0), specs, producers,
                         common={"msa_convert": {"source": os.path.abspath(hf_dir)}},
                         on_write=lambda key: bar.update(1))
        bar.close()
        tokenizer = copy_tokenizer(hf_dir, os.path.join(tmp, converted.TOKENIZER_DIR))
        manifest = {
            "format": 1,
            "source": os.path.abspath(hf_dir),
            "family": family.name,
            "dtype": dtype,
            "attention_name": attention,
            "model": dataclasses.asdict(model),
            "attention": dataclasses.asdict(attn),
            "hf_config": hf_cfg,
            "tokenizer": converted.TOKENIZER_DIR if tokenizer else None,
            "fresh": fresh,
            "skipped": {reason: len(keys) for reason, keys in skipped.items()},
            "notes": notes,
            "num_tensors": len(specs),
            "seconds": round(time.time() - start, 2),
        }
        converted.write_manifest(tmp, manifest)
        write_tracker(tmp, 0)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
