"""Data: reading and validating records, the deterministic train/eval split, tokenisation and batching."""
