// CUDA kernels of the Gumbel N:M sampling ops (schemas in csrc/ops.cpp). One thread per group,
// as on the CPU (csrc/cpu/gumbel.cpp) and with the same per-group math (prunedm/gumbel.h) and
// noise (prunedm/philox.h, keyed by the element's flat index): the launch geometry does not
// change a single bit drawn. 2:4 (m = 4, and C(4, 2) = 6 patterns) gets compile-time sizes so
// a group lives in registers; other sizes take the generic path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "prunedm/gumbel.h"
#include "prunedm/philox.h"
#include "prunedm/sparse24.h"

namespace prunedm {

namespace {

constexpr int kThreads = 256;
// m and the number of patterns of 2:4, the sizes compiled into the fast path.
constexpr int kM24 = 4;
constexpr int kPatterns24 = 6;

template <typename T>
using ComputeOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ int64_t first_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// Blocks for a grid-stride loop over `work` groups: a few waves of the GPU at most.
int blocks_for(int64_t work) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t blocks_per_sm = std::max(1, props->maxThreadsPerMultiProcessor / kThreads);
  const int64_t resident = int64_t(props->multiProcessorCount) * blocks_per_sm;
  const int64_t needed = (work + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min(needed, 4 * resident)));
}

// gumbel_nm_sample ----------------------------------------------------------------------------
// kCap = 4: m is 4 (2:4 and 1:4, 3:4, ...); kCap = kMaxGroupSize: m is read from m_runtime.

template <typename scalar_t, int kCap>
__global__ void __launch_bounds__(kThreads)
    gumbel_nm_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t groups, int n,
                     int m_runtime, double tau, bool hard, uint64_t seed, uint64_t offset) {
  using T = ComputeOf<scalar_t>;
  const int m = kCap == kM24 ? kM24 : m_runtime;
  const T tau_c = T(tau);
  PhiloxStream stream(seed, offset);
  T keys[kCap], noise[kCap], soft[kCap];
  for (int64_t g = first_index(); g < groups; g += grid_stride()) {
    const int64_t base = g * m;
    for (int i = 0; i < m; ++i) {
      noise[i] = gumbel_noise<T>(stream, uint64_t(base + i));
      keys[i] = T(src[base + i]) + noise[i];
    }
    if (hard) {
      const uint64_t kept = ranked_top_n_bits(keys, noise, n, m);
      for (int i = 0; i < m; ++i) dst[base + i] = scalar_t(T((kept >> i) & 1u));
    } else {
      relaxed_top_n_levels<T, kCap>(keys, noise, n, m, tau_c, soft);
      for (int i = 0; i < m; ++i) dst[base + i] = scalar_t(soft[i]);
    }
  }
}

template <typename scalar_t, int kCap>
__global__ void __launch_bounds__(kThreads)
    gumbel_nm_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ src,
                              scalar_t* __restrict__ dst, int64_t groups, int n, int m_runtime, double tau,
                              uint64_t seed, uint64_t offset) {
  using T = ComputeOf<scalar_t>;
  const int m = kCap == kM24 ? kM24 : m_runtime;
  const T tau_c = T(tau);
  PhiloxStream stream(seed, offset);
  T keys[kCap], noise[kCap], g[kCap], grad_keys[kCap];
  for (int64_t group = first_index(); group < groups; group += grid_stride()) {
    const int64_t base = group * m;
    for (int i = 0; i < m; ++i) {
      noise[i] = gumbel_noise<T>(stream, uint64_t(base + i));
      keys[i] = T(src[base + i]) + noise[i];
      g[i] = T(grad[base + i]);
    }
    relaxed_top_n_levels_backward<T, kCap>(keys, noise, g, n, m, tau_c, grad_keys);
    for (int i = 0; i < m; ++i) dst[base + i] = scalar_t(grad_keys[i]);
  }
}

