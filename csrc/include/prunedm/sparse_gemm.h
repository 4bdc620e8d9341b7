// Torch-free index logic of prunedm's 2:4 sparse GEMM: which values, metadata and activations each
// lane of a warp holds for PTX `mma.sp.m16n8k32` (f16/bf16, f32 accumulate), and the fused
// epilogue's activations. The CUDA kernels (csrc/cuda/sparse_mm.cu), the CPU twin
// (csrc/cpu/sparse_mm.cpp) and the header tests (csrc/tests/test_sparse_gemm.cpp) all use it.
//
// The GEMM is out[n, o] = act(sum_k W[o, k] X[n, k] + bias[o]) + residual[n, o], computed as
// D = A B with A = W (the 2:4 operand: rows o, 2:4 along k) and B = X^T, so one mma.sp covers
// 16 output features x 8 tokens x 32 dense k. W is stored as compress_2to4 makes it: values
// [M, K/2] (the two kept values of each 4-group, lower index first) and int16 metadata in the
// CUTLASS sm80 layout (prunedm/sparse24.h, meta_offset_sm80).
//
// Fragment layouts (PTX ISA 9.7.14.6.2, "mma.sp m16n8k32 .f16/.bf16"), with g = lane / 4 and
// t = lane % 4, element i = 2 * reg + half of a thread's registers:
//   A (compressed 16 x 16, two kept values per 4-group): row g + 8 (reg & 1),
//     kept column 2t + half + 8 (reg >> 1); kept columns 2j, 2j+1 are the values of dense
//     group j (dense k 4j..4j+3), so kept column c belongs to dense group c / 2.
//   B (dense 32 x 8): k row 2t + half + 8 reg, column g.
//   C/D (16 x 8 f32): row g + 8 (i >> 1), column 2t + (i & 1).
// Metadata (m16n8k32, 16-bit types): one 32-bit register per lane; the sparsity selector s
// (0 or 1) names the lanes that supply it: lanes 4g + 2s + h (h = 0, 1) of each quad. Lane
// 4g + 2s + h holds, for the dense k half h (k 16h..16h+15), the four nibbles of row g in bits
// 0..15 and those of row g + 8 in bits 16..31, group j of the half in bits 4j..4j+3 (index 0
// of the pair in the low two bits).
//
// Why the sm80 layout fits: its 32-bit words (pairs of int16) are laid out so that, for 32 rows
// starting at a multiple of 32 and one 32-wide k chunk, the 32 words are contiguous and word
// `lane` is exactly the register lane `lane` needs for the m16 tile (lane >> 1) & 1 of those 32
// rows, when that tile is issued with selector (lane >> 1) & 1 (CUTLASS's id2 = m % 2). So a
// warp that computes 32 rows loads its metadata with one coalesced 32-bit load per lane and
// issues the upper m16 tile with selector 1. test_sparse_gemm.cpp checks this against
// meta_offset_sm80 and simulates the warp to rebuild the dense tile.
#pragma once

#include <math.h>

#include <cstdint>

#include "prunedm/sparse24.h"

namespace prunedm {
namespace mma_sp {

constexpr int kWarpSize = 32;
constexpr int kTileM = 16;            // rows (output features) of one mma.sp
constexpr int kTileN = 8;             // columns (tokens / output pixels) of one mma.sp
constexpr int kTileK = 32;            // dense k of one mma.sp
constexpr int kKeptK = kTileK / 2;    // kept (compressed) columns of one mma.sp
constexpr int kMetaRowTile = 32;      // rows whose metadata one warp-wide 32-bit load covers
constexpr int kARegs = 4, kBRegs = 4, kCRegs = 4;

struct Coord {
  int row;
  int col;
};

// A fragment: register `reg` (0..3), half `half` (0 = low 16 bits) of lane `lane` holds the kept
// value at (row, kept column) of the 16 x 16 compressed tile.
PRUNEDM_HD Coord a_coord(int lane, int reg, int half) {
  return {(lane >> 2) + 8 * (reg & 1), 2 * (lane & 3) + half + 8 * (reg >> 1)};
}

// B fragment: (k row, column) of the dense 32 x 8 B tile.
PRUNEDM_HD Coord b_coord(int lane, int reg, int half) { return {2 * (lane & 3) + half + 8 * reg, lane >> 2}; }

// C/D fragment: (row, column) of accumulator i (0..3) of the 16 x 8 tile.
PRUNEDM_HD Coord c_coord(int lane, int i) { return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)}; }

