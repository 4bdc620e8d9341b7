"""2:4 compression in the CUTLASS sm80 layout (values + int16 metadata), as torch.sparse uses it."""

from __future__ import annotations

import torch

from prunedm.ops import _checks, reference
from prunedm.ops._dispatch import check_same_device, pick_backend
from prunedm.ops.nm import nm_violations


def compress_2to4(dense: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2-D fp16/bf16 2:4-sparse matrix into (values [R, C/2], meta [R, C/16] int16).

    The bytes equal torch.sparse's CUTLASS conversion; R and C must be multiples of 32. A group
    of 4 with more than 2 non-zeros is an error (values are never dropped silently)."""
    _checks.check_compress(dense)
    chosen = pick_backend("compress_2to4", backend, dense)
    if chosen == "extension":
        return tuple(torch.ops.prunedm.compress_2to4(dense))
    if chosen == "triton":
        from prunedm import kernels

        return kernels.compress_2to4(dense)
    count = int(reference.nm_violations_ref(dense, 2, 4))
    if count:
        raise _checks.violation_error(dense, count)
    return reference.compress_2to4_ref(dense)


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of compress_2to4: the dense [R, C] matrix, zeros where nothing was kept."""
    _checks.check_decompress(values, meta)
    check_same_device("decompress_2to4", values=values, meta=meta)
    chosen = pick_backend("decompress_2to4", backend, values)
    if chosen == "extension":
        return torch.ops.prunedm.decompress_2to4(values, meta)
    if chosen == "triton":
        from prunedm import kernels

        return kernels.decompress_2to4(values, meta)
    nibbles = (meta.reshape(-1, 1).long() >> torch.tensor([0, 4, 8, 12], device=meta.device)) & 0xF
    invalid = int(((nibbles & 3) >= (nibbles >> 2)).sum())
    if invalid:
        raise _checks.invalid_meta_error(invalid)
    return reference.decompress_2to4_ref(values, meta)


def to_semi_structured(dense: torch.Tensor):
    """torch's SparseSemiStructuredTensor for a 2:4-sparse CUDA matrix, built from our compression.

    On compute capability 8.x it is the CUTLASS-backed tensor holding compress_2to4's values and
    metadata. Other GPUs cannot run torch's CUTLASS kernels (sm8x only); there the cuSPARSELt
    tensor is returned, whose packed format is cuSPARSELt's own (made by torch after our check)."""
    _checks.check_compress(dense)
    if dense.device.type != "cuda":
        raise ValueError(f"to_semi_structured: dense must be a CUDA tensor, got one on {dense.device}")
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    major, _ = torch.cuda.get_device_capability(dense.device)
    if major == 8:
        values, meta = compress_2to4(dense)
        return SparseSemiStructuredTensorCUTLASS(
            dense.shape,
            packed=values,
            meta=meta,
            packed_t=None,
            meta_t=None,
            compressed_swizzled_bitmask=None,
            requires_grad=dense.requires_grad,
        )
    count = nm_violations(dense, 2, 4)
    if count:
        raise _checks.violation_error(dense, count)
    return SparseSemiStructuredTensorCUSPARSELT.from_dense(dense)