at::Tensor gumbel_nm_sample_cuda(const at::Tensor& logits, int64_t n, int64_t m, double tau, bool hard, int64_t seed,
                                 int64_t offset) {
  check_gumbel_nm_args("gumbel_nm_sample", logits, n, m, tau);
  check_gumbel_offset("gumbel_nm_sample", offset);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t groups = x.numel() / m;
  if (groups == 0) return out;
  const int blocks = blocks_for(groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_nm_sample_cuda", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (m == kM24) {
      gumbel_nm_kernel<scalar_t, kM24>
          <<<blocks, kThreads, 0, stream>>>(src, dst, groups, int(n), kM24, tau, hard,
              uint64_t(seed), uint64_t(offset));
    } else {
      gumbel_nm_kernel<scalar_t, kMaxGroupSize>
          <<<blocks, kThreads, 0, stream>>>(src, dst, groups, int(n), int(m), tau, hard,
              uint64_t(seed), uint64_t(offset));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gumbel_nm_sample_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, int64_t n, int64_t m,
                                          double tau, int64_t seed, int64_t offset) {
  check_gumbel_nm_args("gumbel_nm_sample_backward", logits, n, m, tau);
  check_gumbel_offset("gumbel_nm_sample_backward", offset);
  check_gumbel_grad("gumbel_nm_sample_backward", grad, logits, logits.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor gy = grad.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t groups = x.numel() / m;
  if (groups == 0) return out;
  const int blocks = blocks_for(groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_nm_sample_backward_cuda", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* g = gy.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (m == kM24) {
      gumbel_nm_backward_kernel<scalar_t, kM24>
          <<<blocks, kThreads, 0, stream>>>(g, src, dst, groups, int(n), kM24, tau, uint64_t(seed), uint64_t(offset));
    } else {
      gumbel_nm_backward_kernel<scalar_t, kMaxGroupSize>
          <<<blocks, kThreads, 0, stream>>>(g, src, dst, groups, int(n), int(m), tau, uint64_t(seed), uint64_t(offset));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// gumbel_pattern_sample -----------------------------------------------------------------------
// kP = 6 (m = 4, n = 2): a group's six keys are computed once and kept in registers.
// kP = 0: any C(m, n); every pass over the patterns recomputes the keys (no per-thread arrays).

template <typename scalar_t, int kP>
__global__ void __launch_bounds__(kThreads)
    gumbel_pattern_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t groups,
                          int64_t patterns_runtime, int n, int m_runtime, double tau, bool hard, uint64_t seed,
                          uint64_t offset) {
  using T = ComputeOf<scalar_t>;
  const int64_t patterns = kP > 0 ? kP : patterns_runtime;
  const int m = kP > 0 ? kM24 : m_runtime;
  // Hard patterns rank the keys themselves; the relaxation's scores are keys / tau.
  const T scale = hard ? T(1) : T(tau);
  PhiloxStream stream(seed, offset);
  T cached[kP > 0 ? kP : 1], cached_noise[kP > 0 ? kP : 1];
  T mask[kP > 0 ? kM24 : kMaxPatternGroupSize];
  for (int64_t g = first_index(); g < groups; g += grid_stride()) {
    const int64_t base = g * patterns;
    if constexpr (kP > 0) {
#pragma unroll
      for (int p = 0; p < kP; ++p) {
        cached_noise[p] = gumbel_noise<T>(stream, uint64_t(base + p));
        cached[p] = (T(src[base + p]) + cached_noise[p]) / scale;
        cached_noise[p] /= scale;
      }
    }
    const auto key = [&](int64_t p) -> T {
      if constexpr (kP > 0) {
        return cached[p];
      } else {
        return (T(src[base + p]) + gumbel_noise<T>(stream, uint64_t(base + p))) / scale;
      }
    };
    const auto noise_of = [&](int64_t p) -> T {
      if constexpr (kP > 0) {
        return cached_noise[p];
      } else {
        return gumbel_noise<T>(stream, uint64_t(base + p)) / scale;
      }
    };
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

template <typename scalar_t, int kP>
__global__ void __launch_bounds__(kThreads)
    gumbel_pattern_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ src,
                                   scalar_t* __restrict__ dst, int64_t groups, int64_t patterns_runtime, int n,
                                   int m_runtime, double tau, uint64_t seed, uint64_t offset) {
  using T = ComputeOf<scalar_t>;
  const int64_t patterns = kP > 0 ? kP : patterns_runtime;
  const int m = kP > 0 ? kM24 : m_runtime;
  const T tau_c = T(tau);
  PhiloxStream stream(seed, offset);
  T cached[kP > 0 ? kP : 1], cached_noise[kP > 0 ? kP : 1];
  T grad_mask[kP > 0 ? kM24 : kMaxPatternGroupSize];
  for (int64_t g = first_index(); g < groups; g += grid_stride()) {
    const int64_t base = g * patterns;
    if constexpr (kP > 0) {
#pragma unroll
      for (int p = 0; p < kP; ++p) {
        cached_noise[p] = gumbel_noise<T>(stream, uint64_t(base + p));
        cached[p] = (T(src[base + p]) + cached_noise[p]) / tau_c;
        cached_noise[p] /= tau_c;
      }
    }
    const auto score = [&](int64_t p) -> T {
      if constexpr (kP > 0) {
        return cached[p];
      } else {
        return (T(src[base + p]) + gumbel_noise<T>(stream, uint64_t(base + p))) / tau_c;
      }
    };
    const auto noise_of = [&](int64_t p) -> T {
      if constexpr (kP > 0) {
        return cached_noise[p];
      } else {
        return gumbel_noise<T>(stream, uint64_t(base + p)) / tau_c;
      }
    };
    for (int i = 0; i < m; ++i) grad_mask[i] = T(grad[g * m + i]);
    // Infinite logits carry no gradient: with an infinite top level every pattern's is 0.
    const int top = top_level<T>(score, patterns);
    const auto competing = [&](int64_t p) { return level_value<T>(score, noise_of, top, p); };
    soft_pattern_mask_backward<T>(competing, patterns, n, m, grad_mask, [&](int64_t p, T value) {
      dst[base + p] = scalar_t(top == 0 ? value / tau_c : T(0));
    });
  }
}

at::Tensor gumbel_pattern_sample_cuda(const at::Tensor& pattern_logits, int64_t n, int64_t m, double tau, bool hard,
                                      int64_t seed, int64_t offset) {
  check_gumbel_pattern_args("gumbel_pattern_sample", pattern_logits, n, m, tau);
  check_gumbel_offset("gumbel_pattern_sample", offset);
  const c10::cuda::CUDAGuard guard(pattern_logits.device());
  const at::Tensor x = pattern_logits.contiguous();
  const int64_t patterns = x.size(-1), groups = x.numel() / patterns;
  at::Tensor out = at::empty(pattern_mask_shape(x, m), x.options());
  if (groups == 0) return out;
  const int blocks = blocks_for(groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_pattern_sample_cuda", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (m == kM24 && n == 2) {
      gumbel_pattern_kernel<scalar_t, kPatterns24>
          <<<blocks, kThreads, 0, stream>>>(src, dst, groups, kPatterns24, 2, kM24, tau, hard,
              uint64_t(seed), uint64_t(offset));
    } else {
      gumbel_pattern_kernel<scalar_t, 0>
          <<<blocks, kThreads, 0, stream>>>(src, dst, groups, patterns, int(n), int(m), tau, hard,
              uint64_t(seed), uint64_t(offset));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gumbel_pattern_sample_backward_cuda(const at::Tensor& grad, const at::Tensor& pattern_logits, int64_t n,
                                               int64_t m, double tau, int64_t seed, int64_t offset) {
  check_gumbel_pattern_args("gumbel_pattern_sample_backward", pattern_logits, n, m, tau);
  check_gumbel_offset("gumbel_pattern_sample_backward", offset);
  check_gumbel_grad("gumbel_pattern_sample_backward", grad, pattern_logits, pattern_mask_shape(pattern_logits, m));
  const c10::cuda::CUDAGuard guard(pattern_logits.device());
  const at::Tensor x = pattern_logits.contiguous();
  const at::Tensor gy = grad.contiguous();
  const int64_t patterns = x.size(-1), groups = x.numel() / patterns;
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (groups == 0) return out;
  const int blocks = blocks_for(groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_pattern_sample_backward_cuda", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* g = gy.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (m == kM24 && n == 2) {
      gumbel_pattern_backward_kernel<scalar_t, kPatterns24>
          <<<blocks, kThreads, 0, stream>>>(g, src, dst, groups, kPatterns24, 2, kM24, tau,
              uint64_t(seed), uint64_t(offset));
    } else {
      gumbel_pattern_backward_kernel<scalar_t, 0>
          <<<blocks, kThreads, 0, stream>>>(g, src, dst, groups, patterns, int(n), int(m), tau,
              uint64_t(seed), uint64_t(offset));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunedm, CUDA, m) {
  m.impl("gumbel_nm_sample", &gumbel_nm_sample_cuda);
  m.impl("gumbel_nm_sample_backward", &gumbel_nm_sample_backward_cuda);
  m.impl("gumbel_pattern_sample", &gumbel_pattern_sample_cuda);
  m.impl("gumbel_pattern_sample_backward", &gumbel_pattern_sample_backward_cuda);
}

}  // namespace prunedm
