"""Gumbel N:M sampling with infinite, extreme and NaN logits: the reference's rule (+inf kept, -inf dropped,
noise among equal infinities), the extension against it, uniform draws among infinities, NaN refused, auto dispatch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES
from sampling_stats import assert_exact_nm, chi_square, chi_square_threshold

import prunedm
from prunedm import ops
from prunedm.ops import reference

HAS_EXTENSION = prunedm.extension_info()["cpu"]["usable"]
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="extension not built")
GUMBEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _backends():
    return ["reference", "extension"] if HAS_EXTENSION else ["reference"]


# Infinite, extreme and NaN logits --------------------------------------------------------------

INF = float("inf")


def extreme_logits(dtype: torch.dtype, rows: int = 96, m: int = 4, seed: int = 0) -> torch.Tensor:
    """[rows * m / 16, 16]: groups of m drawn from +-inf, the dtype's largest finite values, ties and
    ordinary numbers, led by hand-picked groups (all +inf, all -inf, one finite among -inf, ...)."""
    big = torch.finfo(dtype).max
    pool = torch.tensor([INF, -INF, big, -big, big / 4, 30.0, 0.0, 1.0, 1.0, -1.0, 2.5], dtype=torch.float64)
    picks = pool[torch.randint(len(pool), (rows, m), generator=torch.Generator().manual_seed(seed))]
    fixed = [
        [INF, INF, INF, INF], [-INF, -INF, -INF, -INF], [INF, INF, -INF, -INF], [-INF, -INF, -INF, 2.0],
        [1.0, 1.0, 1.0, 1.0], [big, big, -big, 0.0], [INF, 0.0, -INF, 1.0], [big, -big, -big, -big],
        [INF, INF, INF, 0.0], [-INF, 3.0, -INF, 3.0],
    ]  # fmt: skip
    picks[: len(fixed), :4] = torch.tensor(fixed, dtype=torch.float64)
    return picks.to(dtype).reshape(-1, 16)


def check_infinity_rule(logits: torch.Tensor, mask: torch.Tensor, n: int, m: int, hard: bool, tau: float) -> None:
    """+inf kept when the group's +inf come before the n-th place (hard: up to it), -inf dropped when
    n others are above -inf, every group sums to n, nothing is NaN. The relaxation (hard=False) counts
    a logit whose logit / tau overflows the compute dtype as infinite."""
    values = mask.detach().double().reshape(-1, m)
    assert not bool(values.isnan().any())
    torch.testing.assert_close(values.sum(-1), torch.full((values.shape[0],), float(n), dtype=torch.float64),
                               rtol=2e-2, atol=2e-2)  # fmt: skip
    grouped = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32).reshape(-1, m)
    levels = grouped if hard else grouped / tau
    above, below = levels == INF, levels == -INF
    before_nth = (above.sum(-1) <= n) if hard else (above.sum(-1) < n)
    assert bool((values[(grouped == INF) & before_nth[:, None]] == 1).all())
    assert bool((values[(grouped == -INF) & ((~below).sum(-1) >= n)[:, None]] == 0).all())


@pytest.mark.parametrize("dtype", GUMBEL_DTYPES)
@pytest.mark.parametrize("hard", [True, False])
def test_reference_infinite_logits_follow_the_rule(dtype, hard):
    # Before the rule the reference returned NaN masks (hard too: its straight-through soft part was NaN).
    logits = extreme_logits(dtype)
    upstream = torch.randn(logits.shape, dtype=torch.float64).to(dtype)
    for n, tau in [(2, 0.5), (1, 1.0), (3, 2.0), (4, 0.3)]:
        x = logits.clone().requires_grad_()
        out = reference.gumbel_nm_sample_ref(x, n, 4, tau, hard, seed=5)
        check_infinity_rule(logits, out, n, 4, hard, tau)
        if hard:
            assert_exact_nm(out, n, 4)
        (out * upstream).sum().backward()
        assert bool(x.grad.isfinite().all()) and bool((x.grad[logits.isinf()] == 0).all())
    # Concretely: [+inf, 0, -inf, 1] keeps +inf and the larger finite key; [-inf x3, 2] keeps 2 and one -inf.
    group = torch.tensor([[INF, 0.0, -INF, 1.0, -INF, -INF, -INF, 2.0]], dtype=dtype)
    mask = reference.gumbel_nm_sample_ref(group, 2, 4, 0.5, True, 0)
    assert mask[0, 0] == 1 and mask[0, 2] == 0 and mask[0, 7] == 1 and float(mask[0, 4:7].sum()) == 1


def test_reference_pattern_infinite_logits_follow_the_rule():
    logits = torch.tensor(
        [[INF, 0.0, 1.0, -INF, INF, 2.0], [-INF] * 6, [1.0, 2.0, 3.0, -INF, 0.0, 0.0], [INF] * 6], dtype=torch.float64
    )
    x = logits.clone().requires_grad_()
    for hard in (True, False):
        out = reference.gumbel_pattern_sample_ref(x, 2, 4, 0.5, hard, seed=1)
        values = out.detach().reshape(4, 4)
        assert not bool(values.isnan().any())
        torch.testing.assert_close(values.sum(-1), torch.full((4,), 2.0, dtype=torch.float64))
        # Row 0: only patterns 0 ({0, 1}) and 4 ({1, 3}) compete, so element 1 is always kept, 2 never.
        assert float(values[0, 1]) == pytest.approx(1.0) and float(values[0, 2]) == 0.0
        (out * torch.arange(16.0, dtype=torch.float64)).sum().backward()
        assert bool(x.grad.isfinite().all()) and bool((x.grad[logits.isinf()] == 0).all())
        assert bool(x.grad[2, :3].abs().sum() > 0)
        x.grad = None


@pytest.mark.parametrize("backend", _backends())
def test_equal_infinite_logits_draw_uniformly(backend):
    # Equal infinite logits are the limit of equal logits going to +-inf: a uniform draw among them.
    draws = 6000
    tiled = torch.tensor([INF, INF, INF, 0.0]).repeat(draws, 1)
    kept = ops.gumbel_nm_sample(tiled, 1, 4, seed=3, backend=backend).reshape(-1, 4)
    assert bool((kept[:, 3] == 0).all())
    counts = kept[:, :3].sum(0).double()
    assert float(((counts - draws / 3) ** 2 / (draws / 3)).sum()) < chi_square_threshold(2)
    all_dropped = ops.gumbel_nm_sample(torch.full((draws, 4), -INF), 2, 4, seed=4, backend=backend)
    assert chi_square(all_dropped, 2, 4, torch.full((6,), 1 / 6)) < chi_square_threshold(5)
    pattern_logits = torch.tensor([INF, 5.0, INF, -INF, 0.0, 9.0]).repeat(draws, 1)
    index = ops.pattern_index(ops.gumbel_pattern_sample(pattern_logits, seed=5, backend=backend))
    assert set(index.unique().tolist()) == {0, 2} and abs(float((index == 0).double().mean()) - 0.5) < 0.03


@needs_extension
@pytest.mark.parametrize("dtype", GUMBEL_DTYPES)
@pytest.mark.parametrize("hard", [True, False])
def test_extension_agrees_with_reference_on_infinite_and_extreme_logits(dtype, hard):
    logits = extreme_logits(dtype, seed=1)
    upstream = torch.randn(logits.shape, dtype=torch.float64).to(dtype)
    rtol, atol = TOLERANCES[dtype]
    for n, m, tau in [(2, 4, 0.5), (1, 4, 1.0), (3, 4, 2.0), (3, 8, 0.3), (2, 16, 1.0)]:
        outs, grads = [], []
        for backend in ("extension", "reference"):
            x = logits.clone().requires_grad_()
            out = ops.gumbel_nm_sample(x, n, m, tau=tau, hard=hard, seed=11, backend=backend)
            (out * upstream).sum().backward()
            outs.append(out.detach())
            grads.append(x.grad)
        check_infinity_rule(logits, outs[0], n, m, hard, tau)
        if hard:
            assert torch.equal(outs[0], outs[1]), (n, m, tau)
        else:
            torch.testing.assert_close(outs[0], outs[1], rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))
        assert bool(grads[0].isfinite().all())
        torch.testing.assert_close(grads[0], grads[1], rtol=max(rtol, 1e-4), atol=max(atol, 1e-5))


@needs_extension
@pytest.mark.parametrize("dtype", GUMBEL_DTYPES)
def test_pattern_extension_agrees_with_reference_on_infinite_and_extreme_logits(dtype):
    logits = extreme_logits(dtype, rows=72, m=6, seed=2).reshape(-1, 1, 6)
    upstream = torch.randn(logits.shape[0], 4, dtype=torch.float64).to(dtype)
    rtol, atol = TOLERANCES[dtype]
    for hard in (True, False):
        for tau in (0.3, 1.0, 3.0):
            outs, grads = [], []
            for backend in ("extension", "reference"):
                x = logits.clone().requires_grad_()
                out = ops.gumbel_pattern_sample(x, 2, 4, tau, hard, seed=6, backend=backend)
                (out * upstream).sum().backward()
                outs.append(out.detach())
                grads.append(x.grad)
            assert not bool(outs[0].isnan().any()) and bool(grads[0].isfinite().all())
            if hard:
                assert torch.equal(outs[0], outs[1])
            torch.testing.assert_close(outs[0], outs[1], rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))
            torch.testing.assert_close(grads[0], grads[1], rtol=max(rtol, 1e-4), atol=max(atol, 1e-5))


@pytest.mark.parametrize("backend", _backends())
def test_nan_logits_are_refused_naming_the_argument(backend):
    logits = torch.randn(3, 8)
    logits[1, 5] = float("nan")
    with pytest.raises(
        ValueError, match=r"gumbel_nm_sample: logits holds 1 NaN value\(s\) \(the first at index \[1, 5\]\)"
    ):
        ops.gumbel_nm_sample(logits, backend=backend)
    pattern_logits = torch.randn(2, 3, 6)
    pattern_logits[0, 2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"gumbel_pattern_sample: pattern_logits holds 1 NaN .*\[0, 2, 4\]"):
        ops.gumbel_pattern_sample(pattern_logits, backend=backend)


def test_auto_never_picks_triton_for_a_pattern_table_it_refuses(monkeypatch):
    # As on a GPU without the extension, "auto" resolves to triton; m = 16, n = 8 (12870 patterns) must
    # then run on the reference instead of the triton kernel, which refuses it.
    pytest.importorskip("triton")
    from prunedm.ops import _backends

    entry = _backends._OPS["gumbel_pattern_sample"]
    monkeypatch.setitem(entry.auto, "cpu", ("triton", "reference"))
    monkeypatch.setitem(entry.available, "triton", lambda device, dtype: "")
    _backends.clear_cache()
    assert _backends.pick("gumbel_pattern_sample", "auto", torch.empty(1)).name == "triton"
    logits = torch.randn(1, 2, math.comb(16, 8), generator=torch.Generator().manual_seed(0))
    try:
        mask = ops.gumbel_pattern_sample(logits, 8, 16, seed=3)
    finally:
        monkeypatch.undo()
        _backends.clear_cache()
    assert torch.equal(mask, reference.gumbel_pattern_sample_ref(logits, 8, 16, seed=3))
    assert_exact_nm(mask, 8, 16)
