"""prunedm's ops: N:M masks, 2:4 compression, conv weight layout, Gumbel N:M sampling, 2:4 sparse linear and
conv. Each has a reference in prunedm.ops.reference (the spec) and fast paths chosen by `backend=` ("auto" picks)."""

from prunedm.ops import reference
from prunedm.ops._backends import OP_BACKENDS as BACKENDS
from prunedm.ops._backends import extension_info
from prunedm.ops.conv_layout import conv_weight_to_matrix, matrix_to_conv_weight
from prunedm.ops.gumbel import gumbel_nm_sample, gumbel_pattern_sample, nm_patterns, pattern_index, patterns_to_mask
from prunedm.ops.nm import is_nm_sparse, nm_mask, nm_violations
from prunedm.ops.sparse24 import compress_2to4, decompress_2to4, to_semi_structured
from prunedm.ops.sparse_mm import (
    sparse_conv2d_2to4,
    sparse_kernel_backend,
    sparse_kernels_available,
    sparse_linear_2to4,
)

__all__ = [
    "BACKENDS",
    "compress_2to4",
    "conv_weight_to_matrix",
    "decompress_2to4",
    "extension_info",
    "gumbel_nm_sample",
    "gumbel_pattern_sample",
    "is_nm_sparse",
    "matrix_to_conv_weight",
    "nm_mask",
    "nm_patterns",
    "nm_violations",
    "pattern_index",
    "patterns_to_mask",
    "reference",
    "sparse_conv2d_2to4",
    "sparse_kernel_backend",
    "sparse_kernels_available",
    "sparse_linear_2to4",
    "to_semi_structured",
]
