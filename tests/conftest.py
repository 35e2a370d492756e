import os
import random
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Kernel tests run the Triton kernels under the CPU interpreter. Triton reads this when a kernel
    # is decorated, so it must be set before ANY test module (of any folder) imports msa_kernels;
    # elsewhere on CPU the ops take the PyTorch reference path, which ignores it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny CPU tests are fastest single-threaded; multi-rank tests spawn their own processes.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Every test starts from seeds fixed by its own id (crc32 of the node id): a failure reproduces
    alone, and no test depends on what ran before it. The seed is printed, so a failing test's
    captured output records it; tests that need a particular seed set their own on top."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    print(f"test seed: {seed} (crc32 of {request.node.nodeid!r})")


@pytest.fixture(autouse=True)
def _isolated_working_directory(tmp_path, monkeypatch):
    """Run every test in its own empty directory.

    Relative defaults such as run_dir=runs/tiny_cpu must never see what an earlier `msa-train` left
    in the checkout (the README runs the default job before the tests, in the same checkout).
    """
    monkeypatch.chdir(tmp_path)


def pytest_configure(config):
    # Importing megatron.core announces its fallbacks without TransformerEngine / Apex: this
    # project's supported setup, noise in every test's output.
    config.addinivalue_line("filterwarnings",
                            "ignore:Transformer Engine and Apex are not installed:UserWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
