"""Triton kernels of prunedm's ops, installed as prunedm.kernels (placeholder until the kernels land)."""
