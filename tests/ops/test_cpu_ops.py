"""The C++ CPU kernels against the reference and torch's CUTLASS converter."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, SIXTEEN_BIT_DTYPES, random_2to4, weights_with_ties
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import prunedm
from prunedm import ops
from prunedm.ops import reference

pytestmark = pytest.mark.skipif(not prunedm.extension_info()["cpu"]["usable"], reason="extension not built")

NM_SHAPES = [
    (4,), (8,), (1, 4), (3, 8), (7, 12), (5, 3, 16), (2, 3, 5, 8), (64, 64), (33, 100), (1, 1024),
    (17, 36), (9, 9, 4), (128, 4), (3, 1, 64), (6, 2, 2, 12), (31, 20), (2, 52), (11, 44), (256, 16), (5, 320),
]  # fmt: skip
COMPRESS_SHAPES = [
    (32, 32), (32, 64), (64, 32), (64, 64), (96, 32), (32, 96), (128, 128), (160, 64), (64, 160), (192, 224),
    (256, 32), (32, 512), (288, 96), (96, 288), (320, 320), (128, 1024), (1024, 64), (224, 480), (352, 32), (64, 736),
]  # fmt: skip


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", NM_SHAPES)
def test_nm_mask_matches_reference(shape, dtype):
    w = weights_with_ties(shape, dtype, seed=len(shape) * 31 + shape[-1])
    for n, m in [(2, 4), (1, 4)]:
        assert torch.equal(ops.nm_mask(w, n, m, backend="extension"), reference.nm_mask_ref(w, n, m))


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (1, 2), (4, 8), (2, 8), (8, 16), (3, 32), (17, 64)])
def test_nm_mask_other_patterns(n, m):
    w = weights_with_ties((6, 2 * m), torch.float32, seed=m)
    assert torch.equal(ops.nm_mask(w, n, m, backend="extension"), reference.nm_mask_ref(w, n, m))


def test_nm_mask_nan_inf_and_noncontiguous():
    w = torch.randn(16, 64, dtype=torch.float32)
    w[0, 1] = float("nan")
    w[1, :4] = float("nan")
    w[2, 5] = float("inf")
    w[3, 8:12] = float("-inf")
    assert torch.equal(ops.nm_mask(w, backend="extension"), reference.nm_mask_ref(w))
    wt = torch.randn(64, 16).t()
    assert not wt.is_contiguous()
    assert torch.equal(ops.nm_mask(wt, backend="extension"), reference.nm_mask_ref(wt))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.bool])
def test_nm_violations_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    t = (torch.rand(37, 48, generator=g) < 0.45).to(dtype)
    for n, m in [(2, 4), (1, 4), (3, 8)]:
        assert ops.nm_violations(t, n, m, backend="extension") == int(reference.nm_violations_ref(t, n, m))
    pruned = torch.randn(64, 64) * ops.nm_mask(torch.randn(64, 64))
    assert ops.is_nm_sparse(pruned, backend="extension")
    assert not ops.is_nm_sparse(torch.ones(4, 8), backend="extension")


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
@pytest.mark.parametrize("shape", COMPRESS_SHAPES)
def test_compress_matches_oracle(shape, dtype):
    dense = random_2to4(*shape, dtype, seed=shape[0] + 3 * shape[1])
    values, meta = ops.compress_2to4(dense, backend="extension")
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert values.dtype == dtype and meta.dtype == torch.int16
    assert torch.equal(values.view(torch.int16), oracle_values.view(torch.int16))
    assert torch.equal(meta, oracle_meta)
    assert torch.equal(ops.decompress_2to4(values, meta, backend="extension"), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_magnitude_pruned_weights(dtype):
    w = weights_with_ties((128, 256), dtype)
    dense = w * ops.nm_mask(w)
    values, meta = ops.compress_2to4(dense)
    assert torch.equal(values, reference.compress_2to4_ref(dense)[0])
    assert torch.equal(meta, sparse_semi_structured_from_dense_cutlass(dense)[1])
    assert torch.equal(ops.decompress_2to4(values, meta), dense)


def test_compress_noncontiguous_input():
    dense = random_2to4(64, 96, torch.float16)
    strided = torch.empty(96, 64, dtype=torch.float16).t()
    strided.copy_(dense)
    assert not strided.is_contiguous()
    values, meta = ops.compress_2to4(strided, backend="extension")
    assert torch.equal(meta, sparse_semi_structured_from_dense_cutlass(dense)[1])


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 4).map(lambda k: 32 * k),
    cols=st.integers(1, 4).map(lambda k: 32 * k),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_fuzz(rows, cols, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float16
    dense = random_2to4(rows, cols, dtype, seed=seed)
    values, meta = ops.compress_2to4(dense, backend="extension")
    assert torch.equal(ops.decompress_2to4(values, meta, backend="extension"), dense)
    assert torch.equal(meta, reference.compress_2to4_ref(dense)[1])


def test_conv_layout_through_extension_is_differentiable():
    w = torch.randn(8, 12, 3, 3, requires_grad=True)
    mat = ops.conv_weight_to_matrix(w)
    assert torch.equal(mat, reference.conv_weight_to_matrix_ref(w))
    back = ops.matrix_to_conv_weight(mat, w.shape)
    assert torch.equal(back, w)
    back.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