// The lane whose metadata register holds row `row` (0..15) of an m16 tile, dense k half `k_half`
// (0 or 1), when the tile is issued with sparsity selector `selector`.
PRUNEDM_HD int meta_lane(int row, int k_half, int selector) { return 4 * (row & 7) + 2 * selector + k_half; }

// The lowest bit, in that lane's register, of the nibble of group `group` (0..3) of the half.
PRUNEDM_HD int meta_bit(int row, int group) { return 16 * (row >> 3) + 4 * group; }

// The metadata nibble of kept column `kept_col` (0..15) of row `row` of an m16 tile, read from the
// 32 lanes' registers as the hardware reads them, and the dense k (0..31) that kept value sits at.
PRUNEDM_HD uint32_t nibble_of_kept(const uint32_t* lane_meta, int row, int kept_col, int selector) {
  const int group = kept_col / 2;  // dense group 0..7 of the 32-wide chunk
  return (lane_meta[meta_lane(row, group / 4, selector)] >> meta_bit(row, group % 4)) & 0xFu;
}
PRUNEDM_HD int dense_k_of_kept(const uint32_t* lane_meta, int row, int kept_col, int selector) {
  const uint32_t nibble = nibble_of_kept(lane_meta, row, kept_col, selector);
  return 4 * (kept_col / 2) + ((kept_col & 1) ? nibble_index1(nibble) : nibble_index0(nibble));
}

// Selector of m16 tile `m16` of a 32-row metadata tile: CUTLASS's id2 = m % 2.
PRUNEDM_HD int selector_of(int m16) { return m16 & 1; }

// Offset, in 32-bit words, of lane 0's metadata word for the 32 rows starting at `row32` (a
// multiple of 32) and the 32-wide dense k chunk `k_chunk`, in a [rows, K/16] int16 sm80 layout
// read as 32-bit words; lane `lane` reads the word at this offset + lane.
PRUNEDM_HD int64_t meta_word_offset(int64_t row32, int64_t k_chunk, int64_t rows) { return k_chunk * rows + row32; }

// Offset, in elements, of kept column `kept_col` of row `row` of dense k chunk `k_chunk` in the
// [rows, K/2] values matrix (row stride K/2).
PRUNEDM_HD int64_t value_offset(int64_t row, int64_t k_chunk, int kept_col, int64_t k_dense) {
  return row * (k_dense / 2) + k_chunk * kKeptK + kept_col;
}

