// Per-group math of the Gumbel N:M sampling ops (gumbel_nm_sample, gumbel_pattern_sample): the
// relaxed top-n and its backward, the softmax over candidate patterns and its backward, and the
// enumeration of the C(m, n) patterns in lexicographic order. Torch-free: the CPU kernels, the
// CUDA kernels and the C++ unit tests share it. prunedm/ops/reference.py states the same math
// with torch ops; keep the two in step.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "prunedm/philox.h"
#include "prunedm/sparse24.h"

namespace prunedm {

// Largest m of gumbel_pattern_sample: C(16, 8) = 12870 candidate patterns per group.
constexpr int kMaxPatternGroupSize = 16;

// Math of the compute type (float or double) on host and device.
PRUNEDM_HD float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
PRUNEDM_HD double exp_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
PRUNEDM_HD float log_of(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  return std::log(x);
#endif
}
PRUNEDM_HD double log_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
template <typename T>
PRUNEDM_HD T negative_infinity() {
  return -T(INFINITY);
}

// Gumbel noise of element `index` in the compute type: computed in double, rounded once.
template <typename T>
PRUNEDM_HD T gumbel_noise(PhiloxStream& stream, uint64_t index) {
  return T(gumbel_from_bits(stream.bits(index)));
}

// Index of the first largest z (NaN counts as largest, as in top_n_bits).
template <typename T>
PRUNEDM_HD int first_argmax(const T* z, int m) {
  int best = 0;
  for (int i = 1; i < m; ++i)
    if (key_greater(z[i], z[best])) best = i;
  return best;
}

// One softmax of the relaxation, a = softmax(z) with z = alpha / tau, and what its suppression
// step and backward reuse: e_i = exp(z_i - max z) (e_top = 1), their sum, and the first argmax.
template <typename T, int kCap>
struct SoftmaxStep {
  T z[kCap], e[kCap], a[kCap];
  T sum;
  int top;

  PRUNEDM_HD void compute(const T* alpha, int m, T tau) {
    for (int i = 0; i < m; ++i) z[i] = alpha[i] / tau;
    top = first_argmax(z, m);
    sum = T(0);
    for (int i = 0; i < m; ++i) {
      e[i] = exp_of(z[i] - z[top]);
      sum += e[i];
    }
    for (int i = 0; i < m; ++i) a[i] = e[i] / sum;
  }

  // log sum_{j != top} e_j, and q_j = e_j / sum_{j != top} e_j (q_top = 0): the softmax of the
  // entries other than top. When those e_j underflow (z_top leads by ~87 in float), the sum is
  // recomputed relative to the largest of them, so both stay exact.
  PRUNEDM_HD T log_rest(int m, T* q) const {
    constexpr T kSafe = std::is_same_v<T, float> ? T(1e-30) : T(1e-290);
    T rest = T(0);
    for (int j = 0; j < m; ++j)
      if (j != top) rest += e[j];
    if (rest >= kSafe) {
      for (int j = 0; j < m; ++j) q[j] = j == top ? T(0) : e[j] / rest;
      return log_of(rest);
    }
    T rest_max = negative_infinity<T>();
    for (int j = 0; j < m; ++j)
      if (j != top && z[j] > rest_max) rest_max = z[j];
    if (rest_max == negative_infinity<T>()) {  // no other entry can be chosen
      for (int j = 0; j < m; ++j) q[j] = T(0);
      return negative_infinity<T>();
    }
    rest = T(0);
    for (int j = 0; j < m; ++j)
      if (j != top) rest += exp_of(z[j] - rest_max);
    for (int j = 0; j < m; ++j) q[j] = j == top ? T(0) : exp_of(z[j] - rest_max) / rest;
    return rest_max - z[top] + log_of(rest);
  }

