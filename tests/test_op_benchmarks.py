"""pytest-benchmark micro-benchmarks of the 2:4 ops on CPU (extension backend), small shapes; each run's
result is checked against the reference. pedantic() with a few rounds keeps the whole file to seconds;
`pytest --benchmark-disable` runs each op once, as a plain test."""

from __future__ import annotations

import pytest
import torch

import prunedm
from prunedm import ops
from prunedm.ops import reference

pytestmark = pytest.mark.skipif(
    not prunedm.extension_info()["cpu"]["built"], reason="the C++ extension (CPU kernels) is not built"
)

ROWS, COLS = 128, 256
ROUNDS = dict(rounds=5, iterations=3, warmup_rounds=1)


def weights(dtype=torch.float16, seed=0) -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_bench_nm_mask(benchmark):
    weight = weights(torch.float32)
    mask = benchmark.pedantic(ops.nm_mask, args=(weight,), kwargs={"backend": "extension"}, **ROUNDS)
    assert torch.equal(mask, reference.nm_mask_ref(weight))
    assert int(mask.sum()) == ROWS * COLS // 2


def test_bench_compress_2to4(benchmark):
    weight = weights()
    pruned = weight * reference.nm_mask_ref(weight)
    values, meta = benchmark.pedantic(ops.compress_2to4, args=(pruned,), kwargs={"backend": "extension"}, **ROUNDS)
    expected_values, expected_meta = reference.compress_2to4_ref(pruned)
    assert torch.equal(values, expected_values) and torch.equal(meta, expected_meta)
    assert values.shape == (ROWS, COLS // 2)


def test_bench_decompress_2to4(benchmark):
    weight = weights(torch.bfloat16, seed=1)
    pruned = weight * reference.nm_mask_ref(weight)
    values, meta = reference.compress_2to4_ref(pruned)
    dense = benchmark.pedantic(ops.decompress_2to4, args=(values, meta), kwargs={"backend": "extension"}, **ROUNDS)
    assert torch.equal(dense, pruned)


def test_bench_gumbel_nm_sample(benchmark):
    logits = weights(torch.float32, seed=2)
    kwargs = {"n": 2, "m": 4, "tau": 1.0, "hard": True, "seed": 7, "backend": "extension"}
    sample = benchmark.pedantic(ops.gumbel_nm_sample, args=(logits,), kwargs=kwargs, **ROUNDS)
    expected = reference.gumbel_nm_sample_ref(logits, 2, 4, 1.0, True, 7)
    assert torch.equal(sample, expected)
    assert torch.equal(sample.reshape(ROWS, COLS // 4, 4).sum(-1), torch.full((ROWS, COLS // 4), 2.0))
