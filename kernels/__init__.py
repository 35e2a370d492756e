"""msa_kernels: MiniMax Sparse Attention operators (PyTorch reference + Hopper Triton kernels)."""
