// Unit tests of the infinite-key rule of prunedm/gumbel.h (ranked top-n, the level plan of the
// relaxation and its backward, the pattern levels): no NaN, exactly n kept, +inf pinned, -inf dropped.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "check.h"
#include "prunedm/gumbel.h"

namespace {

constexpr double kInf = INFINITY;

void test_ranked_top_n_bits() {
  const double noise[4] = {0.5, -0.2, 1.5, 0.1};
  // Finite keys: the plain top-n (ties to the lower index).
  const double finite[4] = {1.0, 3.0, 3.0, -2.0};
  CHECK_EQ(prunedm::ranked_top_n_bits(finite, noise, 2, 4), prunedm::top_n_bits(finite, 2, 4));
  // +inf beats any finite key; among +inf entries the noise decides (element 2 has the larger).
  const double two_inf[4] = {kInf, 1e300, kInf, 0.0};
  CHECK_EQ(prunedm::ranked_top_n_bits(two_inf, noise, 1, 4), uint64_t{0b0100});
  CHECK_EQ(prunedm::ranked_top_n_bits(two_inf, noise, 3, 4), uint64_t{0b0111});
  // -inf fills a group only when fewer than n are above it, again by noise.
  const double all_neg[4] = {-kInf, -kInf, -kInf, 2.0};
  CHECK_EQ(prunedm::ranked_top_n_bits(all_neg, noise, 2, 4), uint64_t{0b1100});
  CHECK_EQ(prunedm::ranked_top_n_bits(all_neg, noise, 3, 4), uint64_t{0b1101});
}

void test_relaxation_levels() {
  const double noise[4] = {0.5, -0.2, 1.5, 0.1};
  const double keys[4] = {kInf, 0.3, -kInf, 1.0};
  for (double tau : {0.3, 1.0, 2.0}) {
    double soft[4], grad_keys[4];
    prunedm::relaxed_top_n_levels<double, 4>(keys, noise, 2, 4, tau, soft);
    // +inf pinned at 1, the finite pair shares the one place left, -inf gets 0.
    CHECK(soft[0] == 1.0 && soft[2] == 0.0);
    CHECK(std::fabs(soft[1] + soft[3] - 1.0) < 1e-12 && soft[3] > soft[1]);
    const double grad[4] = {1.0, 2.0, 3.0, -1.0};
    prunedm::relaxed_top_n_levels_backward<double, 4>(keys, noise, grad, 2, 4, tau, grad_keys);
    CHECK(grad_keys[0] == 0.0 && grad_keys[2] == 0.0);
    CHECK(std::isfinite(grad_keys[1]) && std::fabs(grad_keys[1] + grad_keys[3]) < 1e-12 && grad_keys[1] > 0);
  }
  // Every element -inf: the relaxed top-n of the noise alone, no gradient.
  const double none[4] = {-kInf, -kInf, -kInf, -kInf};
  double soft[4], grad_keys[4];
  const double grad[4] = {1.0, 2.0, 3.0, -1.0};
  prunedm::relaxed_top_n_levels<double, 4>(none, noise, 2, 4, 0.5, soft);
  double expected[4];
  prunedm::relaxed_top_n<double, 4>(noise, 2, 4, 0.5, expected);
  for (int i = 0; i < 4; ++i) CHECK(std::fabs(soft[i] - expected[i]) < 1e-15);
  prunedm::relaxed_top_n_levels_backward<double, 4>(none, noise, grad, 2, 4, 0.5, grad_keys);
  for (double g : grad_keys) CHECK(g == 0.0);
  // A finite key that overflows when divided by tau counts as +inf in the relaxation.
  const float big[4] = {3e38f, 0.0f, 1.0f, -1.0f};
  const float noise_f[4] = {0.5f, -0.2f, 1.5f, 0.1f};
  float soft_f[4];
  prunedm::relaxed_top_n_levels<float, 4>(big, noise_f, 2, 4, 0.1f, soft_f);
  CHECK(soft_f[0] == 1.0f && std::fabs(soft_f[1] + soft_f[2] + soft_f[3] - 1.0f) < 1e-6f);
}

void test_pattern_levels() {
  const double keys[6] = {0.1, kInf, -kInf, kInf, 5.0, 0.0};
  const double noise[6] = {0.0, 0.2, 3.0, 0.9, 0.0, 0.0};
  const auto key = [&](int64_t p) { return keys[p]; };
  const auto noise_of = [&](int64_t p) { return noise[p]; };
  const int top = prunedm::top_level<double>(key, 6);
  CHECK_EQ(top, 1);
  const auto competing = [&](int64_t p) { return prunedm::level_value<double>(key, noise_of, top, p); };
  CHECK_EQ(prunedm::argmax_pattern<double>(competing, 6, 2, 4), uint64_t{0b0110});  // pattern 3: {1, 2}
  double mask[4];
  prunedm::soft_pattern_mask<double>(competing, 6, 2, 4, mask);
  const double y1 = 1 / (1 + std::exp(0.9 - 0.2));  // softmax of the noise over patterns 1 and 3
  CHECK(std::fabs(mask[0] - y1) < 1e-12 && std::fabs(mask[1] - (1 - y1)) < 1e-12 && std::fabs(mask[2] - 1) < 1e-12);
  CHECK(mask[3] == 0.0);
}

}  // namespace

int main() {
  test_ranked_top_n_bits();
  test_relaxation_levels();
  test_pattern_levels();
  return TEST_MAIN_RESULT();
}
