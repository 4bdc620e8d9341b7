// Unit tests of csrc/include/prunedm/philox.h (Philox4x32-10 against Random123's known-answer
// vectors, the element-to-bits mapping) and csrc/include/prunedm/gumbel.h (pattern enumeration,
// the relaxed top-n and its backward against finite differences).
#include <prunedm/gumbel.h>
#include <prunedm/philox.h>

#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "check.h"

namespace {

void check_philox(const uint32_t counter[4], const uint32_t key[2], const uint32_t expected[4]) {
  uint32_t out[4];
  prunedm::philox4x32_10(counter, key, out);
  for (int i = 0; i < 4; ++i) CHECK_EQ(out[i], expected[i]);
}

// Random123's kat_vectors for philox4x32_10.
void test_known_answers() {
  {
    const uint32_t counter[4] = {0, 0, 0, 0}, key[2] = {0, 0};
    const uint32_t expected[4] = {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8};
    check_philox(counter, key, expected);
  }
  {
    const uint32_t counter[4] = {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, key[2] = {0xffffffff, 0xffffffff};
    const uint32_t expected[4] = {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd};
    check_philox(counter, key, expected);
  }
  {
    const uint32_t counter[4] = {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, key[2] = {0xa4093822, 0x299f31d0};
    const uint32_t expected[4] = {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1};
    check_philox(counter, key, expected);
  }
  // Output may alias the counter.
  uint32_t inout[4] = {0, 0, 0, 0};
  const uint32_t key[2] = {0, 0};
  prunedm::philox4x32_10(inout, key, inout);
  CHECK_EQ(inout[0], 0x6627e8d5u);
  CHECK_EQ(inout[3], 0x9b00dbd8u);
}

// Element i draws word i % 4 of counter {i / 4 (64-bit, split), 0, 0}, key = the seed's halves.
void test_element_mapping() {
  const uint64_t seeds[] = {0, 1, 0x123456789abcdefULL, ~uint64_t{0}};
  for (uint64_t seed : seeds) {
    prunedm::PhiloxStream stream(seed);
    const uint64_t indices[] = {0, 1, 2, 3, 4, 7, 1000, (uint64_t{1} << 34) + 5, (uint64_t{1} << 40) + 2};
    for (uint64_t index : indices) {
      const uint64_t block = index / 4;
      const uint32_t counter[4] = {uint32_t(block), uint32_t(block >> 32), 0, 0};
      const uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
      uint32_t out[4];
      prunedm::philox4x32_10(counter, key, out);
      CHECK_EQ(prunedm::philox_bits(seed, index), out[index % 4]);
      CHECK_EQ(stream.bits(index), out[index % 4]);
    }
  }
  // The batched fill draws the same bits from any start, with any tail.
  for (uint64_t first : {uint64_t{0}, uint64_t{1}, uint64_t{6}, (uint64_t{1} << 32) * 4 - 9}) {
    for (int64_t count : {0, 3, 31, 32, 33, 100}) {
      std::vector<uint32_t> bits(size_t(count) + 1, 0xdeadbeefu);
      prunedm::philox_bits_range(0x5eedULL, first, count, bits.data());
      for (int64_t i = 0; i < count; ++i) CHECK_EQ(bits[size_t(i)], prunedm::philox_bits(0x5eedULL, first + uint64_t(i)));
      CHECK_EQ(bits[size_t(count)], 0xdeadbeefu);
    }
  }
  // A stream with an offset draws the bits of index offset + i: a shard samples as the whole tensor would.
  for (uint64_t offset : {uint64_t{0}, uint64_t{1}, uint64_t{6}, uint64_t{24}, (uint64_t{1} << 33) + 3}) {
    prunedm::PhiloxStream shard(0x5eedULL, offset);
    for (uint64_t i : {uint64_t{0}, uint64_t{1}, uint64_t{2}, uint64_t{5}, uint64_t{9}})
      CHECK_EQ(shard.bits(i), prunedm::philox_bits(0x5eedULL, offset + i));
  }
  // Different seeds and neighbouring indices give different words.
  CHECK(prunedm::philox_bits(1, 0) != prunedm::philox_bits(2, 0));
  CHECK(prunedm::philox_bits(1, 0) != prunedm::philox_bits(1, 1));
  CHECK(prunedm::philox_bits(1, 3) != prunedm::philox_bits(1, 4));
}

void test_uniform_and_gumbel_range() {
  CHECK(prunedm::uniform_open01(0) > 0.0);
  CHECK(prunedm::uniform_open01(0xffffffffu) < 1.0);
  CHECK(std::isfinite(prunedm::gumbel_from_bits(0)));
  CHECK(std::isfinite(prunedm::gumbel_from_bits(0xffffffffu)));
  CHECK(prunedm::gumbel_from_bits(0) < prunedm::gumbel_from_bits(0xffffffffu));
  // The mean of Gumbel noise is the Euler-Mascheroni constant.
  double sum = 0;
  const int count = 1 << 16;
  for (int i = 0; i < count; ++i) sum += prunedm::gumbel_from_bits(prunedm::philox_bits(7, uint64_t(i)));
  CHECK(std::fabs(sum / count - 0.5772156649) < 0.02);
}

void test_combinations() {
  // 2:4 in lexicographic order: {0,1} {0,2} {0,3} {1,2} {1,3} {2,3}.
  const uint64_t expected[6] = {0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100};
  uint64_t bits = prunedm::first_combination(2);
  for (int p = 0; p < 6; ++p, bits = prunedm::next_combination(bits, 4)) CHECK_EQ(bits, expected[p]);
  CHECK_EQ(bits, uint64_t{0});
  // Every (n, m) up to 12: C(m, n) distinct n-subsets, each larger than the last in lexicographic order.
  for (int m = 1; m <= 12; ++m)
    for (int n = 0; n <= m; ++n) {
      std::set<uint64_t> seen;
      std::vector<int> previous;
      uint64_t b = prunedm::first_combination(n);
      for (int64_t p = 0; p < prunedm::binomial(m, n); ++p, b = prunedm::next_combination(b, m)) {
        CHECK_EQ(__builtin_popcountll(b), n);
        CHECK(b < (uint64_t{1} << m));
        std::vector<int> indices;
        for (int i = 0; i < m; ++i)
          if ((b >> i) & 1u) indices.push_back(i);
        if (p > 0) CHECK(previous < indices);
        previous = indices;
        seen.insert(b);
      }
      CHECK_EQ(int64_t(seen.size()), prunedm::binomial(m, n));
      CHECK_EQ(b, uint64_t{0});
    }
  CHECK_EQ(prunedm::binomial(16, 8), int64_t{12870});
  CHECK_EQ(prunedm::binomial(4, 5), int64_t{0});
}

void test_relaxed_top_n() {
  const double keys[6] = {0.3, -1.2, 2.0, 0.7, -0.1, 1.1};
  for (int n = 0; n <= 6; ++n) {
    double soft[6];
    prunedm::relaxed_top_n<double, 6>(keys, n, 6, 0.7, soft);
    double sum = 0;
    for (double s : soft) {
      CHECK(s >= 0.0);
      sum += s;
    }
    CHECK(std::fabs(sum - n) < 1e-12);
  }
  // A low temperature gives the hard top-n, even where a softmax rounds to exactly 1.
  const double sharp[4] = {9.0, -5.0, 4.0, 1.0};
  double soft[4];
  prunedm::relaxed_top_n<double, 4>(sharp, 2, 4, 0.01, soft);
  CHECK(std::fabs(soft[0] - 1) < 1e-12 && std::fabs(soft[2] - 1) < 1e-12);
  CHECK(soft[1] < 1e-12 && soft[3] < 1e-12);
  const float sharp_f[4] = {9.f, -5.f, 4.f, 1.f};
  float soft_f[4];
  prunedm::relaxed_top_n<float, 4>(sharp_f, 3, 4, 0.01f, soft_f);
  CHECK(std::fabs(soft_f[0] - 1) < 1e-6f && std::fabs(soft_f[2] - 1) < 1e-6f && std::fabs(soft_f[3] - 1) < 1e-6f);
}

// Backward against central differences of sum_i grad_i * soft_i.
void test_relaxed_top_n_backward() {
  const double keys[5] = {0.3, -1.2, 2.0, 0.7, 1.9};
  const double grad[5] = {0.5, -1.0, 0.25, 2.0, -0.75};
  for (double tau : {0.3, 1.0, 2.5})
    for (int n = 0; n <= 5; ++n) {
      double gk[5];
      prunedm::relaxed_top_n_backward<double, 5>(keys, grad, n, 5, tau, gk);
      for (int j = 0; j < 5; ++j) {
        const double h = 1e-6;
        double kp[5], km[5], sp[5], sm[5];
        for (int i = 0; i < 5; ++i) kp[i] = km[i] = keys[i];
        kp[j] += h;
        km[j] -= h;
        prunedm::relaxed_top_n<double, 5>(kp, n, 5, tau, sp);
        prunedm::relaxed_top_n<double, 5>(km, n, 5, tau, sm);
        double numeric = 0;
        for (int i = 0; i < 5; ++i) numeric += grad[i] * (sp[i] - sm[i]) / (2 * h);
        CHECK(std::fabs(numeric - gk[j]) < 1e-6);
      }
    }
}

void test_pattern_softmax_backward() {
  const double z[6] = {0.1, 1.5, -0.4, 0.9, 0.0, 2.2};
  const double grad_mask[4] = {1.0, -0.5, 0.25, 2.0};
  const auto mask_dot = [&](const double* scores) {
    double mask[4];
    prunedm::soft_pattern_mask<double>([&](int64_t p) { return scores[p]; }, 6, 2, 4, mask);
    double dot = 0, total = 0;
    for (int i = 0; i < 4; ++i) {
      dot += grad_mask[i] * mask[i];
      total += mask[i];
    }
    CHECK(std::fabs(total - 2.0) < 1e-12);
    return dot;
  };
  double gz[6];
  prunedm::soft_pattern_mask_backward<double>([&](int64_t p) { return z[p]; }, 6, 2, 4, grad_mask,
                                              [&](int64_t p, double v) { gz[p] = v; });
  for (int p = 0; p < 6; ++p) {
    double zp[6], zm[6];
    for (int i = 0; i < 6; ++i) zp[i] = zm[i] = z[i];
    zp[p] += 1e-6;
    zm[p] -= 1e-6;
    CHECK(std::fabs((mask_dot(zp) - mask_dot(zm)) / 2e-6 - gz[p]) < 1e-7);
  }
  CHECK_EQ(prunedm::argmax_pattern<double>([&](int64_t p) { return z[p]; }, 6, 2, 4), uint64_t{0b1100});
}

}  // namespace

int main() {
  test_known_answers();
  test_element_mapping();
  test_uniform_and_gumbel_range();
  test_combinations();
  test_relaxed_top_n();
  test_relaxed_top_n_backward();
  test_pattern_softmax_backward();
  return TEST_MAIN_RESULT();
}
