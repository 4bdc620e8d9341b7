// CPU kernels of the Gumbel N:M sampling ops (schemas in csrc/ops.cpp), and the argument checks
// the CUDA kernels share. Chunk by chunk: Philox noise for the chunk's elements, then per group the
// hard top-n / argmax pattern or the relaxation; the backward kernels recompute noise and
// relaxation from (logits, seed) rather than saving them. The per-group math is prunedm/gumbel.h's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "prunedm/gumbel.h"
#include "prunedm/philox.h"
#include "prunedm/sparse24.h"

namespace prunedm {

// The compute type of a logits dtype: double for double, float for the rest.
template <typename T>
using gumbel_compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

namespace {

// Elements whose noise is drawn at once: the uniforms are written to a buffer and the two logs run
// as torch's vectorized log over it (many times faster than scalar libm calls), then each group
// reads its noise back from the buffer, still in cache.
constexpr int64_t kNoiseChunk = 8192;

// buffer[i] = Gumbel noise of element base + i, in double: -log(-log(u)), u from Philox (bits is
// scratch for count words).
void fill_gumbel_noise(uint64_t seed, int64_t base, int64_t count, uint32_t* bits, double* buffer) {
  philox_bits_range(seed, uint64_t(base), count, bits);
  for (int64_t i = 0; i < count; ++i) buffer[i] = uniform_open01(bits[i]);
  at::Tensor noise = at::from_blob(buffer, {count}, at::TensorOptions().dtype(at::kDouble));
  noise.log_().neg_().log_().neg_();
}

// Runs fn(first_group, end_group, noise) over all groups in parallel, chunk by chunk, with the
// noise of the chunk's elements (group g's element i at noise[(g - first_group) * group_size + i]),
// drawn at flat index offset + g * group_size + i.
template <typename Fn>
void for_each_chunk(int64_t groups, int64_t group_size, uint64_t seed, int64_t offset, const Fn& fn) {
  const int64_t chunk_groups = std::max<int64_t>(1, kNoiseChunk / group_size);
  at::parallel_for(0, groups, chunk_groups, [&](int64_t begin, int64_t end) {
    const size_t elements = static_cast<size_t>(std::min(end - begin, chunk_groups) * group_size);
    std::vector<double> noise(elements);
    std::vector<uint32_t> bits(elements);
    for (int64_t first = begin; first < end; first += chunk_groups) {
      const int64_t last = std::min(end, first + chunk_groups);
      fill_gumbel_noise(seed, offset + first * group_size, (last - first) * group_size, bits.data(), noise.data());
      fn(first, last, noise.data());
    }
  });
}

// gumbel_nm_sample ----------------------------------------------------------------------------

template <typename scalar_t, int kCap>
void gumbel_nm_groups(const scalar_t* src, scalar_t* dst, const double* noise, int64_t first, int64_t last, int n,
                      int m, double tau, bool hard) {
  using T = gumbel_compute_t<scalar_t>;
  T keys[kCap], noise_c[kCap], soft[kCap];
  const T tau_c = T(tau);
  for (int64_t g = first; g < last; ++g) {
    const int64_t base = g * m;
    const double* group_noise = noise + (g - first) * m;
    for (int i = 0; i < m; ++i) {
      noise_c[i] = T(group_noise[i]);
      keys[i] = T(src[base + i]) + noise_c[i];
    }
    if (hard) {
      const uint64_t kept = ranked_top_n_bits(keys, noise_c, n, m);
      for (int i = 0; i < m; ++i) dst[base + i] = scalar_t(T((kept >> i) & 1u));
    } else {
      relaxed_top_n_levels<T, kCap>(keys, noise_c, n, m, tau_c, soft);
      for (int i = 0; i < m; ++i) dst[base + i] = scalar_t(soft[i]);
    }
  }
}

at::Tensor gumbel_nm_sample_cpu(const at::Tensor& logits, int64_t n, int64_t m, double tau, bool hard, int64_t seed,
                                int64_t offset) {
  check_gumbel_nm_args("gumbel_nm_sample", logits, n, m, tau);
  check_gumbel_offset("gumbel_nm_sample", offset);
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t groups = x.numel() / m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_nm_sample_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_chunk(groups, m, uint64_t(seed), offset, [&](int64_t first, int64_t last, const double* noise) {
      if (m == 4) {
        gumbel_nm_groups<scalar_t, 4>(src, dst, noise, first, last, int(n), 4, tau, hard);
      } else {
        gumbel_nm_groups<scalar_t, kMaxGroupSize>(src, dst, noise, first, last, int(n), int(m), tau, hard);
      }
    });
  });
  return out;
}

