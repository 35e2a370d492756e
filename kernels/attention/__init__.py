"""sparse_attention: per-token block-sparse GQA attention (naive.py reference, triton_fwd/bwd.py kernels)."""