  // alpha <- alpha + log(1 - a). With S = sum e: 1 - a_j = (S - e_j) / S for j != top (S - e_j >= 1,
  // no cancellation), and 1 - a_top = sum_{j != top} e_j / S, exact even where a_top rounds to 1.
  PRUNEDM_HD void suppress(T* alpha, int m) const {
    T q[kCap];
    const T log_sum = log_of(sum);
    for (int j = 0; j < m; ++j)
      if (j != top) alpha[j] += log_of(sum - e[j]) - log_sum;
    alpha[top] += log_rest(m, q) - log_sum;
  }
};

// The relaxed top-n of one group's keys (logits + noise): Xie & Ermon's (2019) successive
// softmaxes. With alpha_1 = keys,
//   a_k = softmax(alpha_k / tau),  alpha_{k+1} = alpha_k + log(1 - a_k),  soft = a_1 + ... + a_n.
// soft sums to n; as tau -> 0 it tends to the hard top-n of the keys (each chosen element's
// alpha drops by about (its lead over the runner-up) / tau). kCap >= m bounds the scratch
// arrays (a compile-time 4 keeps a 2:4 group in registers).
template <typename T, int kCap>
PRUNEDM_HD void relaxed_top_n(const T* keys, int n, int m, T tau, T* soft) {
  T alpha[kCap];
  SoftmaxStep<T, kCap> step;
  for (int i = 0; i < m; ++i) {
    alpha[i] = keys[i];
    soft[i] = T(0);
  }
  for (int k = 0; k < n; ++k) {
    step.compute(alpha, m, tau);
    for (int i = 0; i < m; ++i) soft[i] += step.a[i];
    if (k + 1 < n) step.suppress(alpha, m);
  }
}

// Gradient of relaxed_top_n with respect to the keys, given the gradient of soft. Reverse sweep
// over the n steps; each step's alpha_k is recomputed from the keys (O(n^2 m) work, O(m)
// memory), so nothing but the keys is needed. With g the gradient of alpha_{k+1}:
//   g_k = g + J_k^T g / tau + a_k * (grad - <a_k, grad>) / tau,
// where J_k is the Jacobian of log(1 - softmax(z)) at z = alpha_k / tau: with c_j =
// -g_j a_j / (1 - a_j) off top (c_top = 0) and q = softmax of z without top,
//   (J_k^T g)_j = c_j - a_j sum(c) + g_top (q_j - a_j).
template <typename T, int kCap>
PRUNEDM_HD void relaxed_top_n_backward(const T* keys, const T* grad, int n, int m, T tau, T* grad_keys) {
  T alpha[kCap], g[kCap], q[kCap];
  SoftmaxStep<T, kCap> step;
  for (int i = 0; i < m; ++i) g[i] = T(0);
  for (int k = n - 1; k >= 0; --k) {
    for (int i = 0; i < m; ++i) alpha[i] = keys[i];
    for (int done = 0; done < k; ++done) {
      step.compute(alpha, m, tau);
      step.suppress(alpha, m);
    }
    step.compute(alpha, m, tau);
    const T* a = step.a;
    T a_dot_grad = T(0);
    for (int i = 0; i < m; ++i) a_dot_grad += a[i] * grad[i];
    if (k + 1 < n) {
      step.log_rest(m, q);
      // a_j / (1 - a_j) = e_j / (S - e_j) off top.
      T c[kCap];
      T c_sum = T(0);
      for (int j = 0; j < m; ++j) {
        c[j] = j == step.top ? T(0) : -g[j] * step.e[j] / (step.sum - step.e[j]);
        c_sum += c[j];
      }
      const T g_top = g[step.top];
      for (int j = 0; j < m; ++j) g[j] += (c[j] - a[j] * c_sum + g_top * (q[j] - a[j])) / tau;
    }
    for (int i = 0; i < m; ++i) g[i] += a[i] * (grad[i] - a_dot_grad) / tau;
  }
  for (int i = 0; i < m; ++i) grad_keys[i] = g[i];
}

// Infinite keys ---------------------------------------------------------------------------------
// The rule every backend follows (prunedm/ops/reference.py states it with torch ops): +inf ranks
// above every finite key and -inf below; among equal infinite keys the noise alone decides (the
// limit of equal logits going to +-inf). NaN never gets here: the public ops refuse it.

// 1 for +inf, -1 for -inf, 0 for a finite value.
template <typename T>
PRUNEDM_HD int infinity_level(T v) {
  return v == -negative_infinity<T>() ? 1 : (v == negative_infinity<T>() ? -1 : 0);
}

// Bit i is set when element i is among the first n of the group ordered by level, then by rank key
// (the key itself when finite, its noise when infinite), ties to the lower index.
template <typename T>
PRUNEDM_HD uint64_t ranked_top_n_bits(const T* keys, const T* noise, int n, int m) {
  uint64_t kept = 0;
  for (int i = 0; i < m; ++i) {
    const int level_i = infinity_level(keys[i]);
    const T key_i = level_i == 0 ? keys[i] : noise[i];
    int rank = 0;
    for (int j = 0; j < m; ++j) {
      const int level_j = infinity_level(keys[j]);
      const T key_j = level_j == 0 ? keys[j] : noise[j];
      rank += int(level_j > level_i || (level_j == level_i && (key_j > key_i || (key_j == key_i && j < i))));
    }
    if (rank < n) kept |= uint64_t{1} << i;
  }
  return kept;
}

// How gumbel_nm_sample's relaxation treats a group with infinite keys / tau: in the order +inf,
// finite, -inf, the levels wholly before the n-th place are pinned at 1, the level holding it
// (`active`) takes the relaxed top-`steps` of its keys (noise for an infinite one), later ones 0. steps never exceeds the active
// level's size, so every softmax of the relaxation has a finite entry.
template <typename T, int kCap>
struct LevelPlan {
  int level[kCap];
  T active_keys[kCap];
  int active;
  int steps;