template <typename scalar_t, int kCap>
void gumbel_nm_backward_groups(const scalar_t* grad, const scalar_t* src, scalar_t* dst, const double* noise,
                               int64_t first, int64_t last, int n, int m, double tau) {
  using T = gumbel_compute_t<scalar_t>;
  T keys[kCap], noise_c[kCap], g[kCap], grad_keys[kCap];
  const T tau_c = T(tau);
  for (int64_t group = first; group < last; ++group) {
    const int64_t base = group * m;
    const double* group_noise = noise + (group - first) * m;
    for (int i = 0; i < m; ++i) {
      noise_c[i] = T(group_noise[i]);
      keys[i] = T(src[base + i]) + noise_c[i];
      g[i] = T(grad[base + i]);
    }
    relaxed_top_n_levels_backward<T, kCap>(keys, noise_c, g, n, m, tau_c, grad_keys);
    for (int i = 0; i < m; ++i) dst[base + i] = scalar_t(grad_keys[i]);
  }
}

at::Tensor gumbel_nm_sample_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t n, int64_t m,
                                         double tau, int64_t seed, int64_t offset) {
  check_gumbel_nm_args("gumbel_nm_sample_backward", logits, n, m, tau);
  check_gumbel_offset("gumbel_nm_sample_backward", offset);
  check_gumbel_grad("gumbel_nm_sample_backward", grad, logits, logits.sizes());
  const at::Tensor x = logits.contiguous();
  const at::Tensor gy = grad.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t groups = x.numel() / m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_nm_sample_backward_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* g = gy.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_chunk(groups, m, uint64_t(seed), offset, [&](int64_t first, int64_t last, const double* noise) {
      if (m == 4) {
        gumbel_nm_backward_groups<scalar_t, 4>(g, src, dst, noise, first, last, int(n), 4, tau);
      } else {
        gumbel_nm_backward_groups<scalar_t, kMaxGroupSize>(g, src, dst, noise, first, last, int(n), int(m), tau);
      }
    });
  });
  return out;
}

// gumbel_pattern_sample -----------------------------------------------------------------------

template <typename scalar_t>
void gumbel_pattern_groups(const scalar_t* src, scalar_t* dst, const double* noise, int64_t first, int64_t last,
                           int64_t patterns, int n, int m, double tau, bool hard) {
  using T = gumbel_compute_t<scalar_t>;
  // Hard patterns rank the keys themselves; the relaxation's scores are keys / tau.
  const T scale = hard ? T(1) : T(tau);
  std::vector<T> keys(static_cast<size_t>(patterns)), noises(static_cast<size_t>(patterns));
  const auto key = [&](int64_t p) { return keys[size_t(p)]; };
  const auto noise_of = [&](int64_t p) { return noises[size_t(p)]; };
  T mask[kMaxPatternGroupSize];
  for (int64_t g = first; g < last; ++g) {
    const double* group_noise = noise + (g - first) * patterns;
    for (int64_t p = 0; p < patterns; ++p) {
      keys[size_t(p)] = (T(src[g * patterns + p]) + T(group_noise[p])) / scale;
      noises[size_t(p)] = T(group_noise[p]) / scale;
    }
    const int top = top_level<T>(key, patterns);
    const auto competing = [&](int64_t p) { return level_value<T>(key, noise_of, top, p); };
    if (hard) {
      const uint64_t bits = argmax_pattern<T>(competing, patterns, n, m);
      for (int i = 0; i < m; ++i) mask[i] = T((bits >> i) & 1u);
    } else {
      soft_pattern_mask<T>(competing, patterns, n, m, mask);
    }
    for (int i = 0; i < m; ++i) dst[g * m + i] = scalar_t(mask[i]);
  }
}

