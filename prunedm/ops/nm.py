"""N:M masks: which weights an N:M pattern keeps, and whether a tensor already follows one."""

from __future__ import annotations

import torch

from prunedm.ops import _backends, _checks, reference

_backends.declare("nm_mask", reference=reference.nm_mask_ref, extension="nm_mask")
_backends.declare("nm_violations", reference=reference.nm_violations_ref, extension="nm_violations")


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4, *, backend: str = "auto") -> torch.Tensor:
    """Bool mask keeping the n largest |w| of each group of m consecutive elements along the last dim.

    Ties go to the lower index; NaN counts as the largest value. Any floating dtype.
    backend: "auto" (default), "reference", "extension" (C++/CUDA) or "triton"."""
    _checks.check_nm_mask(weight, n, m)
    return _backends.pick("nm_mask", backend, weight).fn(weight, n, m)


def nm_violations(t: torch.Tensor, n: int = 2, m: int = 4, *, backend: str = "auto") -> int:
    """Number of m-wide groups along the last dim that hold more than n non-zeros."""
    _checks.check_nm_violations("nm_violations", t, n, m)
    return int(_backends.pick("nm_violations", backend, t).fn(t, n, m))


def is_nm_sparse(t: torch.Tensor, n: int = 2, m: int = 4, *, backend: str = "auto") -> bool:
    """True when every m-wide group along the last dim holds at most n non-zeros."""
    _checks.check_nm_violations("is_nm_sparse", t, n, m)
    return nm_violations(t, n, m, backend=backend) == 0