// ---- The CUDA kernel's CTA tile and shared-memory layout (csrc/cuda/sparse_gemm_kernel.cuh), here so that
// test_sparse_gemm.cpp simulates exactly what the kernel does: which thread copies which 16-byte unit, where
// the unit lands (swizzled), which lane gives ldmatrix which address, and which element each lane gets back.
namespace cta {

constexpr int kThreads = 128;                 // 4 warps, 2 (M) x 2 (N)
constexpr int kBlockM = 128, kBlockN = 128;   // output features x GEMM columns of one CTA
constexpr int kWarpM = 64, kWarpN = 64;       // one warp: 4 m16 x 8 n8 mma.sp tiles
constexpr int kWarpsM = kBlockM / kWarpM;
constexpr int kMTiles = kWarpM / kTileM, kNTiles = kWarpN / kTileN;
constexpr int kBlockK = kTileK;               // dense k of one pipeline stage: one mma.sp k step
constexpr int kStages = 3;
constexpr int kUnit = 16;                     // bytes of one cp.async, one ldmatrix row
constexpr int kAChunks = kKeptK * 2 / kUnit;  // 16-byte units of a row of kept values (2)
constexpr int kBChunks = kBlockK * 2 / kUnit; // 16-byte units of a column of B (4)
constexpr int kACopies = kBlockM * kAChunks / kThreads;  // per thread and stage (2)
constexpr int kBCopies = kBlockN * kBChunks / kThreads;  // per thread and stage (4)
constexpr int kMetaWords = kBlockM;           // 32 words per 32-row metadata tile
constexpr int kMetaThreads = kMetaWords * 4 / kUnit;  // threads 0..31 copy one unit each
// Byte offsets inside one stage: A [128 rows x 2 units], B [128 columns x 4 units], metadata [128 words].
constexpr int kAOffset = 0, kBOffset = kBlockM * kAChunks * kUnit;
constexpr int kMetaOffset = kBOffset + kBlockN * kBChunks * kUnit;
constexpr int kStageBytes = kMetaOffset + kMetaWords * 4;
static_assert(kWarpsM * (kBlockN / kWarpN) * kWarpSize == kThreads, "4 warps of 64 x 64");
static_assert(kWarpM == 2 * kMetaRowTile, "a warp covers two 32-row metadata tiles");

// The swizzled 16-byte unit holding chunk `chunk` of row `row` of the A tile (column `col` of B): an 8-row
// (8-column) ldmatrix phase and an 8-thread cp.async phase touch 8 distinct units mod 8, i.e. all 32 banks.
PRUNEDM_HD int a_unit(int row, int chunk) { return kAChunks * row + (chunk ^ ((row >> 2) & 1)); }
PRUNEDM_HD int b_unit(int col, int chunk) { return kBChunks * col + (chunk ^ ((col >> 1) & 3)); }

// Copy `i` of thread `tid` in a stage: {row, chunk} of A (i < kACopies), {column, chunk} of B (i < kBCopies).
// A copy's chunk is that of the thread; i adds 64 rows (32 columns), which keeps the swizzle, so a thread's
// copies land at one base plus i * 2048 bytes.
PRUNEDM_HD Coord a_copy(int tid, int i) { return {tid / kAChunks + i * (kThreads / kAChunks), tid % kAChunks}; }
PRUNEDM_HD Coord b_copy(int tid, int i) { return {tid / kBChunks + i * (kThreads / kBChunks), tid % kBChunks}; }

// ldmatrix.x4: lane L gives the address of row L % 8 of matrix L / 8 and gets, in register j, the element
// (L / 4, 2 (L % 4) + half) of matrix j. For A (an m16 tile, 16 rows x 2 units) matrix j is rows 8 (j & 1)..
// of unit j >> 1, so register j is a_coord's register j; for B (an n8 tile, 8 columns x 4 units) matrix j
// is unit j (k 8j..8j+7), so register j is b_coord's. {row, chunk} / {column, chunk} of lane L's address:
PRUNEDM_HD Coord a_ldsm_source(int lane) { return {(lane & 7) + 8 * ((lane >> 3) & 1), lane >> 4}; }
PRUNEDM_HD Coord b_ldsm_source(int lane) { return {lane & 7, lane >> 3}; }
// {row, column} of the 8 x 8 matrix element register j (any) of lane L receives, half `half`.
PRUNEDM_HD Coord ldsm_element(int lane, int half) { return {lane >> 2, 2 * (lane & 3) + half}; }

// Epilogue: a warp stages 32 of its 64 columns at a time as floats [32 columns][kEpiPitch], then lane L stores
// 8 consecutive output features of one column per step (16 bytes): column 4 step + L / 8, features 8 (L % 8).
constexpr int kEpiColumns = kWarpN / 2, kEpiPitch = kWarpM + 4, kEpiSteps = kEpiColumns * kWarpM / 8 / kWarpSize;
PRUNEDM_HD Coord epi_store(int lane, int step) { return {4 * step + lane / 8, 8 * (lane % 8)}; }  // {column, row}
static_assert((kThreads / kWarpSize) * kEpiColumns * kEpiPitch * 4 <= kStages * kStageBytes, "epilogue fits");

}  // namespace cta
}  // namespace mma_sp

// Where the residual element of output (GEMM column p, output feature o) lives: column p is the
// pixel (n, oh, ow) of an [N, OH, OW] grid (a linear layer is the grid [tokens, 1, 1]) and the
// residual is read through the strides of its broadcast [N, C, OH, OW] (or [tokens, C]) view.
struct ResidualLayout {
  int64_t out_h, out_w;
  int64_t stride_n, stride_c, stride_h, stride_w;
};

PRUNEDM_HD int64_t residual_offset(const ResidualLayout& r, int64_t p, int64_t o) {
  const int64_t ow = p % r.out_w, rest = p / r.out_w;
  return (rest / r.out_h) * r.stride_n + (rest % r.out_h) * r.stride_h + ow * r.stride_w + o * r.stride_c;
}

// Activations of the fused epilogue (the schema's `activation` strings map to these codes).
enum class Activation : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3, kGeluTanh = 4 };
constexpr int kNumActivations = 5;

// act(x) in float, as torch computes it: relu keeps NaN, gelu is the erf form, gelu_tanh the tanh
// approximation (approximate="tanh").
PRUNEDM_HD float apply_activation(float x, int activation) {
  switch (activation) {
    case int(Activation::kRelu): return x < 0.f ? 0.f : x;
    case int(Activation::kSilu): return x / (1.f + expf(-x));
    case int(Activation::kGelu): return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case int(Activation::kGeluTanh): {
      const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(inner));
    }
    default: return x;
  }
}

}  // namespace prunedm
