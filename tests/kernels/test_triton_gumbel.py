"""The Triton Gumbel N:M kernels (prunedm.kernels.gumbel): exact N:M, determinism, the sampled
distribution by a chi-square test, the relaxation and its gradient against the reference. Without a
GPU they run on CPU tensors through Triton's interpreter, so shapes stay small.

tl.randint4x is Philox4x32-10 with the counter and key layout of the reference, so the kernels draw
the reference's bits; the hard masks are checked equal to it as well as statistically."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from sampling_stats import assert_exact_nm, chi_square, chi_square_threshold  # noqa: E402

from prunedm import kernels, ops  # noqa: E402
from prunedm.kernels import gumbel  # noqa: E402
from prunedm.ops import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU, and TRITON_INTERPRET=1 was not set before triton was imported",
)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4,), (3, 8), (5, 2, 12), (17, 36)])
def test_hard_sample_is_exact_nm_and_deterministic(shape, dtype):
    logits = (2 * torch.randn(shape)).to(dtype).to(DEVICE)
    for n, m in [(2, 4), (1, 4), (3, 4)]:
        mask = ops.gumbel_nm_sample(logits, n, m, seed=5, backend="triton")
        assert mask.dtype == dtype and mask.shape == logits.shape
        assert_exact_nm(mask.cpu(), n, m)
        assert torch.equal(mask, ops.gumbel_nm_sample(logits, n, m, seed=5, backend="triton"))
        # Same Philox stream as the reference: the same masks.
        assert torch.equal(mask.cpu(), reference.gumbel_nm_sample_ref(logits.cpu(), n, m, seed=5))
    if logits.numel() >= 64:
        assert not torch.equal(
            ops.gumbel_nm_sample(logits, seed=5, backend="triton"),
            ops.gumbel_nm_sample(logits, seed=6, backend="triton"),
        )


@pytest.mark.parametrize("n,m", [(1, 2), (3, 8), (5, 12), (9, 64)])
def test_other_group_sizes(n, m):
    logits = torch.randn(6, 2 * m).to(DEVICE)
    mask = ops.gumbel_nm_sample(logits, n, m, seed=-3, backend="triton")
    assert_exact_nm(mask.cpu(), n, m)
    assert torch.equal(mask.cpu(), reference.gumbel_nm_sample_ref(logits.cpu(), n, m, seed=-3))
    soft = ops.gumbel_nm_sample(logits, n, m, tau=0.5, hard=False, seed=-3, backend="triton")
    expected = reference.gumbel_nm_sample_ref(logits.cpu(), n, m, 0.5, False, -3)
    torch.testing.assert_close(soft.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relaxation_matches_reference(dtype):
    logits = (2 * torch.randn(9, 16)).to(dtype)
    for n, tau in [(2, 1.0), (1, 0.3), (3, 2.0), (4, 0.5)]:
        soft = ops.gumbel_nm_sample(logits.to(DEVICE), n, 4, tau=tau, hard=False, seed=9, backend="triton")
        expected = reference.gumbel_nm_sample_ref(logits, n, 4, tau, False, 9)
        tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
        torch.testing.assert_close(soft.cpu(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("n,m,tau", [(2, 4, 1.0), (1, 4, 0.5), (3, 4, 2.0), (3, 8, 0.3)])
def test_gradient_matches_autograd_of_reference(n, m, tau, hard):
    logits = torch.randn(5, 2 * m, dtype=torch.float64)
    upstream = torch.randn(5, 2 * m, dtype=torch.float64)
    x = logits.clone().to(DEVICE).requires_grad_()
    (ops.gumbel_nm_sample(x, n, m, tau=tau, hard=hard, seed=1, backend="triton") * upstream.to(DEVICE)).sum().backward()
    x_ref = logits.clone().requires_grad_()
    (reference.gumbel_nm_sample_ref(x_ref, n, m, tau, hard, 1) * upstream).sum().backward()
    # tau reaches the kernel as float32.
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-5, atol=1e-6)


def test_nm_distribution_chi_square():
    logits, n = (1.0, 0.0, -0.5, 2.0), 2
    draws = 8000
    tiled = torch.tensor(logits).repeat(draws // 4, 4).to(DEVICE)
    mask = ops.gumbel_nm_sample(tiled, n, 4, seed=2024, backend="triton")
    expected = reference.nm_set_probabilities_ref(torch.tensor(logits), n)
    assert chi_square(mask, n, 4, expected) < chi_square_threshold(5)
    assert chi_square(mask, n, 4, torch.full((6,), 1 / 6)) > chi_square_threshold(5)


def test_pattern_sample():
    logits = torch.tensor([0.5, -1.0, 1.2, 0.0, 0.3, -0.4])
    draws = 8000
    mask = ops.gumbel_pattern_sample(logits.repeat(draws, 1).to(DEVICE), tau=2.0, seed=31, backend="triton")
    assert_exact_nm(mask.cpu(), 2, 4)
    assert chi_square(mask, 2, 4, torch.softmax(logits.double(), 0)) < chi_square_threshold(5)
    for n, m in [(2, 4), (1, 4), (3, 6), (0, 3)]:
        pattern_logits = torch.randn(3, 5, math.comb(m, n), dtype=torch.float64)
        hard = ops.gumbel_pattern_sample(pattern_logits.to(DEVICE), n, m, seed=8, backend="triton")
        assert torch.equal(hard.cpu(), reference.gumbel_pattern_sample_ref(pattern_logits, n, m, seed=8))
        assert_exact_nm(hard.cpu(), n, m)
        soft = ops.gumbel_pattern_sample(pattern_logits.to(DEVICE), n, m, 0.7, False, seed=8, backend="triton")
        expected = reference.gumbel_pattern_sample_ref(pattern_logits, n, m, 0.7, False, 8)
        torch.testing.assert_close(soft.cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hard", [False, True])
def test_pattern_gradient_matches_autograd_of_reference(hard):
    logits = torch.randn(4, 3, 6, dtype=torch.float64)
    upstream = torch.randn(4, 12, dtype=torch.float64)
    x = logits.clone().to(DEVICE).requires_grad_()
    (ops.gumbel_pattern_sample(x, tau=0.5, hard=hard, seed=3, backend="triton") * upstream.to(DEVICE)).sum().backward()
    x_ref = logits.clone().requires_grad_()
    (reference.gumbel_pattern_sample_ref(x_ref, 2, 4, 0.5, hard, 3) * upstream).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-5, atol=1e-6)


def test_empty_and_noncontiguous():
    assert kernels.gumbel_nm_sample(torch.empty(0, 8, device=DEVICE), 2, 4, 1.0, True, 0).shape == (0, 8)
    logits = torch.randn(16, 8, device=DEVICE).t()
    assert torch.equal(
        ops.gumbel_nm_sample(logits, seed=4, backend="triton"),
        ops.gumbel_nm_sample(logits.contiguous(), seed=4, backend="triton"),
    )


INF = float("inf")


def extreme_logits(dtype: torch.dtype, rows: int, m: int = 4, seed: int = 0) -> torch.Tensor:
    """[rows * m / 16, 16]: +-inf, the dtype's largest finite values, ties and ordinary numbers, led by
    hand-picked groups (all +inf, all -inf, one finite among -inf, ...)."""
    big = torch.finfo(dtype).max
    pool = torch.tensor([INF, -INF, big, -big, big / 4, 30.0, 0.0, 1.0, 1.0, -1.0, 2.5], dtype=torch.float64)
    picks = pool[torch.randint(len(pool), (rows, m), generator=torch.Generator().manual_seed(seed))]
    fixed = [
        [INF, INF, INF, INF], [-INF, -INF, -INF, -INF], [INF, INF, -INF, -INF], [-INF, -INF, -INF, 2.0],
        [1.0, 1.0, 1.0, 1.0], [big, big, -big, 0.0], [INF, 0.0, -INF, 1.0], [INF, INF, INF, 0.0],
    ]  # fmt: skip
    picks[: len(fixed), :4] = torch.tensor(fixed, dtype=torch.float64)
    return picks.to(dtype).reshape(-1, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [True, False])
def test_infinite_and_extreme_logits_match_reference(dtype, hard):
    # Before the rule the kernels' hard masks kept +inf by index (not by noise) and the reference was NaN.
    logits = extreme_logits(dtype, rows=32)
    upstream = torch.randn(logits.shape, dtype=torch.float64).to(dtype)
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
    for n, m, tau in [(2, 4, 0.5), (1, 4, 1.0), (3, 4, 2.0), (3, 8, 0.3)]:
        x = logits.clone().to(DEVICE).requires_grad_()
        out = ops.gumbel_nm_sample(x, n, m, tau=tau, hard=hard, seed=11, backend="triton")
        (out * upstream.to(DEVICE)).sum().backward()
        x_ref = logits.clone().requires_grad_()
        expected = reference.gumbel_nm_sample_ref(x_ref, n, m, tau, hard, 11)
        (expected * upstream).sum().backward()
        assert not bool(out.isnan().any()) and bool(x.grad.isfinite().all())
        if hard:
            assert torch.equal(out.detach().cpu(), expected.detach()), (n, m, tau)
        torch.testing.assert_close(out.detach().cpu(), expected.detach(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=max(tolerance, 1e-4), atol=max(tolerance, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pattern_infinite_and_extreme_logits_match_reference(dtype):
    logits = extreme_logits(dtype, rows=24, m=6, seed=2).reshape(-1, 1, 6)
    upstream = torch.randn(logits.shape[0], 4, dtype=torch.float64).to(dtype)
    for hard in (True, False):
        for tau in (0.3, 1.0, 3.0):
            x = logits.clone().to(DEVICE).requires_grad_()
            out = ops.gumbel_pattern_sample(x, 2, 4, tau, hard, seed=6, backend="triton")
            (out * upstream.to(DEVICE)).sum().backward()
            x_ref = logits.clone().requires_grad_()
            expected = reference.gumbel_pattern_sample_ref(x_ref, 2, 4, tau, hard, 6)
            (expected * upstream).sum().backward()
            assert not bool(out.isnan().any()) and bool(x.grad.isfinite().all())
            if hard:
                assert torch.equal(out.detach().cpu(), expected.detach())
            torch.testing.assert_close(out.detach().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-4, atol=1e-6)


def test_nan_logits_are_refused():
    logits = torch.randn(2, 8, device=DEVICE)
    logits[0, 3] = float("nan")
    with pytest.raises(
        ValueError, match=r"gumbel_nm_sample: logits holds 1 NaN value\(s\) \(the first at index \[0, 3\]\)"
    ):
        ops.gumbel_nm_sample(logits, backend="triton")


def test_large_pattern_tables_are_refused_with_the_limit_and_a_way_out():
    # m = 16, n = 8: a [12870, 16] table per program, which spills (or takes minutes to compile) on a GPU.
    assert gumbel.gumbel_pattern_fits(2, 4) and gumbel.gumbel_pattern_fits(4, 8) and gumbel.gumbel_pattern_fits(2, 16)
    assert not gumbel.gumbel_pattern_fits(8, 16) and not gumbel.gumbel_pattern_fits(6, 12)
    logits = torch.randn(1, 1, math.comb(16, 8), device=DEVICE)
    message = r"triton backend cannot take m = 16 with n = 8: .* over its limit of 8192 entries .* backend='extension'"
    with pytest.raises(ValueError, match=message):
        ops.gumbel_pattern_sample(logits, 8, 16, backend="triton")
    with pytest.raises(ValueError, match=message):
        gumbel.gumbel_pattern_sample_backward(torch.zeros(1, 16, device=DEVICE), logits, 8, 16, 1.0, 0)


def _opcheck_cases():
    logits = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    pattern_logits = torch.randn(3, 4, 6, device=DEVICE, requires_grad=True)
    return {
        "nm_hard": (torch.ops.prunedm_triton.gumbel_nm_sample.default, (logits, 2, 4, 1.0, True, 3)),
        "nm_soft": (torch.ops.prunedm_triton.gumbel_nm_sample.default, (logits, 2, 4, 0.5, False, 3)),
        "pattern_hard": (torch.ops.prunedm_triton.gumbel_pattern_sample.default, (pattern_logits, 2, 4, 1.0, True, 1)),
        "pattern_backward": (
            torch.ops.prunedm_triton.gumbel_pattern_sample_backward.default,
            (torch.randn(3, 16, device=DEVICE), pattern_logits.detach(), 2, 4, 0.5, 1),
        ),
    }


@pytest.mark.parametrize("case", ["nm_hard", "nm_soft", "pattern_hard", "pattern_backward"])
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


_COMPILE_FOR_SM80 = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from prunedm.kernels import gumbel

def build(kernel, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 80, 32))

scalars = {"groups": "i64", "n": "i32", "m": "i32", "tau": "fp32", "seed": "i64", "offset": "i64"}
for hard in (True, False):
    for compute, ptr in ((tl.float32, "*fp16"), (tl.float64, "*fp64")):
        build(gumbel._gumbel_nm_kernel, {"logits_ptr": ptr, "out_ptr": ptr, **scalars},
              {"HARD": hard, "COMPUTE": compute, "M": 4, "BLOCK_G": 256})
        build(gumbel._gumbel_pattern_kernel, {"logits_ptr": ptr, "table_ptr": "*fp32", "out_ptr": ptr,
              "groups": "i64", "num_patterns": "i32", "m": "i32", "tau": "fp32", "seed": "i64", "offset": "i64"},
              {"HARD": hard, "COMPUTE": compute, "P": 8, "M": 4, "BLOCK_G": 64})
build(gumbel._gumbel_nm_backward_kernel, {"grad_ptr": "*bf16", "logits_ptr": "*bf16", "out_ptr": "*bf16", **scalars},
      {"COMPUTE": tl.float32, "M": 8, "BLOCK_G": 128})
build(gumbel._gumbel_pattern_backward_kernel, {"grad_ptr": "*fp32", "logits_ptr": "*fp32", "table_ptr": "*fp32",
      "out_ptr": "*fp32", "groups": "i64", "num_patterns": "i32", "m": "i32", "tau": "fp32", "seed": "i64",
      "offset": "i64"},
      {"COMPUTE": tl.float32, "P": 8, "M": 4, "BLOCK_G": 64})
"""


def _can_compile_for_nvidia() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU every test above compiles the kernels")
@pytest.mark.skipif(not _can_compile_for_nvidia(), reason="this triton has no NVIDIA backend")
def test_gumbel_kernels_compile_for_sm80():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM80], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
