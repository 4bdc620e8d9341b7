"""Conv weights as GEMM matrices in NHWC implicit-GEMM order, so that N:M groups run along Cin."""

from __future__ import annotations

import torch

from prunedm import _ext
from prunedm.ops import _checks, reference


def conv_weight_to_matrix(w: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, kh, kw] -> [Cout, kh*kw*Cin], K ordered (kh, kw, Cin). Differentiable."""
    _checks.check_conv_weight(w)
    if _ext.extension_loaded():
        return torch.ops.prunedm.conv_weight_to_matrix(w)
    return reference.conv_weight_to_matrix_ref(w)


def matrix_to_conv_weight(mat: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of conv_weight_to_matrix: [Cout, kh*kw*Cin] -> [Cout, Cin, kh, kw] (contiguous)."""
    shape = _checks.check_conv_matrix(mat, shape)
    if _ext.extension_loaded():
        return torch.ops.prunedm.matrix_to_conv_weight(mat, list(shape))
    return reference.matrix_to_conv_weight_ref(mat, shape)
