"""The Gumbel ops' entries in the backend table (prunedm.ops._backends) and the name-returning lookup that
prunedm.ops.gumbel still calls; both move into gumbel.py with its next edit (issue 18 changes it now)."""

from __future__ import annotations

import torch

from prunedm.ops import _backends, reference

for _op in ("gumbel_nm_sample", "gumbel_pattern_sample"):
    _backends.declare(_op, reference=getattr(reference, f"{_op}_ref"), extension=_op)


def pick_backend(op: str, backend: str, tensor: torch.Tensor) -> str:
    """The name of the implementation op runs for `backend` on `tensor`'s device (prunedm.ops._backends)."""
    return _backends.pick(op, backend, tensor).name
