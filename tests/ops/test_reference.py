"""The references are the spec: check them against torch's CUTLASS converter (the oracle) and
against properties that define each op."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import SIXTEEN_BIT_DTYPES, random_2to4, weights_with_ties
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from prunedm.ops import reference

ORACLE_SHAPES = [(32, 32), (32, 64), (64, 32), (64, 128), (96, 96), (128, 64), (32, 256), (160, 224), (256, 512)]


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
@pytest.mark.parametrize("shape", ORACLE_SHAPES)
def test_compress_ref_matches_oracle(shape, dtype):
    dense = random_2to4(*shape, dtype, seed=shape[0] * 7 + shape[1])
    values, meta = reference.compress_2to4_ref(dense)
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(values.view(torch.int16), oracle_values.view(torch.int16))
    assert torch.equal(meta, oracle_meta)
    assert torch.equal(reference.decompress_2to4_ref(values, meta), dense)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_every_group_pattern_matches_oracle(dtype):
    # All 11 patterns with at most two non-zeros, each in every position of a 32x32 tile.
    patterns = [p for p in itertools.product([0, 1], repeat=4) if sum(p) <= 2]
    rows = []
    for r in range(32):
        row = [patterns[(r + g) % len(patterns)] for g in range(8)]
        rows.append(torch.tensor(row, dtype=torch.float32).reshape(-1) * (r + 1))
    dense = torch.stack(rows).to(dtype)
    values, meta = reference.compress_2to4_ref(dense)
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(values, oracle_values)
    assert torch.equal(meta, oracle_meta)


def test_meta_offsets_are_a_permutation():
    for rows, meta_cols in [(32, 2), (64, 4), (96, 6), (128, 16)]:
        offsets = reference.meta_offsets_sm80_ref(rows, meta_cols).reshape(-1)
        assert torch.equal(offsets.sort().values, torch.arange(rows * meta_cols))


def test_negative_zero_is_zero_and_keeps_its_bits():
    dense = torch.zeros(32, 32, dtype=torch.float16)
    dense[0, 0] = -0.0
    dense[0, 1] = 3.0
    values, meta = reference.compress_2to4_ref(dense)
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(values.view(torch.int16), oracle_values.view(torch.int16))
    assert torch.equal(meta, oracle_meta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nm_mask_ref_keeps_largest_with_ties_to_lower_index(dtype):
    w = torch.tensor([[1.0, -3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, -0.0]], dtype=dtype)
    expected = torch.tensor([[False, True, True, False], [True, True, False, False], [True, True, False, False]])
    assert torch.equal(reference.nm_mask_ref(w, 2, 4), expected)


def test_nm_mask_ref_counts_nan_as_largest():
    w = torch.tensor([1.0, float("nan"), 5.0, 2.0, float("nan"), float("nan"), 1.0, 1.0])
    assert reference.nm_mask_ref(w, 2, 4).tolist() == [False, True, True, False, True, True, False, False]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4), (3, 16)])
def test_nm_mask_ref_keeps_exactly_n(n, m):
    w = weights_with_ties((5, 3, 4 * m), torch.float32)
    mask = reference.nm_mask_ref(w, n, m)
    assert (mask.reshape(5, 3, 4, m).sum(-1) == n).all()
    # Every kept |w| is at least every dropped |w| of its group.
    groups = w.abs().reshape(-1, m)
    keep = mask.reshape(-1, m)
    kept_min = torch.where(keep, groups, torch.inf).min(-1).values
    dropped_max = torch.where(~keep, groups, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_nm_violations_ref():
    t = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, -0.0, 0.0, 2.0, 2.0]])
    assert int(reference.nm_violations_ref(t, 2, 4)) == 2
    assert int(reference.nm_violations_ref(t, 3, 4)) == 1
    assert reference.is_nm_sparse_ref(t * 0)


def test_conv_layout_ref_orders_k_as_kh_kw_cin():
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    mat = reference.conv_weight_to_matrix_ref(w)
    for co, ci, y, x in itertools.product(range(2), range(3), range(2), range(2)):
        assert mat[co, (y * 2 + x) * 3 + ci] == w[co, ci, y, x]
    assert torch.equal(reference.matrix_to_conv_weight_ref(mat, w.shape), w)
