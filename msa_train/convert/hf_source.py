"""A local Hugging Face checkpoint directory: config.json + safetensors (one file or sharded)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from msa_train.convert.families.base import ConversionError

# Files of a Hugging Face tokenizer, copied next to a converted checkpoint when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")


def read_config(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory} has no config.json: pass a Hugging Face model directory")
    with open(path) as fh:
        cfg = json.load(fh)
    return cfg


_SCALE_SUFFIX = "_scale_inv"  # block-wise fp8 checkpoints: W.weight + W.weight_scale_inv


def fp8_block_size(cfg: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """(rows, cols) of a block-wise fp8 checkpoint's scale blocks (DeepSeek-V3 / MiniMax layout:
    quantization_config.quant_method "fp8", weight_block_size), or None for an unquantized one."""
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8":
        raise ConversionError(f"config.json quantization_config.quant_method="
                              f"{q.get('quant_method')!r}: only block-wise fp8 checkpoints are "
                              "read; dequantize it to bf16 first")
    block = q.get("weight_block_size")
    if not block or len(block) != 2:
        raise ConversionError("config.json fp8 quantization_config needs a 2-D weight_block_size")
    return int(block[0]), int(block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """fp8 [rows, cols] x fp32 per-block scales [ceil(rows/br), ceil(cols/bc)] -> fp32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)
    return weight.float() * scale[:, :cols]


class HFSource:
    """Lazy tensor access by name; a tensor is read from its (memory-mapped) file when asked.
    Block-wise fp8 weights (fp8_block given) come back dequantized to fp32; their scale tensors
    are not listed as tensors of their own."""

    def __init__(self, directory: str, fp8_block: Optional[Tuple[int, int]] = None):
        from safetensors import safe_open

        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise ConversionError(
                f"{directory} has no *.safetensors weights (pytorch_model.bin is not read: "
                "convert it with transformers' save_pretrained(safe_serialization=True))")
        self.file_of: Dict[str, str] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        for f in files:
            with safe_open(os.path.join(directory, f), framework="pt") as handle:
                for key in handle.keys():
                    self.file_of[key] = f
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self.file_of)
            if missing:
                raise ConversionError(f"model.safetensors.index.json names tensors no file holds: "
                                      f"{missing[:5]}")
        self.fp8_block = fp8_block
        self.scale_of = {k[: -len(_SCALE_SUFFIX)]: k for k in self.file_of
                         if k.endswith(".weight" + _SCALE_SUFFIX)}
        self._scales = set(self.scale_of.values())
        if self.scale_of and fp8_block is None:
            raise ConversionError(f"{directory} holds fp8 scale tensors (e.g. "
                                  f"{next(iter(self.scale_of.values()))}) but config.json has no fp8 "
                                  "quantization_config with weight_block_size")

    def keys(self) -> List[str]:
        return [k for k in self.file_of if k not in self._scales]

    def __contains__(self, key: str) -> bool:
        return key in self.file_of and key not in self._scales

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        # Opened per tensor: the file's memory map (and the pages read through it) goes away with
        # the handle, so a whole shard never stays resident.
        with safe_open(os.path.join(self.directory, self.file_of[key]), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        if key in self.scale_of:
            with safe_open(os.path.join(self.directory, self.file_of[self.scale_of[key]]),
                           framework="pt") as handle:
                tensor = dequantize_fp8(tensor, handle.get_tensor(self.scale_of[key]), self.fp8_block)
        return tensor


# A directory holds a tokenizer only with one of these (config files alone are not one).
_TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")


def copy_tokenizer(src: str, dst: str) -> List[str]:
    """Copy the tokenizer files of src to dst; none (and [] returned) without a tokenizer."""
    import shutil

    if not any(os.path.isfile(os.path.join(src, name)) for name in _TOKENIZER_CORE):
        return []
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
