"""`msa-convert export-hf`: an msa-train checkpoint (any TP/PP/EP layout) -> a Hugging Face
directory. Models without MSA layers (or with --no-msa) become their stock architecture; models
with MSA layers become MSAForCausalLM with its plain-PyTorch modeling file (trust_remote_code).

Streaming: one Megatron tensor is read at a time and the Hugging Face tensors go into the current
safetensors shard, written when it reaches --shard-size; peak memory is one shard plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from msa_train.convert import converted, tensors
from msa_train.convert.dcp_io import CheckpointReader
from msa_train.convert.families import FAMILIES, MSA, family_for_model
from msa_train.convert.families.base import ConversionError, Family
from msa_train.convert.hf_source import copy_tokenizer
from msa_train.convert.plan import Item, expand_rules
from msa_train.model.config import AttentionConfig, ModelConfig

MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
MODELING_FILES = ("configuration_msa.py", "modeling_msa.py")
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
# ModelConfig fields a stock architecture must reproduce exactly (else: export the MSA model).
_STOCK_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "rotary_base", "rotary_percent", "normalization",
                 "gated_linear_unit", "qk_layernorm", "add_qkv_bias", "position_embedding_type",
                 "untie_embeddings_and_output_weights", "rope_scaling", "rope_scaling_factor",
                 "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                 "moe_shared_expert_intermediate_size", "moe_router_score_function",
                 "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
                 "norm_zero_centered", "activation", "activation_clamp")


@dataclasses.dataclass
class Source:
    iteration_dir: str
    model: ModelConfig
    attention: AttentionConfig
    manifest: Optional[Dict[str, Any]]  # the import manifest this checkpoint descends from
    tokenizer_dir: Optional[str]


def _load_yaml(path: str) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _manifest_near(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The import manifest of a checkpoint root (or of the root above an iteration dir)."""
    if not path or not os.path.isdir(path):
        return None
    for root in (path, os.path.dirname(os.path.normpath(path))):
        manifest = converted.read_manifest(root)
        if manifest is not None:
            manifest["_root"] = root
            return manifest
    return None


def resolve_source(path: str) -> Source:
    """A checkpoint save dir, an iter_XXXXXXX dir, an import-hf OUT_DIR, or a run dir (its
    run_config.yaml names the save dir)."""
    from msa_train.trainer.ckpt_layout import RUN_CONFIG_FILENAME, resolve, save_dir_of_run

    directory = resolve(save_dir_of_run(path, "CKPT_DIR"), "CKPT_DIR")
    manifest = _manifest_near(directory)
    run_cfg_path = os.path.join(directory, RUN_CONFIG_FILENAME)
    tokenizer_dir = None
    if os.path.isfile(run_cfg_path):
        run_cfg = _load_yaml(run_cfg_path)
        model = converted.model_from_dict(run_cfg["model"])
        attn = converted.attention_from_dict(run_cfg["attention"])
        init_from = (run_cfg.get("checkpoint") or {}).get("init_from")
        manifest = manifest or _manifest_near(init_from)
        tok = (run_cfg.get("data") or {}).get("tokenizer") or {}
        if tok.get("type") == "huggingface" and tok.get("name_or_path") and os.path.isdir(tok["name_or_path"]):
            tokenizer_dir = tok["name_or_path"]
    elif manifest is not None:
        model = converted.model_from_dict(manifest["model"])
        attn = converted.attention_from_dict(manifest["attention"])
    else:
        raise ConversionError(
            f"{directory} has neither run_config.yaml (msa-train checkpoints) nor {converted.MANIFEST} "
            "(import-hf output) beside it: the model config is unknown")
    if tokenizer_dir is None and manifest is not None and manifest.get("tokenizer"):
        tokenizer_dir = os.path.join(manifest["_root"], manifest["tokenizer"])
    return Source(directory, model, attn, manifest, tokenizer_dir)


def _check_stock(family: Family, model: ModelConfig) -> None:
    again = converted.model_from_dict(dict(family.to_model(family.to_hf(model)), name=model.name))
    wrong = [f"{name}: model {getattr(model, name)!r}, {family.architecture} "
             f"{getattr(again, name)!r}" for name in _STOCK_FIELDS
             if getattr(model, name) != getattr(again, name)]
    if model.num_moe_experts is not None and model.moe_layout() != again.moe_layout():
        wrong.append(f"MoE layer layout: model {model.moe_layout()}, {family.architecture} "
                     f"{again.moe_layout()}")
    if wrong:
        raise ConversionError(f"{family.architecture} cannot hold this model ({'; '.join(wrong)}); "
                              "export it as the MSA model (without --no-msa) instead")


