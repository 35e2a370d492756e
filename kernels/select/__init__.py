"""select_blocks: exp-free per-token top-k block selection (naive.py reference, triton.py kernel)."""
