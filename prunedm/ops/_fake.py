"""Fake (meta) implementations of the compiled ops, so torch.compile and FakeTensor can trace them."""

from __future__ import annotations

import torch


@torch.library.register_fake("prunedm::nm_mask")
def _nm_mask_fake(weight, n, m):
    return torch.empty_like(weight, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake("prunedm::nm_violations")
def _nm_violations_fake(t, n, m):
    return t.new_empty((), dtype=torch.int64)


@torch.library.register_fake("prunedm::compress_2to4")
def _compress_2to4_fake(dense):
    rows, cols = dense.shape
    return dense.new_empty((rows, cols // 2)), dense.new_empty((rows, cols // 16), dtype=torch.int16)


@torch.library.register_fake("prunedm::decompress_2to4")
def _decompress_2to4_fake(values, meta):
    rows, half_cols = values.shape
    return values.new_empty((rows, 2 * half_cols))
