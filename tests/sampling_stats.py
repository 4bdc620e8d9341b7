"""Statistics the Gumbel sampling tests share: Pearson's chi-square of sampled kept sets, its threshold,
and the exact-N:M check of a hard mask."""

from __future__ import annotations

import math

import torch

from prunedm import ops


def chi_square_threshold(df: int, upper_tail: float = 1e-4) -> float:
    """Upper-tail quantile of chi-square(df) by Wilson-Hilferty (no scipy needed); z from the normal tail."""
    z = {1e-3: 3.0902, 1e-4: 3.7190, 1e-6: 4.7534}[upper_tail]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(mask: torch.Tensor, n: int, m: int, probabilities: torch.Tensor) -> float:
    """Pearson's statistic of the kept sets of mask's m-groups against probabilities [C(m, n)]."""
    counts = torch.bincount(ops.pattern_index(mask.cpu(), n, m).reshape(-1), minlength=len(probabilities)).double()
    expected = probabilities.double() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def assert_exact_nm(mask: torch.Tensor, n: int, m: int) -> None:
    values = mask.float().reshape(-1, m)
    assert bool(((values == 0) | (values == 1)).all())
    assert bool((values.sum(-1) == n).all())
