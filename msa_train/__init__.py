"""msa-train: pretrain and convert LLMs with MiniMax Sparse Attention on Megatron-Core."""

__version__ = "0.1.0"
