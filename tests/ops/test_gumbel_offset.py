"""The Gumbel ops' offset: sampling rows [r0, r1) of a logits tensor with offset = r0 * row_numel gives
exactly those rows of the full sample (forward and gradient), on every backend this machine has: the
reference, the C++ extension, the Triton kernels (through the interpreter without a GPU, tiny shapes)
and the CUDA kernels. This is what lets each rank of a sharded run sample its shard as one process would."""

from __future__ import annotations

import os

import pytest
import torch

import prunedm
from prunedm import ops
from prunedm.ops import reference

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_EXTENSION = prunedm.extension_info()["cpu"]["usable"]
SEED = 0x5EED


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _cpu_backends() -> list[str]:
    return ["reference"] + (["extension"] if HAS_EXTENSION else [])


def _nm_case(rows, cols, n, m, dtype, device):
    logits = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return logits.to(dtype=dtype, device=device)


def _pattern_case(rows, groups, dtype, device):
    logits = torch.randn(rows, groups, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return logits.to(dtype=dtype, device=device)


def _check_slices(sample, logits, cuts, hard):
    """Every [r0, r1) row slice sampled with its offset equals the full sample's rows, and so do gradients."""
    full_in = logits.clone().requires_grad_(True)
    full = sample(full_in, 0)
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = weights.to(full.dtype).to(full.device)
    (full * weights).sum().backward()
    row_numel = logits[0].numel()
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        part_in = logits[r0:r1].clone().requires_grad_(True)
        part = sample(part_in, r0 * row_numel)
        assert torch.equal(part, full[r0:r1]), (r0, r1, hard)
        (part * weights[r0:r1]).sum().backward()
        torch.testing.assert_close(part_in.grad, full_in.grad[r0:r1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 3), (3, 5)])
def test_nm_sample_slices_cpu(backend, hard, n, m):
    logits = _nm_case(7, 4 * m, n, m, torch.float32, "cpu")

    def sample(x, offset):
        return ops.gumbel_nm_sample(x, n, m, 0.7, hard, SEED, offset=offset, backend=backend)

    _check_slices(sample, logits, [0, 1, 4, 7], hard)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pattern_sample_slices_cpu(backend, hard, dtype):
    logits = _pattern_case(5, 3, dtype, "cpu")

    def sample(x, offset):
        return ops.gumbel_pattern_sample(x, 2, 4, 0.5, hard, SEED, offset=offset, backend=backend)

    _check_slices(sample, logits, [0, 2, 3, 5], hard)


@pytest.mark.skipif(not HAS_EXTENSION, reason="extension not built")
def test_extension_offset_matches_reference_at_large_offsets():
    # Past 2^32 elements the Philox counter's high word is used; a flat offset need not be a multiple of 4.
    logits = _nm_case(2, 6, 1, 3, torch.float64, "cpu")
    for offset in (3, (1 << 34) + 5):
        got = ops.gumbel_nm_sample(logits, 1, 3, 1.0, True, SEED, offset=offset, backend="extension")
        want = reference.gumbel_nm_sample_ref(logits, 1, 3, 1.0, True, SEED, offset)
        assert torch.equal(got, want)


def test_reference_bits_offset_is_a_window_of_the_stream():
    full = reference.philox_bits_ref(SEED, 40)
    for offset in range(9):
        for count in (0, 1, 5, 17):
            assert torch.equal(reference.philox_bits_ref(SEED, count, offset=offset), full[offset : offset + count])


@pytest.mark.parametrize("offset", [-1, 1.5, True])
def test_bad_offset_is_refused(offset):
    logits = torch.zeros(2, 4)
    with pytest.raises((ValueError, TypeError), match="offset"):
        ops.gumbel_nm_sample(logits, seed=0, offset=offset)
    with pytest.raises((ValueError, TypeError), match="offset"):
        ops.gumbel_pattern_sample(torch.zeros(2, 1, 6), seed=0, offset=offset)


@pytest.mark.skipif(not HAS_EXTENSION, reason="extension not built")
def test_extension_op_refuses_a_negative_offset():
    with pytest.raises(ValueError, match="offset must be >= 0"):
        torch.ops.prunedm.gumbel_nm_sample(torch.zeros(1, 4), 2, 4, 1.0, True, 0, -4)


@pytest.mark.skipif(not _has_triton(), reason="needs triton (a GPU, or TRITON_INTERPRET=1 set before import)")
def test_triton_slices():
    # One relaxed and one hard case: each interpreted launch costs seconds on CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nm_logits = _nm_case(3, 8, 2, 4, torch.float32, device)
    pattern_logits = _pattern_case(3, 2, torch.float32, device)

    def nm(x, offset):
        return ops.gumbel_nm_sample(x, 2, 4, 0.7, False, SEED, offset=offset, backend="triton")

    def pattern(x, offset):
        return ops.gumbel_pattern_sample(x, 2, 4, 0.7, True, SEED, offset=offset, backend="triton")

    _check_slices(nm, nm_logits, [0, 1, 3], False)
    _check_slices(pattern, pattern_logits, [0, 2, 3], True)
    # ... and the reference's bits.
    ref = reference.gumbel_pattern_sample_ref(pattern_logits[2:].cpu(), 2, 4, 0.7, True, SEED, 2 * 2 * 6)
    assert torch.equal(pattern(pattern_logits[2:], 24).cpu(), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("hard", [True, False])
def test_cuda_slices(hard):
    nm_logits = _nm_case(9, 16, 2, 4, torch.float32, "cuda")
    pattern_logits = _pattern_case(9, 4, torch.float32, "cuda")

    def nm(x, offset):
        return ops.gumbel_nm_sample(x, 2, 4, 0.7, hard, SEED, offset=offset, backend="extension")

    def pattern(x, offset):
        return ops.gumbel_pattern_sample(x, 2, 4, 0.7, hard, SEED, offset=offset, backend="extension")

    _check_slices(nm, nm_logits, [0, 4, 5, 9], hard)
    _check_slices(pattern, pattern_logits, [0, 4, 5, 9], hard)
    ref = reference.gumbel_pattern_sample_ref(pattern_logits[4:].cpu(), 2, 4, 0.7, True, SEED, 4 * 4 * 6)
    got = ops.gumbel_pattern_sample(pattern_logits[4:], 2, 4, 0.7, True, SEED, offset=96, backend="extension")
    assert torch.equal(got.cpu(), ref)
