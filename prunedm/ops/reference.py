"""Readable reference implementations of prunedm's ops: the specification every fast path is tested against.

Each ``<op>_ref`` favours clarity over speed and runs on any device. Arguments are assumed valid
(the public functions in :mod:`prunedm.ops` check them first)."""

from __future__ import annotations

import torch

# 2:4 metadata nibble (idx0 | idx1 << 2) for each non-zero pattern of a 4-wide group (bit i set
# when element i is non-zero). Two non-zeros name themselves; with fewer, zero slots complete the
# pair exactly as CUTLASS's reference converter does ({}/{2}/{3} -> (2,3), {0} -> (0,2),
# {1} -> (1,2)), so that packed bytes match torch.sparse. Three or four non-zeros cannot be
# packed; compress_2to4 refuses them, and their entries are never used.
_NIBBLE_FOR_NONZERO_BITS = (
    0b1110, 0b1000, 0b1001, 0b0100,  # {}, {0}, {1}, {0,1}
    0b1110, 0b1000, 0b1001, 0b0100,  # {2}, {0,2}, {1,2}, {0,1,2}
    0b1110, 0b1100, 0b1101, 0b0100,  # {3}, {0,3}, {1,3}, {0,1,3}
    0b1110, 0b1100, 0b1101, 0b0100,  # {2,3}, {0,2,3}, {1,2,3}, {0,1,2,3}
)  # fmt: skip

COLS_PER_META = 16  # dense columns described by one int16 metadata element
ROW_TILE = 32  # the sm80 metadata layout interleaves rows in tiles of 32


def nm_mask_ref(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive elements along the last dim.

    Ties go to the lower index; NaN counts as larger than any number (torch.sort's order)."""
    groups = weight.abs().reshape(*weight.shape[:-1], weight.shape[-1] // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(weight.shape)


def nm_violations_ref(t: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Number of m-wide groups along the last dim holding more than n non-zeros (int64 scalar)."""
    nonzeros = (t != 0).reshape(*t.shape[:-1], t.shape[-1] // m, m).sum(-1)
    return (nonzeros > n).sum()


def is_nm_sparse_ref(t: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    return int(nm_violations_ref(t, n, m)) == 0


def conv_weight_to_matrix_ref(w: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, kh, kw] -> [Cout, kh*kw*Cin], K ordered (kh, kw, Cin) as in NHWC implicit GEMM."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def matrix_to_conv_weight_ref(mat: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of conv_weight_to_matrix_ref: [Cout, kh*kw*Cin] -> [Cout, Cin, kh, kw]."""
    cout, cin, kh, kw = shape
    return mat.reshape(cout, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


def meta_offsets_sm80_ref(rows: int, meta_cols: int, device=None) -> torch.Tensor:
    """[rows, meta_cols] int64: where each logical metadata element is stored in the sm80 layout.

    Rows are interleaved within 32-row tiles (row r of a tile goes to 4*(r%8) + r//8), each 2x2
    block is transposed, and the matrix is stored column-major interleaved by 2 (CUTLASS's
    ColumnMajorInterleaved<2>)."""
    row = torch.arange(rows, device=device).unsqueeze(1)
    col = torch.arange(meta_cols, device=device).unsqueeze(0)
    in_tile = row % ROW_TILE
    r = row - in_tile + (in_tile % 8) * 4 + in_tile // 8
    stored_row = (r - r % 2) + col % 2  # the 2x2 transpose swaps the low bits of row and column
    stored_col_low = r % 2
    return (col // 2) * rows * 2 + stored_row * 2 + stored_col_low


def compress_2to4_ref(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2-D 2:4-sparse matrix into (values [R, C/2], meta [R, C/16] int16, sm80 layout)."""
    rows, cols = dense.shape
    groups = dense.reshape(rows, cols // 4, 4)
    weights = torch.tensor([1, 2, 4, 8], device=dense.device)
    nonzero_bits = ((groups != 0).long() * weights).sum(-1)
    table = torch.tensor(_NIBBLE_FOR_NONZERO_BITS, device=dense.device)
    nibbles = table[nonzero_bits]  # [R, C/4]
    index0, index1 = nibbles & 3, nibbles >> 2
    kept = torch.stack((groups.gather(-1, index0[..., None]), groups.gather(-1, index1[..., None])), -1)
    values = kept.reshape(rows, cols // 2)

    # Four nibbles per int16, the first group in the lowest bits.
    shifts = torch.tensor([0, 4, 8, 12], device=dense.device)
    meta_logical = (nibbles.reshape(rows, cols // COLS_PER_META, 4) << shifts).sum(-1)
    meta = torch.empty(rows * (cols // COLS_PER_META), dtype=torch.int64, device=dense.device)
    meta[meta_offsets_sm80_ref(rows, cols // COLS_PER_META, dense.device).reshape(-1)] = meta_logical.reshape(-1)
    # Reinterpret the low 16 bits as int16 (values above 0x7fff become negative, as in CUTLASS).
    meta = ((meta + 2**15) % 2**16 - 2**15).to(torch.int16)
    return values, meta.reshape(rows, cols // COLS_PER_META)


def decompress_2to4_ref(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of compress_2to4_ref: the dense [R, 2*values.shape[1]] matrix."""
    rows, half_cols = values.shape
    cols = half_cols * 2
    offsets = meta_offsets_sm80_ref(rows, cols // COLS_PER_META, values.device)
    meta_logical = meta.reshape(-1).long()[offsets.reshape(-1)].reshape(rows, cols // COLS_PER_META) & 0xFFFF
    shifts = torch.tensor([0, 4, 8, 12], device=values.device)
    nibbles = ((meta_logical.unsqueeze(-1) >> shifts) & 0xF).reshape(rows, cols // 4)
    dense = torch.zeros(rows, cols // 4, 4, dtype=values.dtype, device=values.device)
    kept = values.reshape(rows, cols // 4, 2)
    dense.scatter_(-1, (nibbles & 3)[..., None], kept[..., 0:1])
    dense.scatter_(-1, (nibbles >> 2)[..., None], kept[..., 1:2])
    return dense.reshape(rows, cols)
