"""Sparse inference layers: SparseLinear / SparseConv2d hold 2:4-packed weights, sparsify() swaps them into a model.

Backends: "dense" decompresses the masked weight per call (the reference, and the CPU path);
"torch" runs torch.sparse's 2:4 kernels (CUTLASS on sm8x, cuSPARSELt on sm90+); "auto" picks
"torch" on sm80+ GPUs for float16/bfloat16 weights and "dense" elsewhere, warning once per process
when a GPU cannot run them. Convolutions run dense for now (no public sparse conv kernel)."""

from prunedm.nn._backends import BACKENDS, SparseFallbackWarning
from prunedm.nn.modules import SparseConv2d, SparseLinear
from prunedm.nn.sparsify import (
    ConvertedLayer,
    SkippedLayer,
    SparsifyReport,
    describe_sparse_module,
    describe_sparse_modules,
    prepare_sparse_modules,
    rebuild_sparse_module,
    restore_sparse_modules,
    sparse_modules,
    sparsify,
)

__all__ = [
    "BACKENDS",
    "ConvertedLayer",
    "SkippedLayer",
    "SparseConv2d",
    "SparseFallbackWarning",
    "SparseLinear",
    "SparsifyReport",
    "describe_sparse_module",
    "describe_sparse_modules",
    "prepare_sparse_modules",
    "rebuild_sparse_module",
    "restore_sparse_modules",
    "sparse_modules",
    "sparsify",
]
