"""Sparse inference layers: SparseLinear / SparseConv2d hold 2:4-packed weights, sparsify() swaps them into a model.

Backends: "dense" decompresses the masked weight per call (the reference, and the CPU path);
"torch" runs torch.sparse's 2:4 kernels (CUTLASS on sm8x, cuSPARSELt on sm90+, with cuSPARSELt's
alg_id/split_k searched once per shape); "prunedm" runs prunedm's own mma.sp kernels (linear and
implicit-GEMM conv); "auto" times dense and every sparse path that can run, once per (device, layer
shape, dtype, batch bucket), keeps the fastest (dense unless a sparse path wins), and caches the
choice on disk (autotune_cache_info(); PRUNEDM_AUTOTUNE=0 turns timing off). On CPU auto runs
dense, silently; on a GPU without sparse kernels it warns once per process."""

from prunedm.nn._autotune import autotune_cache_info, clear_autotune_cache
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
    "autotune_cache_info",
    "clear_autotune_cache",
    "describe_sparse_module",
    "describe_sparse_modules",
    "prepare_sparse_modules",
    "rebuild_sparse_module",
    "restore_sparse_modules",
    "sparse_modules",
    "sparsify",
]

# prunedm.save_pretrained stores sparse layers packed (values + metadata) and rebuilds them on load.
from prunedm import serialization as _serialization  # noqa: E402


def _rebuild_for_load(config: dict, current):
    # The saved description is authoritative: a pruned model's config-built layer has other shapes.
    return rebuild_sparse_module(config, current, check_shape=False)


for _name in ("SparseLinear", "SparseConv2d"):
    _serialization.register_structure_hook(_name, describe_sparse_module, _rebuild_for_load)

# diffusers' own save_pretrained would write sparse layers that its from_pretrained leaves random: refuse it.
from prunedm import interop as _interop  # noqa: E402

_interop.install_save_guard_if_loaded()
