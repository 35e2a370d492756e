"""Files copied next to exported MSA checkpoints (loaded by transformers with trust_remote_code)."""
