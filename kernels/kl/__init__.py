"""indexer_kl / indexer_kl_dense: KL alignment of the index branch (naive.py reference, triton.py kernels)."""
