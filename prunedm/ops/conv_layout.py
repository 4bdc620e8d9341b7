"""Conv weights as GEMM matrices in NHWC implicit-GEMM order, so that N:M groups run along Cin."""

from __future__ import annotations

import torch

from prunedm.ops import _backends, _checks, reference

# Pure layout changes: the extension's are views (CompositeImplicitAutograd), on every device.
_ANY_DEVICE = {"*": ("extension", "reference")}
for _op in ("conv_weight_to_matrix", "matrix_to_conv_weight"):
    _backends.declare(
        _op, reference=getattr(reference, f"{_op}_ref"), extension=_op, accepted=("auto",), auto=_ANY_DEVICE
    )
    _backends.set_available(_op, "extension", lambda device, dtype: _backends.extension_problem(torch.device("cpu")))


def conv_weight_to_matrix(w: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, kh, kw] -> [Cout, kh*kw*Cin], K ordered (kh, kw, Cin). Differentiable."""
    _checks.check_conv_weight(w)
    return _backends.pick("conv_weight_to_matrix", "auto", w).fn(w)


def matrix_to_conv_weight(mat: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of conv_weight_to_matrix: [Cout, kh*kw*Cin] -> [Cout, Cin, kh, kw] (contiguous)."""
    shape = _checks.check_conv_matrix(mat, shape)
    return _backends.pick("matrix_to_conv_weight", "auto", mat).fn(mat, list(shape))
