"""Gumbel N:M sampling (gumbel_nm_sample, gumbel_pattern_sample): the reference's Philox against the
Random123 known answers, the C++ kernels bit for bit against the reference (same Philox, same noise),
exact N:M, the sampled distribution against the exact Plackett-Luce / softmax probabilities by a
chi-square test, gradients against autograd of the reference, opcheck, and the CUDA kernels."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES
from hypothesis import given, settings
from hypothesis import strategies as st
from sampling_stats import assert_exact_nm, chi_square, chi_square_threshold

import prunedm
from prunedm import ops
from prunedm.ops import reference

HAS_EXTENSION = prunedm.extension_info()["cpu"]["usable"]
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="extension not built")
GUMBEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHAPES = [(4,), (1, 8), (3, 16), (5, 2, 12), (7, 64), (2, 3, 4, 8), (33, 20)]


def _backends():
    names = ["reference"]
    if HAS_EXTENSION:
        names.append("extension")
    return names


# Philox ----------------------------------------------------------------------------------------


def test_reference_philox_matches_random123_known_answers():
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        words = reference.philox4x32_10_ref(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(w) for w in words) == expected


def test_reference_bits_are_keyed_by_seed_and_flat_index():
    bits = reference.philox_bits_ref(0, 8)
    assert [int(b) for b in bits[:4]] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # Element i uses counter i // 4 (low and high words) and word i % 4; the key is the seed's halves.
    seed, index = 0x0123456789ABCDEF, (1 << 34) + 6
    block = index // 4
    counter = (block & 0xFFFFFFFF, block >> 32, 0, 0)
    words = reference.philox4x32_10_ref(tuple(torch.tensor([c]) for c in counter), (0x89ABCDEF, 0x01234567))
    assert int(reference.philox_bits_at_ref(seed, torch.tensor([index]))[0]) == int(words[index % 4])
    assert torch.equal(reference.philox_bits_at_ref(seed, torch.arange(37)), reference.philox_bits_ref(seed, 37))
    # Negative seeds are their two's complement bits.
    assert torch.equal(reference.philox_bits_ref(-1, 16), reference.philox_bits_ref(2**64 - 1, 16))
    noise = reference.gumbel_noise_ref(3, (4096,), torch.float64)
    assert abs(float(noise.mean()) - 0.5772) < 0.05 and abs(float(noise.var()) - math.pi**2 / 6) < 0.15


# Kernels against the reference -----------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("dtype", GUMBEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_extension_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    logits = (2 * torch.randn(shape, generator=g)).to(dtype)
    for n, m, seed in [(2, 4, 0), (1, 4, 11), (3, 4, -5), (4, 4, 7), (0, 4, 1)]:
        hard = ops.gumbel_nm_sample(logits, n, m, seed=seed, backend="extension")
        assert hard.dtype == dtype and hard.shape == logits.shape
        assert torch.equal(hard, reference.gumbel_nm_sample_ref(logits, n, m, seed=seed)), (n, m)
        assert_exact_nm(hard, n, m)
        for tau in (0.3, 1.0):
            soft = ops.gumbel_nm_sample(logits, n, m, tau=tau, hard=False, seed=seed, backend="extension")
            expected = reference.gumbel_nm_sample_ref(logits, n, m, tau=tau, hard=False, seed=seed)
            rtol, atol = TOLERANCES[dtype]
            torch.testing.assert_close(soft, expected, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))


@needs_extension
@pytest.mark.parametrize("n,m", [(1, 2), (3, 8), (5, 16), (1, 64), (30, 64), (7, 12)])
def test_extension_matches_reference_other_patterns(n, m):
    logits = torch.randn(9, 2 * m, generator=torch.Generator().manual_seed(m))
    hard = ops.gumbel_nm_sample(logits, n, m, seed=m + n, backend="extension")
    assert torch.equal(hard, reference.gumbel_nm_sample_ref(logits, n, m, seed=m + n))
    assert_exact_nm(hard, n, m)
    soft = ops.gumbel_nm_sample(logits, n, m, tau=0.5, hard=False, seed=3, backend="extension")
    torch.testing.assert_close(soft, reference.gumbel_nm_sample_ref(logits, n, m, 0.5, False, 3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(soft.reshape(-1, m).sum(-1), torch.full((18,), float(n)), rtol=1e-5, atol=1e-4)


@needs_extension
@pytest.mark.parametrize("dtype", GUMBEL_DTYPES)
@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 5, 6), (4, 1, 3, 6)])
def test_pattern_extension_matches_reference(shape, dtype):
    logits = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))).to(dtype)
    if len(shape) == 1:
        logits = logits[None]
    for seed in (0, 123, -9):
        hard = ops.gumbel_pattern_sample(logits, seed=seed, backend="extension")
        assert hard.shape == (*logits.shape[:-2], logits.shape[-2] * 4) and hard.dtype == dtype
        assert torch.equal(hard, reference.gumbel_pattern_sample_ref(logits, seed=seed))
        assert_exact_nm(hard, 2, 4)
        soft = ops.gumbel_pattern_sample(logits, tau=0.5, hard=False, seed=seed, backend="extension")
        rtol, atol = TOLERANCES[dtype]
        expected = reference.gumbel_pattern_sample_ref(logits, tau=0.5, hard=False, seed=seed)
        torch.testing.assert_close(soft, expected, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))


@needs_extension
@pytest.mark.parametrize("n,m", [(1, 4), (3, 4), (2, 6), (4, 8), (0, 3), (5, 5), (3, 9)])
def test_pattern_extension_other_patterns(n, m):
    patterns = math.comb(m, n)
    logits = torch.randn(5, 3, patterns, generator=torch.Generator().manual_seed(patterns))
    hard = ops.gumbel_pattern_sample(logits, n, m, seed=4, backend="extension")
    assert torch.equal(hard, reference.gumbel_pattern_sample_ref(logits, n, m, seed=4))
    assert_exact_nm(hard, n, m)
    soft = ops.gumbel_pattern_sample(logits, n, m, tau=2.0, hard=False, seed=4, backend="extension")
    torch.testing.assert_close(soft, reference.gumbel_pattern_sample_ref(logits, n, m, 2.0, False, 4))


@needs_extension
@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 9),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(2, 4), (1, 4), (2, 8), (1, 2), (3, 5)]),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_extension_matches_reference_property(rows, groups, nm, seed):
    n, m = nm
    logits = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(rows * 7 + groups))
    assert torch.equal(
        ops.gumbel_nm_sample(logits, n, m, seed=seed, backend="extension"),
        reference.gumbel_nm_sample_ref(logits, n, m, seed=seed),
    )


# Determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends())
def test_same_seed_same_mask_and_the_index_is_the_flat_position(backend):
    logits = torch.randn(16, 32)
    first = ops.gumbel_nm_sample(logits, seed=42, backend=backend)
    assert torch.equal(first, ops.gumbel_nm_sample(logits, seed=42, backend=backend))
    assert not torch.equal(first, ops.gumbel_nm_sample(logits, seed=43, backend=backend))
    # The noise depends on the flat index only: reshaping, or a non-contiguous view of the same
    # values, gives the same mask.
    reshaped = ops.gumbel_nm_sample(logits.reshape(128, 4), seed=42, backend=backend)
    assert torch.equal(reshaped.reshape(16, 32), first)
    transposed = logits.t().contiguous().t()
    assert torch.equal(ops.gumbel_nm_sample(transposed, seed=42, backend=backend), first)
    # seed=None draws from torch's default generator.
    torch.manual_seed(5)
    a = ops.gumbel_nm_sample(logits, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(a, ops.gumbel_nm_sample(logits, backend=backend))
    pattern_logits = torch.randn(8, 6)
    torch.manual_seed(6)
    b = ops.gumbel_pattern_sample(pattern_logits, backend=backend)
    torch.manual_seed(6)
    assert torch.equal(b, ops.gumbel_pattern_sample(pattern_logits, backend=backend))


# Distribution ----------------------------------------------------------------------------------

NM_DISTRIBUTION_CASES = [
    ((1.0, 0.0, -0.5, 2.0), 2),
    ((0.3, -1.0, 0.8, 0.0), 1),
    ((0.0, 0.5, -0.5, 1.0), 3),
    ((1.5, 0.2, -0.3, 0.9, 0.0, -1.0), 2),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", range(len(NM_DISTRIBUTION_CASES)))
def test_nm_sample_follows_plackett_luce(backend, case):
    logits, n = NM_DISTRIBUTION_CASES[case]
    m, draws = len(logits), 20000
    tiled = torch.tensor(logits).repeat(draws // 4, 4)  # every group of m holds the same logits
    mask = ops.gumbel_nm_sample(tiled, n, m, tau=0.5, seed=1234 + case, backend=backend)
    assert_exact_nm(mask, n, m)
    expected = reference.nm_set_probabilities_ref(torch.tensor(logits), n)
    torch.testing.assert_close(expected.sum(), torch.tensor(1.0, dtype=torch.float64))
    threshold = chi_square_threshold(len(expected) - 1)
    assert chi_square(mask, n, m, expected) < threshold
    # The test has power: sets drawn with probability proportional to the product of their
    # softmax probabilities (the same law when n = 1), or uniformly, are rejected.
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    naive = (ops.nm_patterns(n, m, dtype=torch.float64) * p + (~ops.nm_patterns(n, m))).prod(-1)
    if n > 1:
        assert chi_square(mask, n, m, naive / naive.sum()) > threshold
    assert chi_square(mask, n, m, torch.full_like(expected, 1 / len(expected))) > threshold


@pytest.mark.parametrize("backend", _backends())
def test_pattern_sample_follows_softmax_over_patterns(backend):
    logits = torch.tensor([0.5, -1.0, 1.2, 0.0, 0.3, -0.4])
    draws = 24000
    mask = ops.gumbel_pattern_sample(logits.repeat(draws, 1), tau=4.0, seed=99, backend=backend)
    assert_exact_nm(mask, 2, 4)
    assert chi_square(mask, 2, 4, torch.softmax(logits.double(), 0)) < chi_square_threshold(5)
    assert chi_square(mask, 2, 4, torch.full((6,), 1 / 6)) > chi_square_threshold(5)


# Gradients -------------------------------------------------------------------------------------


def test_reference_relaxation_gradcheck_and_properties():
    keys = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for n, tau in [(1, 1.0), (2, 0.5), (3, 2.0)]:
        assert torch.autograd.gradcheck(lambda k: reference.relaxed_top_n_ref(k, n, tau), (keys,))
        soft = reference.relaxed_top_n_ref(keys.detach(), n, tau)
        torch.testing.assert_close(soft.sum(-1), torch.full((3,), float(n), dtype=torch.float64))
    # As tau -> 0 the relaxation becomes the hard top-n, even where softmaxes saturate.
    sharp = reference.relaxed_top_n_ref(keys.detach(), 2, 1e-3)
    torch.testing.assert_close(sharp, reference._hard_top_n_ref(keys.detach(), 2))
    # The soft path of the sampler is differentiable end to end.
    logits = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: reference.gumbel_nm_sample_ref(x, 2, 4, 0.8, False, 3), (logits,))
    pattern_logits = torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: reference.gumbel_pattern_sample_ref(x, 2, 4, 0.8, False, 3), (pattern_logits,)
    )


@needs_extension
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("n,m,tau", [(2, 4, 1.0), (1, 4, 0.5), (3, 4, 2.0), (2, 8, 0.3), (4, 4, 1.0), (5, 12, 0.7)])
def test_nm_gradient_matches_autograd_of_reference(n, m, tau, hard):
    logits = torch.randn(6, 3 * m, dtype=torch.float64, generator=torch.Generator().manual_seed(m + n))
    upstream = torch.randn(6, 3 * m, dtype=torch.float64)
    x_ext = logits.clone().requires_grad_()
    out = ops.gumbel_nm_sample(x_ext, n, m, tau=tau, hard=hard, seed=17, backend="extension")
    (out * upstream).sum().backward()
    x_ref = logits.clone().requires_grad_()
    (reference.gumbel_nm_sample_ref(x_ref, n, m, tau, hard, 17) * upstream).sum().backward()
    torch.testing.assert_close(x_ext.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    if not hard:
        assert torch.autograd.gradcheck(
            lambda x: ops.gumbel_nm_sample(x, n, m, tau=tau, hard=False, seed=17, backend="extension"),
            (logits[:2].clone().requires_grad_(),),
        )


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_gradient_low_precision(dtype):
    logits = torch.randn(32, 64).to(dtype)
    upstream = torch.randn(32, 64).to(dtype)
    grads = []
    for backend in ("extension", "reference"):
        x = logits.clone().requires_grad_()
        (ops.gumbel_nm_sample(x, tau=0.5, seed=8, backend=backend) * upstream).sum().backward()
        grads.append(x.grad)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(grads[0], grads[1], rtol=max(rtol, 1e-4), atol=max(atol, 1e-5))


@needs_extension
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("n,m,tau", [(2, 4, 1.0), (1, 4, 0.25), (2, 6, 3.0), (3, 5, 0.5)])
def test_pattern_gradient_matches_autograd_of_reference(n, m, tau, hard):
    logits = torch.randn(5, 4, math.comb(m, n), dtype=torch.float64)
    upstream = torch.randn(5, 4 * m, dtype=torch.float64)
    x_ext = logits.clone().requires_grad_()
    (ops.gumbel_pattern_sample(x_ext, n, m, tau, hard, seed=2, backend="extension") * upstream).sum().backward()
    x_ref = logits.clone().requires_grad_()
    (reference.gumbel_pattern_sample_ref(x_ref, n, m, tau, hard, 2) * upstream).sum().backward()
    torch.testing.assert_close(x_ext.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda x: ops.gumbel_pattern_sample(x, n, m, tau, False, seed=2, backend="extension"),
        (logits[:2].clone().requires_grad_(),),
    )


# Helpers, errors, registration -----------------------------------------------------------------


def test_patterns_and_pattern_index():
    patterns = ops.nm_patterns(2, 4)
    expected = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert patterns.dtype == torch.bool and patterns.tolist() == [[bool(v) for v in row] for row in expected]
    assert ops.nm_patterns(3, 8).shape == (56, 8)
    w = torch.randn(6, 32)
    mask = ops.nm_mask(w)
    index = ops.pattern_index(mask)
    assert index.shape == (6, 8) and bool((index >= 0).all())
    assert torch.equal(ops.patterns_to_mask(index), mask)
    assert int(ops.pattern_index(torch.ones(1, 4))[0, 0]) == -1


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    "fn,args,kwargs,error,message",
    [
        ("nm", (torch.randn(4, 6),), {}, ValueError, r"last dim of logits \(6\) must be divisible by m = 4"),
        ("nm", (torch.randn(4, 8), 5, 4), {}, ValueError, r"n must be in \[0, m\] = \[0, 4\], got 5"),
        ("nm", (torch.randn(4, 8),), {"tau": 0.0}, ValueError, r"tau must be a finite number > 0, got 0.0"),
        ("nm", (torch.randn(4, 8),), {"tau": float("inf")}, ValueError, r"tau must be a finite number > 0"),
        ("nm", (torch.randn(4, 8),), {"seed": 2**63}, ValueError, r"seed must fit in 64 signed bits"),
        ("nm", (torch.randn(4, 8),), {"seed": 1.5}, TypeError, r"seed must be an int or None"),
        ("nm", (torch.randn(4, 8),), {"hard": 1}, TypeError, r"hard must be a bool"),
        ("nm", (torch.ones(4, 8, dtype=torch.int32),), {}, TypeError, r"logits must be float16, bfloat16"),
        ("pattern", (torch.randn(4, 5),), {}, ValueError, r"pattern_logits must be \[..., G, C\(m, n\)\]"),
        ("pattern", (torch.randn(6),), {}, ValueError, r"pattern_logits must be \[..., G, C\(m, n\)\]"),
        ("pattern", (torch.randn(2, 1), 1, 17), {}, ValueError, r"m must be in \[1, 16\]"),
    ],
)
def test_errors(backend, fn, args, kwargs, error, message):
    op = ops.gumbel_nm_sample if fn == "nm" else ops.gumbel_pattern_sample
    with pytest.raises(error, match=message):
        op(*args, **kwargs, backend=backend)


@needs_extension
def test_compiled_ops_check_their_arguments():
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0"):
        torch.ops.prunedm.gumbel_nm_sample(torch.randn(4, 8), 2, 4, -1.0, True, 0)
    with pytest.raises(ValueError, match=r"grad must have shape"):
        torch.ops.prunedm.gumbel_nm_sample_backward(torch.randn(4, 4), torch.randn(4, 8), 2, 4, 1.0, 0)
    with pytest.raises(ValueError, match=r"pattern_logits must be \[..., G, C\(m, n\)\] = \[..., G, 6\]"):
        torch.ops.prunedm.gumbel_pattern_sample(torch.randn(4, 5), 2, 4, 1.0, True, 0)


@needs_extension
def test_empty_inputs():
    for backend in _backends():
        assert ops.gumbel_nm_sample(torch.empty(0, 8), backend=backend).shape == (0, 8)
        assert ops.gumbel_pattern_sample(torch.empty(3, 0, 6), backend=backend).shape == (3, 0)


def _opcheck_cases():
    logits = torch.randn(6, 16, requires_grad=True)
    pattern_logits = torch.randn(3, 4, 6, requires_grad=True)
    return {
        "nm_hard": (torch.ops.prunedm.gumbel_nm_sample.default, (logits, 2, 4, 1.0, True, 3)),
        "nm_soft_fp64": (torch.ops.prunedm.gumbel_nm_sample.default, (logits.double(), 3, 8, 0.5, False, -2)),
        "nm_backward": (
            torch.ops.prunedm.gumbel_nm_sample_backward.default,
            (torch.randn(6, 16), logits.detach(), 2, 4, 0.5, 3),
        ),
        "pattern_hard": (torch.ops.prunedm.gumbel_pattern_sample.default, (pattern_logits, 2, 4, 1.0, True, 5)),
        "pattern_soft_bf16": (
            torch.ops.prunedm.gumbel_pattern_sample.default,
            (pattern_logits.bfloat16(), 2, 4, 2.0, False, 5),
        ),
        "pattern_backward": (
            torch.ops.prunedm.gumbel_pattern_sample_backward.default,
            (torch.randn(3, 16), pattern_logits.detach(), 2, 4, 0.5, 5),
        ),
    }


@needs_extension
@pytest.mark.parametrize(
    "case", ["nm_hard", "nm_soft_fp64", "nm_backward", "pattern_hard", "pattern_soft_bf16", "pattern_backward"]
)
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@needs_extension
def test_torch_compile_traces_the_sampler():
    def masked(w, logits):
        return w * torch.ops.prunedm.gumbel_nm_sample(logits, 2, 4, 0.5, True, 7)

    w, logits = torch.randn(8, 16), torch.randn(8, 16, requires_grad=True)
    compiled = torch.compile(masked, fullgraph=True, backend="eager")
    out = compiled(w, logits)
    assert torch.equal(out, masked(w, logits))
    out.sum().backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


# CUDA ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GUMBEL_DTYPES)
def test_cuda_matches_reference(dtype):
    logits = (2 * torch.randn(64, 256)).to(dtype)
    for n, m in [(2, 4), (1, 4), (3, 8)]:
        hard = ops.gumbel_nm_sample(logits.cuda(), n, m, seed=21, backend="extension")
        assert torch.equal(hard.cpu(), reference.gumbel_nm_sample_ref(logits, n, m, seed=21))
        soft = ops.gumbel_nm_sample(logits.cuda(), n, m, tau=0.5, hard=False, seed=21, backend="extension")
        rtol, atol = TOLERANCES[dtype]
        expected = reference.gumbel_nm_sample_ref(logits, n, m, 0.5, False, 21)
        torch.testing.assert_close(soft.cpu(), expected, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))
    pattern_logits = (2 * torch.randn(32, 40, 6)).to(dtype)
    for n, m, patterns in [(2, 4, pattern_logits), (3, 6, torch.randn(8, 5, 20).to(dtype))]:
        hard = ops.gumbel_pattern_sample(patterns.cuda(), n, m, seed=4, backend="extension")
        assert torch.equal(hard.cpu(), reference.gumbel_pattern_sample_ref(patterns, n, m, seed=4))
        soft = ops.gumbel_pattern_sample(patterns.cuda(), n, m, tau=0.5, hard=False, seed=4, backend="extension")
        expected = reference.gumbel_pattern_sample_ref(patterns, n, m, 0.5, False, 4)
        torch.testing.assert_close(soft.cpu(), expected, rtol=max(TOLERANCES[dtype][0], 1e-5), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("n,m", [(2, 4), (3, 8)])
def test_cuda_gradients_match_reference(n, m):
    logits = torch.randn(16, 4 * m, dtype=torch.float64)
    upstream = torch.randn(16, 4 * m, dtype=torch.float64)
    x = logits.cuda().requires_grad_()
    (ops.gumbel_nm_sample(x, n, m, tau=0.5, seed=3, backend="extension") * upstream.cuda()).sum().backward()
    x_ref = logits.clone().requires_grad_()
    (reference.gumbel_nm_sample_ref(x_ref, n, m, 0.5, True, 3) * upstream).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-9, atol=1e-10)
    pattern_logits = torch.randn(16, 4, math.comb(m, n), dtype=torch.float64)
    upstream = torch.randn(16, 4 * m, dtype=torch.float64)
    x = pattern_logits.cuda().requires_grad_()
    (ops.gumbel_pattern_sample(x, n, m, 0.5, seed=3, backend="extension") * upstream.cuda()).sum().backward()
    x_ref = pattern_logits.clone().requires_grad_()
    (reference.gumbel_pattern_sample_ref(x_ref, n, m, 0.5, True, 3) * upstream).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.cuda
def test_cuda_distribution_and_launch_independence():
    logits = (1.0, 0.0, -0.5, 2.0)
    draws = 400000
    tiled = torch.tensor(logits).repeat(draws // 4, 4).cuda()
    mask = ops.gumbel_nm_sample(tiled, 2, 4, seed=77, backend="extension")
    expected = reference.nm_set_probabilities_ref(torch.tensor(logits), 2)
    assert chi_square(mask, 2, 4, expected) < chi_square_threshold(5)
    # A slice of the tensor draws the same bits as the whole: flat index, not thread, keys the noise.
    first_rows = ops.gumbel_nm_sample(tiled[:100], 2, 4, seed=77, backend="extension")
    assert torch.equal(first_rows, mask[:100])
