// Unit tests of csrc/include/prunedm/sparse24.h: N:M selection, 2:4 nibbles, the sm80 metadata
// layout and the 16-column pack/unpack, each checked against an independent brute-force statement.
#include <prunedm/sparse24.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"

using prunedm::kColsPerMeta;

namespace {

// The nibble by its definition: the two non-zero indices in order; with fewer, CUTLASS's choices.
uint32_t nibble_by_definition(uint32_t bits) {
  int nz[4], count = 0;
  for (int i = 0; i < 4; ++i)
    if (bits & (1u << i)) nz[count++] = i;
  if (count >= 2) return uint32_t(nz[0] | (nz[1] << 2));
  if (count == 0) return 2 | (3 << 2);
  switch (nz[0]) {
    case 0: return 0 | (2 << 2);
    case 1: return 1 | (2 << 2);
    default: return 2 | (3 << 2);
  }
}

void test_meta_nibble() {
  for (uint32_t bits = 0; bits < 16; ++bits) {
    const uint32_t nibble = prunedm::meta_nibble(bits);
    CHECK(prunedm::nibble_index0(nibble) < prunedm::nibble_index1(nibble));
    if (prunedm::popcount4(bits) <= 2) {
      CHECK_EQ(nibble, nibble_by_definition(bits));
      // Every non-zero is among the two kept indices.
      for (int i = 0; i < 4; ++i)
        if (bits & (1u << i)) CHECK(prunedm::nibble_index0(nibble) == i || prunedm::nibble_index1(nibble) == i);
    } else {
      // Three or more (never packed): index 0 is still the lowest non-zero.
      CHECK_EQ(nibble & 0x3u, uint32_t(__builtin_ctz(bits)));
    }
  }
}

void test_top_n_bits() {
  const float keys[8] = {1.f, 3.f, 3.f, 0.5f, 2.f, 2.f, 2.f, 2.f};
  CHECK_EQ(prunedm::top_n_bits(keys, 2, 4), uint64_t{0b0110});
  CHECK_EQ(prunedm::top_n_bits(keys + 4, 2, 4), uint64_t{0b0011});  // ties go to the lower index
  CHECK_EQ(prunedm::top_n_bits(keys, 0, 4), uint64_t{0});
  CHECK_EQ(prunedm::top_n_bits(keys, 4, 4), uint64_t{0b1111});
  CHECK_EQ(prunedm::top_n_bits(keys, 3, 8), uint64_t{0b00010110});
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float with_nan[4] = {5.f, nan, std::numeric_limits<float>::infinity(), nan};
  CHECK_EQ(prunedm::top_n_bits(with_nan, 2, 4), uint64_t{0b1010});  // NaN beats infinity
  CHECK_EQ(prunedm::top_n_bits(with_nan, 3, 4), uint64_t{0b1110});

  // Random groups: exactly n kept, and no dropped key beats a kept key.
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> level(0, 3);
  for (int trial = 0; trial < 2000; ++trial) {
    const int m = 1 + trial % 64, n = trial % (m + 1);
    std::vector<double> group(m);
    for (auto& k : group) k = level(rng);
    const uint64_t kept = prunedm::top_n_bits(group.data(), n, m);
    CHECK_EQ(__builtin_popcountll(kept), n);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j)
        if ((kept >> i & 1) && !(kept >> j & 1)) {
          CHECK(group[i] >= group[j]);
          if (group[i] == group[j]) CHECK(i < j);
        }
  }
}

// The sm80 layout, stated as the composition of its three steps on a whole matrix.
std::vector<int64_t> offsets_by_steps(int64_t rows, int64_t meta_cols) {
  std::vector<int64_t> offsets(rows * meta_cols);
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t col = 0; col < meta_cols; ++col) {
      // 1. interleave rows inside each 32-row tile
      const int64_t t = row % 32;
      int64_t r = row - t + (t % 8) * 4 + t / 8;
      int64_t c = col;
      // 2. transpose each 2x2 block: swap the off-diagonal entries
      if (r % 2 == 0 && c % 2 == 1) {
        ++r;
        --c;
      } else if (r % 2 == 1 && c % 2 == 0) {
        --r;
        ++c;
      }
      // 3. column-major, interleaved by 2 columns
      offsets[row * meta_cols + col] = (c / 2) * (rows * 2) + r * 2 + c % 2;
    }
  return offsets;
}

void test_meta_offsets() {
  for (int64_t rows : {32, 64, 96, 256})
    for (int64_t meta_cols : {2, 4, 6, 32}) {
      const auto expected = offsets_by_steps(rows, meta_cols);
      std::vector<int> hits(rows * meta_cols, 0);
      for (int64_t row = 0; row < rows; ++row)
        for (int64_t col = 0; col < meta_cols; ++col) {
          const int64_t offset = prunedm::meta_offset_sm80(row, col, rows);
          CHECK_EQ(offset, expected[row * meta_cols + col]);
          CHECK(offset >= 0 && offset < rows * meta_cols);
          if (offset >= 0 && offset < rows * meta_cols) ++hits[offset];
        }
      for (int h : hits) CHECK_EQ(h, 1);  // a permutation
    }
  // Known positions in a 32x2 matrix: row 1 goes to stored row 4, row 8 to stored row 1.
  CHECK_EQ(prunedm::meta_offset_sm80(0, 0, 32), int64_t{0});
  CHECK_EQ(prunedm::meta_offset_sm80(0, 1, 32), int64_t{2});
  CHECK_EQ(prunedm::meta_offset_sm80(1, 0, 32), int64_t{8});
  CHECK_EQ(prunedm::meta_offset_sm80(8, 0, 32), int64_t{1});
}

void test_pack_unpack_round_trip() {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> keep_count(0, 2);
  std::uniform_real_distribution<float> value(-4.f, 4.f);
  const auto is_nonzero = [](float v) { return v != 0.f; };
  for (int trial = 0; trial < 5000; ++trial) {
    float dense[kColsPerMeta] = {};
    for (int g = 0; g < 4; ++g) {
      int order[4] = {0, 1, 2, 3};
      std::shuffle(order, order + 4, rng);
      for (int k = keep_count(rng); k > 0; --k) dense[4 * g + order[k - 1]] = value(rng);
    }
    if (trial % 7 == 0) dense[3] = -0.0f;  // a negative zero is a zero
    float values[8];
    uint16_t meta = 0;
    CHECK_EQ(prunedm::pack_16_cols(dense, values, &meta, is_nonzero), 0);
    float back[kColsPerMeta];
    prunedm::unpack_16_cols(values, meta, back, 0.f);
    for (int i = 0; i < kColsPerMeta; ++i) CHECK(back[i] == dense[i]);
  }
  // Three non-zeros in a group are counted as a violation.
  float dense[kColsPerMeta] = {1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1};
  float values[8];
  uint16_t meta = 0;
  CHECK_EQ(prunedm::pack_16_cols(dense, values, &meta, is_nonzero), 2);
}

}  // namespace

int main() {
  test_meta_nibble();
  test_top_n_bits();
  test_meta_offsets();
  test_pack_unpack_round_trip();
  return TEST_MAIN_RESULT();
}
