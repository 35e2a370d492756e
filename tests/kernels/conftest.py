"""Kernel tests run the real Triton kernels: compiled on CUDA, under the CPU interpreter elsewhere."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Before any test module of this folder imports triton: kernels decorated from now on interpret.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every module that defines @triton.jit kernels, in import-dependency order.
KERNEL_MODULES = (
    "msa_kernels.attention.triton_common", "msa_kernels.attention.triton_bwd", "msa_kernels.attention.triton_fwd",
    "msa_kernels.select.triton", "msa_kernels.kl.common", "msa_kernels.kl.union", "msa_kernels.kl.kv_outer",
    "msa_kernels.kl.dense", "msa_kernels.kl.triton", "msa_kernels.kl.fused",
)


def _compiled_kernels_loaded() -> bool:
    from triton.runtime.jit import JITFunction

    return any(isinstance(obj, JITFunction)
               for name in KERNEL_MODULES if name in sys.modules
               for obj in vars(sys.modules[name]).values())


# Seeds: tests/conftest.py fixes every test's seed from its own id.


@pytest.fixture(scope="session", autouse=True)
def interpreted_kernels():
    """Re-decorate the kernels under the interpreter when another test folder imported them compiled
    (before TRITON_INTERPRET was set). Modules reload in place, so the test modules' references stay."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton")
        if _compiled_kernels_loaded():
            for name in KERNEL_MODULES:
                importlib.reload(importlib.import_module(name))
    yield