def hf_config_for(src: Source, family: Family, msa: bool, dtype: torch.dtype) -> Dict[str, Any]:
    m = src.model
    base = dict((src.manifest or {}).get("hf_config") or {})
    # Fields of the source config.json that describe tokens and generation survive the round trip.
    keep = {k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base}
    cfg = dict(keep, **family.to_hf(m))
    cfg["architectures"] = [family.architecture]
    cfg["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float32: "float32",
                          torch.float16: "float16"}[dtype]
    if family.wrap_hf is not None:
        return family.wrap_hf(cfg, src.attention, base)
    if msa:
        a = src.attention
        cfg.update(
            auto_map={"AutoConfig": "configuration_msa.MSAConfig",
                      "AutoModelForCausalLM": "modeling_msa.MSAForCausalLM"},
            msa_layers=[int(x) for x in a.layer_mask(m.num_layers)],
            msa_block_size=a.block_size, msa_topk=a.topk, msa_index_dim=a.index_dim,
            msa_index_norm=a.index_norm, msa_index_rope=a.index_rope,
            msa_force_sink=a.force_sink, msa_local_window=a.local_window,
        )
    return cfg


class _ShardWriter:
    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.current: Dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: List[Tuple[str, List[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.current, os.path.join(self.directory, name), metadata={"format": "pt"})
        self.files.append((name, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> int:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, tmp_name), os.path.join(self.directory, final))
            weight_map.update({k: final for k in keys})
        if n > 1:
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as fh:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, fh,
                          indent=2, sort_keys=True)
        return n


def _hf_tensors(item: Item, tensor: torch.Tensor, model: ModelConfig):
    kind = tensors.per_expert_kind(item.rule.kind)
    slices = list(tensor.unbind(0)) if item.per_expert else [tensor]
    if len(slices) != len(item.hf):
        raise ConversionError(f"{item.megatron}: {len(slices)} experts in the checkpoint, the "
                              f"config says {len(item.hf)}")
    for names, piece in zip(item.hf, slices):
        yield from zip(names, tensors.split(kind, piece, model))


def export_hf(ckpt: str, out_dir: str, no_msa: bool = False, dtype: Optional[str] = None,
              shard_size_gb: float = 2.0, progress: bool = True) -> Dict[str, Any]:
    from tqdm import tqdm

    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConversionError(f"OUT_DIR {out_dir} exists and is not empty: pick a new directory")
    start = time.time()
    src = resolve_source(ckpt)
    reader = CheckpointReader(src.iteration_dir)
    model = src.model
    emb = "embedding.word_embeddings.weight"
    if emb not in reader:
        raise ConversionError(f"{src.iteration_dir} holds no {emb}: not a model checkpoint")
    # The padded vocabulary of a trained run (multiple of make_vocab_size_divisible_by x TP).
    model = dataclasses.replace(model, vocab_size=reader.shape(emb)[0])
    msa = any(src.attention.layer_mask(model.num_layers)) and not no_msa
    family = MSA if msa else family_for_model(model)
    attn = src.attention if msa else dataclasses.replace(src.attention, layer_map=None, layer_ids=[])
    native = FAMILIES.get(model.hf_family or "")
    if native is not None and native.to_attention is not None:
        # A family with MSA layers of its own (MiniMax-M3) exports to its own layout.
        if no_msa:
            raise ConversionError(f"--no-msa: {native.architecture} has no full-attention "
                                  "variant; export without --no-msa")
        family, attn, msa = native, src.attention, False
        _check_stock(family, model)
    elif msa:
        family.to_hf(model)  # refuses features the MSA modeling file lacks
    else:
        _check_stock(family, model)
    items = expand_rules(family, model, attn)
    missing = [item.megatron for item in items if item.megatron not in reader]
    if missing:
        raise ConversionError(f"{src.iteration_dir} lacks tensors the {family.architecture} export "
                              f"needs: {missing[:8]}")
    planned = {item.megatron for item in items}
    unused = [k for k in reader.tensors if k.startswith(_MODEL_PREFIXES) and k not in planned
              and not (no_msa and ".indexer." in k)]
    if unused:
        raise ConversionError(f"checkpoint tensors the {family.architecture} table has no place for: "
                              f"{unused[:8]}")
    first = reader.tensors[emb].properties.dtype
    target = {"bf16": torch.bfloat16, "fp32": torch.float32, None: first}.get(dtype)
    if target is None:
        raise ConversionError(f"--dtype {dtype!r}: one of bf16, fp32")

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".msa-export-", dir=parent)
    try:
        writer = _ShardWriter(tmp, int(shard_size_gb * 2**30))
        for item in tqdm(items, desc="export-hf", unit="tensor", disable=not progress):
            tensor = reader.load(item.megatron)
            for name, piece in _hf_tensors(item, tensor, model):
                writer.add(name, piece.to(torch.float32 if item.rule.fp32 else target))
            del tensor
        shards = writer.finish()
        cfg = hf_config_for(src, family, msa, target)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)
        if msa:
            for name in MODELING_FILES:
                shutil.copy2(os.path.join(MODELING_DIR, name), os.path.join(tmp, name))
        tokenizer = copy_tokenizer(src.tokenizer_dir, tmp) if src.tokenizer_dir else []
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"architecture": family.architecture, "msa": msa, "shards": shards,
            "tensors": len(items), "bytes": writer.total, "tokenizer": tokenizer,
            "source": src.iteration_dir, "seconds": round(time.time() - start, 2)}
