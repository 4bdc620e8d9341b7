// Torch-free index and packing logic of N:M masks and the 2:4 sparse format.
// Compiled into the CPU extension, the CUDA kernels and the C++ unit tests alike.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PRUNEDM_HD __host__ __device__ __forceinline__
#else
#define PRUNEDM_HD inline
#endif

namespace prunedm {

// Largest group size an N:M mask supports: a group's selection is a 64-bit mask.
constexpr int kMaxGroupSize = 64;

// Dense columns one int16 metadata element describes (four 4-wide groups, 4 bits each).
constexpr int kColsPerMeta = 16;
// The CUTLASS sm80 metadata layout tiles rows by 32 and metadata columns by 2.
constexpr int kRowTile = 32;
constexpr int kColTile = 32;

// Orders keys for "keep the n largest": NaN is larger than every number (as in torch.sort),
// two NaNs are equal. Bitwise operators keep it branch-free (a > b is false when either is NaN).
template <typename Key>
PRUNEDM_HD bool key_greater(Key a, Key b) {
  return ((a != a) & (b == b)) | (a > b);
}

// Bit i is set when keys[i] is among the n largest of keys[0..m); ties go to the lower index.
// An element's rank is the number of elements that beat it; it is kept when its rank is below n.
template <typename Key>
PRUNEDM_HD uint64_t top_n_bits(const Key* keys, int n, int m) {
  uint64_t kept = 0;
  for (int i = 0; i < m; ++i) {
    int rank = 0;
    for (int j = 0; j < m; ++j) {
      const bool beats = key_greater(keys[j], keys[i]) | ((j < i) & !key_greater(keys[i], keys[j]));
      rank += int(beats);
    }
    if (rank < n) kept |= (uint64_t{1} << i);
  }
  return kept;
}

// Number of set bits of a group's non-zero mask.
PRUNEDM_HD int popcount4(uint32_t bits) {
  return int(bits & 1u) + int((bits >> 1) & 1u) + int((bits >> 2) & 1u) + int((bits >> 3) & 1u);
}

// 2:4 metadata nibble (idx0 | idx1 << 2, idx0 < idx1) of a 4-wide group, from its non-zero
// bits (bit i = element i is non-zero). With two non-zeros the nibble names them. With fewer,
// zero slots complete the pair exactly as CUTLASS's converter (and torch's port of it) does, so
// the packed bytes match the oracle: {} and {2} and {3} -> (2,3), {0} -> (0,2), {1} -> (1,2).
// More than two non-zeros cannot be encoded; callers refuse such groups before packing.
// Entry k of this table (4 bits at 4*k) is the nibble for non-zero bits k.
constexpr uint64_t kNibbleForNonzeroBits = 0x4DCE4DCE498E498EULL;

PRUNEDM_HD uint32_t meta_nibble(uint32_t nonzero_bits) {
  return uint32_t((kNibbleForNonzeroBits >> (4u * (nonzero_bits & 0xFu))) & 0xFu);
}
PRUNEDM_HD int nibble_index0(uint32_t nibble) { return int(nibble & 3u); }
PRUNEDM_HD int nibble_index1(uint32_t nibble) { return int((nibble >> 2) & 3u); }

// Where metadata element (row, meta_col) of a [rows, cols/16] int16 metadata matrix is stored,
// as an element offset into the buffer, in the layout CUTLASS sm80 sparse GEMMs read
// (torch's to_sparse_semi_structured produces the same): rows are interleaved within each
// 32-row tile (row r of the tile goes to 4*(r%8) + r/8), every 2x2 block is transposed, and
// the result is stored column-major interleaved by 2 (pairs of columns are contiguous per row).
// Needs rows % 32 == 0 and an even number of metadata columns.
PRUNEDM_HD int64_t meta_offset_sm80(int64_t row, int64_t meta_col, int64_t rows) {
  const int64_t in_tile = row % kRowTile;
  const int64_t r = row - in_tile + (in_tile % 8) * 4 + in_tile / 8;
  // Transposing the 2x2 block swaps the low bits of row and column.
  const int64_t stored_row = (r & ~int64_t{1}) | (meta_col & 1);
  const int64_t stored_col_low = r & 1;
  return (meta_col / 2) * rows * 2 + stored_row * 2 + stored_col_low;
}

// Packs one row's 16 dense values (4 groups) into 8 kept values and one metadata element.
// Returns the number of groups that held more than two non-zeros (0 when packing is exact).
template <typename T, typename IsNonzero>
PRUNEDM_HD int pack_16_cols(const T* dense16, T* values8, uint16_t* meta, IsNonzero is_nonzero) {
  uint32_t packed = 0;
  int violations = 0;
  for (int g = 0; g < 4; ++g) {
    uint32_t bits = 0;
    for (int i = 0; i < 4; ++i) bits |= (is_nonzero(dense16[4 * g + i]) ? 1u : 0u) << i;
    violations += popcount4(bits) > 2 ? 1 : 0;
    const uint32_t nibble = meta_nibble(bits);
    values8[2 * g] = dense16[4 * g + nibble_index0(nibble)];
    values8[2 * g + 1] = dense16[4 * g + nibble_index1(nibble)];
    packed |= nibble << (4 * g);
  }
  *meta = uint16_t(packed);
  return violations;
}

// Inverse of pack_16_cols: writes 16 dense values, zeros where nothing was kept.
template <typename T>
PRUNEDM_HD void unpack_16_cols(const T* values8, uint16_t meta, T* dense16, T zero) {
  for (int i = 0; i < 16; ++i) dense16[i] = zero;
  for (int g = 0; g < 4; ++g) {
    const uint32_t nibble = (uint32_t(meta) >> (4 * g)) & 0xFu;
    // Index 1 is written last so that a (degenerate) repeated index keeps the second value.
    dense16[4 * g + nibble_index0(nibble)] = values8[2 * g];
    dense16[4 * g + nibble_index1(nibble)] = values8[2 * g + 1];
  }
}

}  // namespace prunedm
