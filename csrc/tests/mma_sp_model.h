// A model of mma.sp m16n8k32 written from the PTX ISA's text, shared by the header tests: the fragment
// ownership formulas transcribed literally (independent of prunedm/sparse_gemm.h), and random 2:4 matrices
// packed as compress_2to4 packs them (values + sm80 int16 metadata).
#pragma once

#include <prunedm/sparse24.h>
#include <prunedm/sparse_gemm.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"

namespace mma_sp_model {

namespace ms = prunedm::mma_sp;

// ---- The PTX ISA's statements, transcribed literally (9.7.14.6.2, sparse mma m16n8k32 f16/bf16).
// A: a0..a7; row = groupID for ai where i < 2 || 4 <= i < 6, else groupID + 8;
//    col = threadID_in_group * 2 + (i & 1) for i < 4, + 8 for i >= 4 (kept columns).
inline ms::Coord ptx_a(int lane, int i) {
  const int group = lane >> 2, tig = lane % 4;
  const int row = (i < 2 || (4 <= i && i < 6)) ? group : group + 8;
  const int col = i < 4 ? tig * 2 + (i & 1) : tig * 2 + (i & 1) + 8;
  return {row, col};
}
// B: b0..b7; row = threadID_in_group * 2 + (i & 1) for i < 2, + 8 for i < 4, + 16 for i < 6,
//    + 24 otherwise; col = groupID.
inline ms::Coord ptx_b(int lane, int i) {
  const int group = lane >> 2, tig = lane % 4;
  const int base = tig * 2 + (i & 1);
  const int row = i < 2 ? base : i < 4 ? base + 8 : i < 6 ? base + 16 : base + 24;
  return {row, group};
}
// C/D: c0..c3; row = groupID for i < 2, groupID + 8 otherwise; col = threadID_in_group * 2 + (i & 1).
inline ms::Coord ptx_c(int lane, int i) {
  const int group = lane >> 2, tig = lane % 4;
  return {i < 2 ? group : group + 8, tig * 2 + (i & 1)};
}

// ---- A random 2:4 matrix packed as compress_2to4 packs it (values + sm80 int16 metadata).
struct Packed {
  int64_t rows, cols;
  std::vector<float> dense;     // [rows, cols]
  std::vector<float> values;    // [rows, cols / 2]
  std::vector<uint16_t> meta;   // [rows, cols / 16] in the sm80 layout
  std::vector<uint32_t> logical_nibbles;  // [rows, cols / 4]
};

inline Packed random_packed(int64_t rows, int64_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> keep(0, 2);
  std::uniform_int_distribution<int> level(-8, 8);
  Packed p{rows, cols, std::vector<float>(rows * cols, 0.f), std::vector<float>(rows * cols / 2),
           std::vector<uint16_t>(rows * cols / 16), std::vector<uint32_t>(rows * cols / 4)};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < cols / 4; ++g) {
      int order[4] = {0, 1, 2, 3};
      std::shuffle(order, order + 4, rng);
      for (int k = keep(rng); k > 0; --k) {
        const int v = level(rng);
        p.dense[r * cols + 4 * g + order[k - 1]] = float(v == 0 ? 3 : v) * 0.25f;
      }
    }
  const auto is_nonzero = [](float v) { return v != 0.f; };
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols / prunedm::kColsPerMeta; ++j) {
      uint16_t packed = 0;
      CHECK_EQ(prunedm::pack_16_cols(&p.dense[r * cols + 16 * j], &p.values[r * (cols / 2) + 8 * j], &packed,
                                     is_nonzero),
               0);
      p.meta[prunedm::meta_offset_sm80(r, j, rows)] = packed;
      for (int g = 0; g < 4; ++g) p.logical_nibbles[r * (cols / 4) + 4 * j + g] = (packed >> (4 * g)) & 0xFu;
    }
  return p;
}

// The sm80 buffer read as little-endian 32-bit words, as the kernel reads it.
inline std::vector<uint32_t> as_words(const std::vector<uint16_t>& meta) {
  std::vector<uint32_t> words(meta.size() / 2);
  std::memcpy(words.data(), meta.data(), words.size() * sizeof(uint32_t));
  return words;
}

// ldmatrix.sync.aligned.m8n8.x4.b16 (PTX ISA 9.7.14.5.15): threads 8j..8j+7 give the addresses of rows 0..7
// of matrix j; each row is 8 consecutive b16; thread t receives, in destination register j, row t / 4, elements
// 2 (t % 4) and 2 (t % 4) + 1 (low half first) of matrix j. `row_of_lane(l)` is lane l's address as a row of
// `smem` (8 values each); returns regs[lane][2 j + half].
template <typename Smem, typename RowOfLane>
void ldmatrix_x4(const Smem& smem, RowOfLane row_of_lane, float (&regs)[32][8]) {
  for (int t = 0; t < 32; ++t)
    for (int j = 0; j < 4; ++j)
      for (int half = 0; half < 2; ++half) regs[t][2 * j + half] = smem[row_of_lane(8 * j + t / 4)][2 * (t % 4) + half];
}

// Who holds what: inverse tables of ptx_a / ptx_b / ptx_c, {lane, element}.
struct Owners {
  ms::Coord a[16][16], b[32][8], c[16][8];
  Owners() {
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 8; ++i) {
        a[ptx_a(lane, i).row][ptx_a(lane, i).col] = {lane, i};
        b[ptx_b(lane, i).row][ptx_b(lane, i).col] = {lane, i};
      }
      for (int i = 0; i < 4; ++i) c[ptx_c(lane, i).row][ptx_c(lane, i).col] = {lane, i};
    }
  }
};

}  // namespace mma_sp_model
