"""The public functions of prunedm.kernels (re-exported by its __init__): the backend="triton" path of prunedm.ops.
Each registers itself in prunedm.ops' backend table (prunedm.ops._backends, which imports this package by name
the first time a Triton implementation is asked for; prunedm.ops never imports it) and as
torch.ops.prunedm_triton.<name>. prunedm.ops validates the arguments."""

from __future__ import annotations

import torch

from prunedm.kernels import gumbel as _gumbel
from prunedm.kernels import nm as _nm
from prunedm.kernels import sparse24 as _sparse24
from prunedm.ops import _backends, _checks

__all__ = ["compress_2to4", "decompress_2to4", "gumbel_nm_sample", "gumbel_pattern_sample", "nm_mask", "nm_violations"]


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest |w| of each m consecutive elements along the last dim."""
    return _nm.nm_mask(weight, n, m)


def nm_violations(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Number of m-wide groups along the last dim holding more than n non-zeros (int64 0-d tensor)."""
    return _nm.nm_violations(t, n, m)


def compress_2to4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [R, C/2], meta [R, C/16] int16) of a 2:4-sparse fp16/bf16 matrix; ValueError if it is not."""
    values, meta, violations = _sparse24.compress_2to4(dense)
    count = int(violations)
    if count:
        raise _checks.violation_error(dense, count)
    return values, meta


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The dense matrix compress_2to4 packed; ValueError if meta holds an invalid index pair.

    check=False skips reading the count back (a host sync): for metadata checked once at load time."""
    dense, invalid = _sparse24.decompress_2to4(values, meta)
    if not check:
        return dense
    count = int(invalid)
    if count:
        raise _checks.invalid_meta_error(count)
    return dense


def gumbel_nm_sample(
    logits: torch.Tensor, n: int, m: int, tau: float, hard: bool, seed: int, offset: int = 0
) -> torch.Tensor:
    """Gumbel N:M sample of per-weight logits (hard 0/1 or relaxed), differentiable; see prunedm.ops."""
    return _gumbel.gumbel_nm_sample(logits, n, m, tau, hard, seed, offset)


def gumbel_pattern_sample(
    pattern_logits: torch.Tensor, n: int, m: int, tau: float, hard: bool, seed: int, offset: int = 0
) -> torch.Tensor:
    """MaskLLM-style sample over the C(m, n) candidate patterns, differentiable; see prunedm.ops."""
    return _gumbel.gumbel_pattern_sample(pattern_logits, n, m, tau, hard, seed, offset)


for _op, _fn in (
    ("nm_mask", nm_mask),
    ("nm_violations", nm_violations),
    ("compress_2to4", compress_2to4),
    ("decompress_2to4", decompress_2to4),
    ("decompress_2to4_unchecked", lambda values, meta: decompress_2to4(values, meta, check=False)),
    ("gumbel_nm_sample", gumbel_nm_sample),
):
    _backends.register(_op, "triton", _fn)
# The pattern kernels hold the whole [C(m, n), m] table per program: past its limit "auto" takes another backend.
_backends.register(
    "gumbel_pattern_sample", "triton", gumbel_pattern_sample, accepts=lambda n, m: _gumbel.gumbel_pattern_fits(n, m)
)
