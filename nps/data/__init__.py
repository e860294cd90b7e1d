"""Data: preference-pair pools, episodes sampled inside jit, and the paper's synthetic tasks."""
