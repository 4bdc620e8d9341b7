"""2:4 weight matrices packed for storage: values + int16 metadata (compress_2to4's sm80 layout), any float dtype.

Matrices are zero-padded to multiples of 32 rows and columns (compress_2to4's tile rule); the zero
rows and columns are 2:4 by construction and are sliced off again when the matrix is unpacked."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunedm import _ext, ops
from prunedm.ops import _backends as op_table
from prunedm.ops import sparse24
from prunedm.ops._checks import COL_TILE, ROW_TILE
from prunedm.ops._checks import SIXTEEN_BIT_FLOATS as SIXTEEN_BIT

TILE = max(ROW_TILE, COL_TILE)  # compress_2to4 needs rows and columns in multiples of 32
GROUP = 4  # 2:4 groups run along the last (input) dim
PACKABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The metadata of an all-zero matrix: every 4-group gets the nibble 0b1110 (indices 2, 3), so 0xEEEE.
EMPTY_META = -4370

# Per forward the metadata is never checked (a host sync per layer, and an error under CUDA graph capture):
# meta_problem() checks it once when a layer's buffers are packed or loaded. The unchecked decompress per device
# type, from prunedm.ops' backend table, resolved here once, outside any torch.compile trace (CUDA: when the
# extension has CUDA kernels; otherwise per call through prunedm.ops, Triton or the reference).
_DECOMPRESS = {"cpu": op_table.resolve("decompress_2to4_unchecked", "auto", torch.device("cpu")).fn}
_DECOMPRESS["meta"] = _DECOMPRESS["cpu"]  # the extension's CPU op has a meta kernel; the reference runs on meta
if _ext.cuda_kernels_built():
    _DECOMPRESS["cuda"] = op_table.resolve("decompress_2to4_unchecked", "auto", torch.device("cuda")).fn


def round_up(n: int, multiple: int = TILE) -> int:
    return -(-n // multiple) * multiple


def padded_shape(rows: int, cols: int) -> tuple[int, int]:
    """The stored [rows, cols] of a dense [rows, cols] matrix: both rounded up to multiples of 32."""
    return round_up(rows), round_up(cols)


def packed_nbytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes of values + metadata for a dense [rows, cols] matrix (padding included)."""
    rows_p, cols_p = padded_shape(rows, cols)
    element = torch.empty((), dtype=dtype).element_size()
    return rows_p * (cols_p // 2) * element + rows_p * (cols_p // 16) * 2


def _decompress16(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    decompress = _DECOMPRESS.get(values.device.type)
    if decompress is not None:
        return decompress(values, meta)
    return sparse24.decompress_2to4_unchecked(values, meta)


def meta_problem(meta: torch.Tensor) -> str | None:
    """Why packed 2:4 metadata cannot be used (invalid index pairs), or None. Reads one number back from
    the device: called when a layer's buffers are packed or loaded, never per forward."""
    count = sparse24.invalid_meta_count(meta)
    if count:
        return (
            f"meta holds {count} invalid 2:4 index pair(s) (each 4-bit entry must name two increasing indices); "
            "was it made by compress_2to4 for values of this shape?"
        )
    return None


def _decompress_wide(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Unpack 32/64-bit values with the 16-bit kernel: each value is k 16-bit planes that the metadata
    places identically, so decompressing every plane (as float16 bit patterns, moved, never computed
    on) and interleaving them again rebuilds the dense matrix bit for bit; empty slots are all-zero
    bits, i.e. 0.0. About 3x faster on CPU than a masked_scatter over the kept positions."""
    rows, half = values.shape
    planes = values.element_size() // 2
    bits = values.contiguous().view(torch.float16).view(rows, half, planes)
    with torch.autocast(values.device.type, enabled=False):  # bit patterns: nothing for autocast to cast
        dense = torch.stack([_decompress16(bits[..., i].contiguous(), meta) for i in range(planes)], dim=-1)
    return dense.view(rows, 2 * half * planes).view(values.dtype)


def kept_positions(meta: torch.Tensor) -> torch.Tensor:
    """Bool [R, 16 * meta.shape[1]]: the two slots of every 4-group that the metadata names."""
    ones = torch.ones(meta.shape[0], meta.shape[1] * 8, dtype=torch.float16, device=meta.device)
    return _decompress16(ones, meta) != 0


def pack(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2-D matrix that is 2:4 along its last dim into (values [Rp, Cp/2], meta [Rp, Cp/16] int16).

    float16/bfloat16 go through prunedm.ops.compress_2to4 byte for byte. Other float dtypes keep
    their own values: the metadata comes from the non-zero pattern and the values are gathered in
    the same order, so a later .half() of the values gives exactly compress_2to4's packing."""
    rows, cols = matrix.shape
    rows_p, cols_p = padded_shape(rows, cols)
    if (rows_p, cols_p) != (rows, cols):
        matrix = F.pad(matrix, (0, cols_p - cols, 0, rows_p - rows))
    matrix = matrix.contiguous()
    if matrix.dtype in SIXTEEN_BIT:
        return ops.compress_2to4(matrix)
    if matrix.dtype not in PACKABLE_DTYPES:
        raise TypeError(f"pack: weights must be one of {PACKABLE_DTYPES}, got {matrix.dtype}")
    _, meta = ops.compress_2to4((matrix != 0).to(torch.float16))  # refuses a group with > 2 non-zeros
    values = matrix[kept_positions(meta)].reshape(rows_p, cols_p // 2)
    return values, meta


def unpack(values: torch.Tensor, meta: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The dense [rows, cols] matrix (a view of the padded one when padding was added)."""
    if values.dtype in SIXTEEN_BIT:
        dense = _decompress16(values, meta)
    else:
        dense = _decompress_wide(values, meta)
    if dense.shape[0] != rows or dense.shape[1] != cols:
        dense = dense[:rows, :cols]
    return dense


def empty_packed(rows: int, cols: int, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of an all-zero [rows, cols] matrix: a valid packing to load a checkpoint into."""
    rows_p, cols_p = padded_shape(rows, cols)
    values = torch.zeros(rows_p, cols_p // 2, dtype=dtype, device=device)
    meta = torch.full((rows_p, cols_p // 16), EMPTY_META, dtype=torch.int16, device=device)
    return values, meta
