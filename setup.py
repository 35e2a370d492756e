"""Package discovery only (metadata lives in pyproject.toml).

The kernels live in ./kernels but import as `msa_kernels`: a top-level package named `kernels`
would shadow the unrelated `kernels` package that transformers probes for.
"""
from setuptools import find_packages, setup

kernel_pkgs = ["msa_kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
setup(
    packages=find_packages(include=["msa_train", "msa_train.*"]) + kernel_pkgs,
    package_dir={"msa_kernels": "kernels"},
    package_data={"msa_kernels.bench": ["data/*.json", "data/*.pt"]},  # bench workloads and recorded sample
)
