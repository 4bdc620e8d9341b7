"""2:4 compression in the CUTLASS sm80 layout (values + int16 metadata), as torch.sparse uses it."""

from __future__ import annotations

import torch

from prunedm import _ext
from prunedm.ops import _backends, _checks, reference
from prunedm.ops.nm import nm_violations


def _compress_reference(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    count = int(reference.nm_violations_ref(dense, 2, 4))
    if count:
        raise _checks.violation_error(dense, count)
    return reference.compress_2to4_ref(dense)


def _decompress_reference(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    invalid = invalid_meta_count(meta)
    if invalid:
        raise _checks.invalid_meta_error(invalid)
    return reference.decompress_2to4_ref(values, meta)


def _compress_extension(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.ops.prunedm.compress_2to4(dense))


def _decompress_extension_unchecked(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    # On CPU the extension's check is C++ and costs no host sync, so it stays.
    op = _unchecked_extension_op() if values.device.type == "cuda" else None
    return (op or torch.ops.prunedm.decompress_2to4)(values, meta)


_backends.declare("compress_2to4", reference=_compress_reference, extension=_compress_extension)
_backends.declare("decompress_2to4", reference=_decompress_reference, extension="decompress_2to4")
_backends.declare(
    "decompress_2to4_unchecked", reference=reference.decompress_2to4_ref, extension=_decompress_extension_unchecked
)


def compress_2to4(dense: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2-D fp16/bf16 2:4-sparse matrix into (values [R, C/2], meta [R, C/16] int16).

    The bytes equal torch.sparse's CUTLASS conversion; R and C must be multiples of 32. A group
    of 4 with more than 2 non-zeros is an error (values are never dropped silently)."""
    _checks.check_compress(dense)
    return _backends.pick("compress_2to4", backend, dense).fn(dense)


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of compress_2to4: the dense [R, C] matrix, zeros where nothing was kept."""
    _checks.check_decompress(values, meta)
    _backends.check_same_device("decompress_2to4", values=values, meta=meta)
    return _backends.pick("decompress_2to4", backend, values).fn(values, meta)


def invalid_meta_count(meta: torch.Tensor) -> int:
    """How many 4-bit entries of int16 2:4 metadata do not name two increasing indices (0 for a valid one).

    Reads one number back to the host: call it once when metadata is packed or loaded, never per forward."""
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int16:
        raise TypeError(f"invalid_meta_count: meta must be an int16 tensor, got {getattr(meta, 'dtype', type(meta))}")
    if meta.device.type == "meta" or meta.numel() == 0:
        return 0
    shifts = torch.arange(0, 16, 4, device=meta.device)
    nibbles = (meta.reshape(-1, 1).long() >> shifts) & 0xF
    return int(((nibbles & 3) >= (nibbles >> 2)).sum())


_UNCHECKED_OP = None  # torch.ops.prunedm.decompress_2to4_unchecked once its fake is registered, or False


def _unchecked_extension_op():
    """The extension's CUDA decompress without the metadata count, or None when this build has none (a CUDA
    build's op, csrc/cuda/sparse24.cu, so not in prunedm._ext.REQUIRED_OPS). Its fake is registered here,
    once, outside any torch.compile trace."""
    global _UNCHECKED_OP
    if _UNCHECKED_OP is None:
        _UNCHECKED_OP = False
        if _ext.cuda_kernels_built() and hasattr(torch.ops.prunedm, "decompress_2to4_unchecked"):

            def _fake(values, meta):
                return values.new_empty((values.shape[0], 2 * values.shape[1]))

            try:
                torch.library.register_fake("prunedm::decompress_2to4_unchecked", _fake)
            except RuntimeError:  # registered already (e.g. by prunedm.ops._fake)
                pass
            _UNCHECKED_OP = torch.ops.prunedm.decompress_2to4_unchecked
    return _UNCHECKED_OP or None


def decompress_2to4_unchecked(values: torch.Tensor, meta: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """decompress_2to4 without the metadata check, so nothing is read back to the host: safe per forward
    and inside CUDA graph capture. Only for metadata checked once before (invalid_meta_count == 0, as
    compress_2to4 makes it and the sparse layers check at load time); an invalid entry decodes as the
    reference does (its second index wins) instead of raising. On CPU the extension's check is C++ and
    costs no host sync, so it stays."""
    _checks.check_decompress(values, meta)
    _backends.check_same_device("decompress_2to4", values=values, meta=meta)
    return _backends.pick("decompress_2to4_unchecked", backend, values).fn(values, meta)


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
