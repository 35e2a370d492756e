"""Hugging Face <-> msa-train checkpoint conversion (`msa-convert`).

families/   one declarative mapping table per Hugging Face architecture
plan.py     a table expanded for one model: Megatron key <-> Hugging Face keys
tensors.py  the tensor layouts of the rule kinds (fused qkv, SwiGLU, stacked experts)
dcp_io.py   streaming reads / writes of Megatron torch_dist checkpoints
importer.py import-hf; exporter.py export-hf; cpt.py the training-side hook; cli.py the command
hf_modeling/ the plain-PyTorch MSA model written next to exported MSA checkpoints
"""