  PRUNEDM_HD void compute(const T* keys, const T* noise, int n, int m, T tau) {
    int above = 0, finite = 0;
    for (int i = 0; i < m; ++i) {
      level[i] = infinity_level(keys[i] / tau);
      above += int(level[i] == 1);
      finite += int(level[i] == 0);
    }
    active = above >= n ? 1 : (above + finite >= n ? 0 : -1);
    steps = active == 1 ? n : (active == 0 ? n - above : n - above - finite);
    for (int i = 0; i < m; ++i)
      active_keys[i] = level[i] != active ? negative_infinity<T>() : (active == 0 ? keys[i] : noise[i]);
  }
};

// relaxed_top_n of keys that may be infinite, by the rule of LevelPlan.
template <typename T, int kCap>
PRUNEDM_HD void relaxed_top_n_levels(const T* keys, const T* noise, int n, int m, T tau, T* soft) {
  LevelPlan<T, kCap> plan;
  plan.compute(keys, noise, n, m, tau);
  relaxed_top_n<T, kCap>(plan.active_keys, plan.steps, m, tau, soft);
  for (int i = 0; i < m; ++i)
    if (plan.level[i] > plan.active) soft[i] += T(1);
}

// Its gradient: the relaxation's where the active level is finite, 0 at every infinite key.
template <typename T, int kCap>
PRUNEDM_HD void relaxed_top_n_levels_backward(const T* keys, const T* noise, const T* grad, int n, int m, T tau,
                                              T* grad_keys) {
  LevelPlan<T, kCap> plan;
  plan.compute(keys, noise, n, m, tau);
  for (int i = 0; i < m; ++i) grad_keys[i] = T(0);
  if (plan.active != 0) return;
  relaxed_top_n_backward<T, kCap>(plan.active_keys, grad, plan.steps, m, tau, grad_keys);
  for (int i = 0; i < m; ++i)
    if (plan.level[i] != 0) grad_keys[i] = T(0);
}

// Candidate patterns of gumbel_pattern_sample: the n-subsets of {0..m-1} as bit masks (bit i =
// element i kept), in lexicographic order of their sorted indices ({0,1}, {0,2}, {0,3}, {1,2},
// {1,3}, {2,3} for 2:4), the order pattern logits are laid out in.
PRUNEDM_HD uint64_t first_combination(int n) { return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1; }

// The subset after `bits` in that order, or 0 after the last one: the highest element that can
// move up by one does, and the elements above it close up right behind it.
PRUNEDM_HD uint64_t next_combination(uint64_t bits, int m) {
  int above = 0;  // set bits above position i
  for (int i = m - 2; i >= 0; --i) {
    const bool set = (bits >> i) & 1u, next_set = (bits >> (i + 1)) & 1u;
    if (next_set) ++above;
    if (set && !next_set) {
      uint64_t result = bits & ((uint64_t{1} << i) - 1);  // the elements below i stay
      for (int j = 0; j <= above; ++j) result |= uint64_t{1} << (i + 1 + j);
      return result;
    }
  }
  return 0;
}

// C(m, n), the number of candidate patterns (m <= 64; exact while it fits in 63 bits).
PRUNEDM_HD int64_t binomial(int m, int n) {
  if (n < 0 || n > m) return 0;
  if (n > m - n) n = m - n;
  int64_t result = 1;
  for (int i = 1; i <= n; ++i) result = result * (m - n + i) / i;
  return result;
}

// Softmax statistics over a group's P pattern scores z_p = key(p) (the keys divided by tau):
// the max and sum_p exp(z_p - max). key(p) is recomputed on every pass, so a group needs no
// storage proportional to P.
template <typename T>
struct PatternSoftmax {
  T max;
  T sum;
};

template <typename T, typename ScoreFn>
PRUNEDM_HD PatternSoftmax<T> pattern_softmax(ScoreFn score, int64_t num_patterns) {
  T z_max = score(0);
  for (int64_t p = 1; p < num_patterns; ++p) {
    const T z = score(p);
    if (key_greater(z, z_max)) z_max = z;
  }
  T sum = T(0);
  for (int64_t p = 0; p < num_patterns; ++p) sum += exp_of(score(p) - z_max);
  return {z_max, sum};
}

// The hard pattern of a group: the bits of the first pattern with the largest key.
template <typename T, typename KeyFn>
PRUNEDM_HD uint64_t argmax_pattern(KeyFn key, int64_t num_patterns, int n, int m) {
  uint64_t bits = first_combination(n), best_bits = bits;
  T best = key(0);
  for (int64_t p = 1; p < num_patterns; ++p) {
    bits = next_combination(bits, m);
    const T k = key(p);
    if (key_greater(k, best)) {
      best = k;
      best_bits = bits;
    }
  }
  return best_bits;
}

// mask_i = sum_p softmax(z)_p [i in pattern p], for i < m.
template <typename T, typename ScoreFn>
PRUNEDM_HD void soft_pattern_mask(ScoreFn score, int64_t num_patterns, int n, int m, T* mask) {
  const PatternSoftmax<T> s = pattern_softmax<T>(score, num_patterns);
  for (int i = 0; i < m; ++i) mask[i] = T(0);
  uint64_t bits = first_combination(n);
  for (int64_t p = 0; p < num_patterns; ++p, bits = next_combination(bits, m)) {
    const T y = exp_of(score(p) - s.max) / s.sum;
    for (int i = 0; i < m; ++i)
      if ((bits >> i) & 1u) mask[i] += y;
  }
}

// Gradient of soft_pattern_mask with respect to the scores z, given the mask's gradient
// grad_mask[0..m): with gy_p = sum_{i in p} grad_mask_i, grad_z_p = y_p (gy_p - <y, gy>).
// write(p, value) receives each pattern's gradient.
template <typename T, typename ScoreFn, typename WriteFn>
PRUNEDM_HD void soft_pattern_mask_backward(ScoreFn score, int64_t num_patterns, int n, int m, const T* grad_mask,
                                           WriteFn write) {
  const PatternSoftmax<T> s = pattern_softmax<T>(score, num_patterns);
  const auto pattern_grad = [&](uint64_t bits) {
    T g = T(0);
    for (int i = 0; i < m; ++i)
      if ((bits >> i) & 1u) g += grad_mask[i];
    return g;
  };
  T y_dot_gy = T(0);
  uint64_t bits = first_combination(n);
  for (int64_t p = 0; p < num_patterns; ++p, bits = next_combination(bits, m))
    y_dot_gy += exp_of(score(p) - s.max) / s.sum * pattern_grad(bits);
  bits = first_combination(n);
  for (int64_t p = 0; p < num_patterns; ++p, bits = next_combination(bits, m)) {
    const T y = exp_of(score(p) - s.max) / s.sum;
    write(p, y * (pattern_grad(bits) - y_dot_gy));
  }
}

// Patterns with infinite keys: only the highest level present competes, an infinite pattern by its
// noise. value(p) is the key (or score) that decides the level, noise(p) the same scale's noise.
template <typename T, typename ValueFn>
PRUNEDM_HD int top_level(ValueFn value, int64_t num_patterns) {
  int top = -1;
  for (int64_t p = 0; p < num_patterns && top < 1; ++p) {
    const int level = infinity_level(value(p));
    if (level > top) top = level;
  }
  return top;
}

// The competing value of pattern p at level `top` (-inf for patterns below it).
template <typename T, typename ValueFn, typename NoiseFn>
PRUNEDM_HD T level_value(ValueFn value, NoiseFn noise, int top, int64_t p) {
  const T v = value(p);
  if (infinity_level(v) != top) return negative_infinity<T>();
  return top == 0 ? v : noise(p);
}

}  // namespace prunedm
