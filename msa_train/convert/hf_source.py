"""A local Hugging Face checkpoint directory: config.json + safetensors (one file or sharded)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

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


class HFSource:
    """Lazy tensor access by name; a tensor is read from its (memory-mapped) file when asked."""

    def __init__(self, directory: str):
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

    def keys(self) -> List[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        # Opened per tensor: the file's memory map (and the pages read through it) goes away with
        # the handle, so a whole shard never stays resident.
        with safe_open(os.path.join(self.directory, self.file_of[key]), framework="pt") as handle:
            return handle.get_tensor(key)


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