at::Tensor gumbel_pattern_sample_cpu(const at::Tensor& pattern_logits, int64_t n, int64_t m, double tau, bool hard,
                                     int64_t seed, int64_t offset) {
  check_gumbel_pattern_args("gumbel_pattern_sample", pattern_logits, n, m, tau);
  check_gumbel_offset("gumbel_pattern_sample", offset);
  const at::Tensor x = pattern_logits.contiguous();
  const int64_t patterns = x.size(-1), groups = x.numel() / patterns;
  at::Tensor out = at::empty(pattern_mask_shape(x, m), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_pattern_sample_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_chunk(groups, patterns, uint64_t(seed), offset, [&](int64_t first, int64_t last, const double* noise) {
      gumbel_pattern_groups(src, dst, noise, first, last, patterns, int(n), int(m), tau, hard);
    });
  });
  return out;
}

template <typename scalar_t>
void gumbel_pattern_backward_groups(const scalar_t* grad, const scalar_t* src, scalar_t* dst, const double* noise,
                                    int64_t first, int64_t last, int64_t patterns, int n, int m, double tau) {
  using T = gumbel_compute_t<scalar_t>;
  const T tau_c = T(tau);
  std::vector<T> z(static_cast<size_t>(patterns)), noises(static_cast<size_t>(patterns));
  const auto score = [&](int64_t p) { return z[size_t(p)]; };
  const auto noise_of = [&](int64_t p) { return noises[size_t(p)]; };
  T grad_mask[kMaxPatternGroupSize];
  for (int64_t g = first; g < last; ++g) {
    const int64_t base = g * patterns;
    const double* group_noise = noise + (g - first) * patterns;
    for (int64_t p = 0; p < patterns; ++p) {
      z[size_t(p)] = (T(src[base + p]) + T(group_noise[p])) / tau_c;
      noises[size_t(p)] = T(group_noise[p]) / tau_c;
    }
    for (int i = 0; i < m; ++i) grad_mask[i] = T(grad[g * m + i]);
    // Infinite logits carry no gradient: with an infinite top level every pattern's is 0.
    const int top = top_level<T>(score, patterns);
    const auto competing = [&](int64_t p) { return level_value<T>(score, noise_of, top, p); };
    soft_pattern_mask_backward<T>(competing, patterns, n, m, grad_mask, [&](int64_t p, T value) {
      dst[base + p] = scalar_t(top == 0 ? value / tau_c : T(0));
    });
  }
}

at::Tensor gumbel_pattern_sample_backward_cpu(const at::Tensor& grad, const at::Tensor& pattern_logits, int64_t n,
                                              int64_t m, double tau, int64_t seed, int64_t offset) {
  check_gumbel_pattern_args("gumbel_pattern_sample_backward", pattern_logits, n, m, tau);
  check_gumbel_offset("gumbel_pattern_sample_backward", offset);
  check_gumbel_grad("gumbel_pattern_sample_backward", grad, pattern_logits, pattern_mask_shape(pattern_logits, m));
  const at::Tensor x = pattern_logits.contiguous();
  const at::Tensor gy = grad.contiguous();
  const int64_t patterns = x.size(-1), groups = x.numel() / patterns;
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_pattern_sample_backward_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* g = gy.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_chunk(groups, patterns, uint64_t(seed), offset, [&](int64_t first, int64_t last, const double* noise) {
      gumbel_pattern_backward_groups(g, src, dst, noise, first, last, patterns, int(n), int(m), tau);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunedm, CPU, m) {
  m.impl("gumbel_nm_sample", &gumbel_nm_sample_cpu);
  m.impl("gumbel_nm_sample_backward", &gumbel_nm_sample_backward_cpu);
  m.impl("gumbel_pattern_sample", &gumbel_pattern_sample_cpu);
  m.impl("gumbel_pattern_sample_backward", &gumbel_pattern_sample_backward_cpu);
}

}  // namespace prunedm
