"""Triton kernels packing a 2:4-sparse fp16/bf16 matrix into values + int16 metadata (CUTLASS sm80
layout, byte-identical to torch.sparse) and unpacking it, registered as torch.ops.prunedm_triton.*."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunedm.kernels import _op
from prunedm.kernels._op import wrap_triton
from prunedm.ops import reference

# reference._NIBBLE_FOR_NONZERO_BITS as one 64-bit word (entry k in bits 4k..4k+3), so the kernel
# looks nibbles up with a shift; it equals csrc's kNibbleForNonzeroBits.
_NIBBLE_TABLE = sum(nibble << (4 * bits) for bits, nibble in enumerate(reference._NIBBLE_FOR_NONZERO_BITS))
# Metadata elements (16 dense columns of one row each) per program.
_META_PER_PROGRAM = 128


@triton.jit
def _sm80_meta_offset(row, meta_col, rows):
    """Where metadata element (row, meta_col) is stored: csrc's meta_offset_sm80."""
    in_tile = row % 32
    r = row - in_tile + (in_tile % 8) * 4 + in_tile // 8
    # Transposing each 2x2 block swaps the low bits of row and column.
    stored_row = (r - r % 2) + meta_col % 2
    return (meta_col // 2) * rows * 2 + stored_row * 2 + r % 2


@triton.jit
def _compress_2to4_kernel(
    dense_ptr,
    values_ptr,
    meta_ptr,
    partial_ptr,
    rows,
    meta_cols,
    meta_elements,
    NIBBLE_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # Each lane of the block owns one metadata element: 16 columns of one row, four 4-wide groups.
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = e < meta_elements
    row = e // meta_cols
    meta_col = e % meta_cols
    group = tl.arange(0, 4)
    slot = tl.arange(0, 4)
    offsets = (row * meta_cols * 16 + meta_col * 16)[:, None, None] + group[None, :, None] * 4 + slot[None, None, :]
    # int16 bits of fp16/bf16 (sign on top), so kept values keep their exact bit patterns.
    x = tl.load(dense_ptr + offsets, mask=valid[:, None, None], other=0)
    nonzero = ((x & 0x7FFF) != 0).to(tl.int32)
    nonzero_bits = tl.sum(nonzero << slot[None, None, :], axis=2)
    over = tl.sum(nonzero, axis=2) > 2
    tl.store(partial_ptr + pid, tl.sum(tl.sum(over.to(tl.int32), axis=1), axis=0))

    nibble = (NIBBLE_TABLE >> (nonzero_bits.to(tl.int64) * 4)) & 0xF
    index0 = nibble & 3
    index1 = nibble >> 2
    # Picking by a one-hot sum touches a single non-zero term, so the bits come through unchanged.
    kept0 = tl.sum(tl.where(slot[None, None, :] == index0[:, :, None], x, 0), axis=2).to(tl.int16)
    kept1 = tl.sum(tl.where(slot[None, None, :] == index1[:, :, None], x, 0), axis=2).to(tl.int16)
    value_offsets = (row * meta_cols * 8 + meta_col * 8)[:, None] + group[None, :] * 2
    tl.store(values_ptr + value_offsets, kept0, mask=valid[:, None])
    tl.store(values_ptr + value_offsets + 1, kept1, mask=valid[:, None])

    # Four nibbles per element, the first group in the lowest bits; the top one wraps into the sign.
    meta = tl.sum(nibble << (group[None, :] * 4), axis=1).to(tl.int16)
    tl.store(meta_ptr + _sm80_meta_offset(row, meta_col, rows), meta, mask=valid)


def _compress_2to4_fake(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = dense.shape
    return (
        dense.new_empty((rows, cols // 2)),
        dense.new_empty((rows, cols // 16), dtype=torch.int16),
        dense.new_empty((), dtype=torch.int64),
    )


@_op.register("prunedm_triton::compress_2to4", _compress_2to4_kernel, _compress_2to4_fake)
def compress_2to4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [R, C/2], meta [R, C/16] int16, number of 4-wide groups with more than 2 non-zeros).

    Groups over the limit are packed as their nibble-table entry says (values are lost); callers
    must refuse the result when the count is not zero."""
    rows, cols = dense.shape
    values = dense.new_empty((rows, cols // 2))
    meta = dense.new_empty((rows, cols // 16), dtype=torch.int16)
    meta_elements = rows * (cols // 16)
    if meta_elements == 0:
        return values, meta, dense.new_zeros((), dtype=torch.int64)
    programs = triton.cdiv(meta_elements, _META_PER_PROGRAM)
    partial = dense.new_empty((programs,), dtype=torch.int32)
    with _op.on_device_of(dense):
        wrap_triton(_compress_2to4_kernel)[(programs,)](
            dense.contiguous().view(torch.int16),
            values.view(torch.int16),
            meta,
            partial,
            rows,
            cols // 16,
            meta_elements,
            NIBBLE_TABLE=_NIBBLE_TABLE,
            BLOCK=_META_PER_PROGRAM,
        )
    return values, meta, partial.sum()


@triton.jit
def _decompress_2to4_kernel(
    values_ptr,
    meta_ptr,
    dense_ptr,
    partial_ptr,
    rows,
    meta_cols,
    meta_elements,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = e < meta_elements
    row = e // meta_cols
    meta_col = e % meta_cols
    group = tl.arange(0, 4)
    slot = tl.arange(0, 4)
    meta = tl.load(meta_ptr + _sm80_meta_offset(row, meta_col, rows), mask=valid, other=0).to(tl.int32) & 0xFFFF
    nibble = (meta[:, None] >> (group[None, :] * 4)) & 0xF
    index0 = nibble & 3
    index1 = nibble >> 2
    # mma.sp needs two increasing indices; count the entries that are not, for the caller to refuse.
    invalid = valid[:, None] & (index0 >= index1)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(invalid.to(tl.int32), axis=1), axis=0))

    value_offsets = (row * meta_cols * 8 + meta_col * 8)[:, None] + group[None, :] * 2
    kept0 = tl.load(values_ptr + value_offsets, mask=valid[:, None], other=0)
    kept1 = tl.load(values_ptr + value_offsets + 1, mask=valid[:, None], other=0)
    # Index 1 wins a repeated index, as in the reference (it is written last).
    dense = tl.where(
        slot[None, None, :] == index1[:, :, None],
        kept1[:, :, None],
        tl.where(slot[None, None, :] == index0[:, :, None], kept0[:, :, None], 0),
    ).to(tl.int16)
    offsets = (row * meta_cols * 16 + meta_col * 16)[:, None, None] + group[None, :, None] * 4 + slot[None, None, :]
    tl.store(dense_ptr + offsets, dense, mask=valid[:, None, None])


def _decompress_2to4_fake(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, half_cols = values.shape
    return values.new_empty((rows, 2 * half_cols)), values.new_empty((), dtype=torch.int64)


@_op.register("prunedm_triton::decompress_2to4", _decompress_2to4_kernel, _decompress_2to4_fake)
def decompress_2to4(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense [R, 2 * values.shape[1]], number of metadata entries whose indices do not increase).

    Callers must refuse the dense matrix when the count is not zero."""
    rows, half_cols = values.shape
    dense = values.new_empty((rows, 2 * half_cols))
    meta_elements = rows * (half_cols // 8)
    if meta_elements == 0:
        return dense, values.new_zeros((), dtype=torch.int64)
    programs = triton.cdiv(meta_elements, _META_PER_PROGRAM)
    partial = values.new_empty((programs,), dtype=torch.int32)
    with _op.on_device_of(values):
        wrap_triton(_decompress_2to4_kernel)[(programs,)](
            values.contiguous().view(torch.int16),
            meta.contiguous(),
            dense.view(torch.int16),
            partial,
            rows,
            half_cols // 8,
            meta_elements,
            BLOCK=_META_PER_PROGRAM,
        )
    return dense, partial.sum()
