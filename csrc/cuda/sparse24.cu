// CUDA kernels of the N:M mask and 2:4 compression ops (schemas in csrc/ops.cpp).
// They behave exactly as the CPU kernels in csrc/cpu/sparse24.cpp (same results, same errors):
// the per-group logic is the shared header's, only the parallel decomposition differs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/checks.h"
#include "prunedm/sparse24.h"

namespace prunedm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
static_assert(kThreads % kWarpSize == 0, "a block is made of whole warps");

// Device counters are int64 tensors updated with the unsigned 64-bit atomics.
static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counters are 64-bit");

// Keys nm_mask ranks, as on the CPU: double for double weights, float for the rest.
template <typename T>
using KeyOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float abs_key(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_key(double v) { return fabs(v); }

// "Non-zero" exactly as the CPU kernels test it: 16-bit floats through float (so -0.0 is zero and
// NaN is not), every other type natively.
template <typename T>
__device__ __forceinline__ bool is_nonzero(T v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    return static_cast<float>(v) != 0.f;
  } else {
    return v != T(0);
  }
}

template <typename T>
struct IsNonzero {
  __device__ __forceinline__ bool operator()(T v) const { return is_nonzero(v); }
};

// N values moved as one aligned block: the vectorised loads and stores of the 2:4 kernels
// (16 halfs = 32 bytes of dense row, 8 halfs = 16 bytes of packed values).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <bool kVectorized, typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* src) {
  if constexpr (kVectorized) {
    return *reinterpret_cast<const Vec<T, N>*>(src);
  } else {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.val[i] = src[i];
    return v;
  }
}

template <bool kVectorized, typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const Vec<T, N>& v) {
  if constexpr (kVectorized) {
    *reinterpret_cast<Vec<T, N>*>(dst) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = v.val[i];
  }
}

template <typename T, int N>
bool is_aligned_for_vec(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Vec<T, N>) == 0;
}

// Adds each thread's `local` into *counter: a warp-shuffle and shared-memory block reduction,
// then one atomic per block (none when the block counted nothing). Every thread of the block
// must call it, with blockDim.x == kThreads.
__device__ __forceinline__ void add_block_count(unsigned long long local, unsigned long long* counter) {
  __shared__ unsigned long long warp_sums[kThreads / kWarpSize];
  const unsigned lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) local += __shfl_down_sync(0xffffffffu, local, offset);
  if (lane == 0) warp_sums[warp] = local;
  __syncthreads();
  if (warp == 0) {
    local = lane < unsigned(kThreads / kWarpSize) ? warp_sums[lane] : 0ull;
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) local += __shfl_down_sync(0xffffffffu, local, offset);
    if (lane == 0 && local != 0) atomicAdd(counter, local);
  }
}

__device__ __forceinline__ int64_t first_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU a few times over,
// never more than the work needs.
int blocks_for(int64_t work) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t blocks_per_sm = std::max(1, props->maxThreadsPerMultiProcessor / kThreads);
  const int64_t resident = int64_t(props->multiProcessorCount) * blocks_per_sm;
  const int64_t needed = (work + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min(needed, 4 * resident)));
}

unsigned long long* counter_ptr(at::Tensor& counter) {
  return reinterpret_cast<unsigned long long*>(counter.mutable_data_ptr<int64_t>());
}

// ---------------------------------------------------------------------------------------------
// nm_mask: one thread per m-group. kM > 0 fixes m at compile time (keys stay in registers);
// kM == 0 reads it from `m_runtime`.

template <typename scalar_t, int kM>
__global__ void __launch_bounds__(kThreads)
    nm_mask_kernel(const scalar_t* __restrict__ src, bool* __restrict__ dst, int64_t groups, int n, int m_runtime) {
  using key_type = KeyOf<scalar_t>;
  const int m = kM > 0 ? kM : m_runtime;
  key_type keys[kM > 0 ? kM : kMaxGroupSize];
  for (int64_t g = first_index(); g < groups; g += grid_stride()) {
    const scalar_t* group = src + g * m;
    for (int i = 0; i < m; ++i) keys[i] = abs_key(static_cast<key_type>(group[i]));
    const uint64_t kept = top_n_bits(keys, n, m);
    bool* out = dst + g * m;
    for (int i = 0; i < m; ++i) out[i] = ((kept >> i) & 1u) != 0;
  }
}

at::Tensor nm_mask_cuda(const at::Tensor& weight, int64_t n, int64_t m) {
  check_nm_mask_args(weight, n, m);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  at::Tensor mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const int64_t groups = w.numel() / m;
  if (groups == 0) return mask;
  const int blocks = blocks_for(groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "nm_mask_cuda", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    bool* dst = mask.mutable_data_ptr<bool>();
    if (m == 4) {
      nm_mask_kernel<scalar_t, 4><<<blocks, kThreads, 0, stream>>>(src, dst, groups, int(n), 4);
    } else {
      nm_mask_kernel<scalar_t, 0><<<blocks, kThreads, 0, stream>>>(src, dst, groups, int(n), int(m));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

// ---------------------------------------------------------------------------------------------
// nm_violations: one thread per m-group, counts reduced per block into an int64 scalar.

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nm_violations_kernel(const scalar_t* __restrict__ src, int64_t groups,
                                                                 int n, int m, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t g = first_index(); g < groups; g += grid_stride()) {
    const scalar_t* group = src + g * m;
    int nonzeros = 0;
    for (int i = 0; i < m; ++i) nonzeros += is_nonzero(group[i]) ? 1 : 0;
    local += nonzeros > n ? 1u : 0u;
  }
  add_block_count(local, count);
}

at::Tensor nm_violations_cuda(const at::Tensor& t, int64_t n, int64_t m) {
  check_nm_violations_args(t, n, m);
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor x = t.contiguous();
  at::Tensor count = at::zeros({}, x.options().dtype(at::kLong));
  const int64_t groups = x.numel() / m;
  if (groups == 0) return count;
  const int blocks = blocks_for(groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "nm_violations_cuda", [&] {
    nm_violations_kernel<scalar_t>
        <<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), groups, int(n), int(m), counter_ptr(count));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return count;
}

// ---------------------------------------------------------------------------------------------
// compress_2to4 / decompress_2to4: one thread per (row, 16-column chunk). With contiguous
// [R, C] dense, [R, C/2] values and C % 16 == 0, chunk t = row * (C/16) + chunk starts at
// dense element 16 t and value element 8 t, so consecutive threads touch consecutive bytes.

template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    compress_2to4_kernel(const scalar_t* __restrict__ dense, scalar_t* __restrict__ values,
                         uint16_t* __restrict__ meta, int64_t rows, int64_t meta_cols, unsigned long long* violations) {
  unsigned long long local = 0;
  const int64_t chunks = rows * meta_cols;
  for (int64_t t = first_index(); t < chunks; t += grid_stride()) {
    const int64_t row = t / meta_cols, chunk = t - row * meta_cols;
    const Vec<scalar_t, kColsPerMeta> in = load_vec<kVectorized, scalar_t, kColsPerMeta>(dense + t * kColsPerMeta);
    Vec<scalar_t, kColsPerMeta / 2> out;
    uint16_t packed = 0;
    local += unsigned(pack_16_cols(in.val, out.val, &packed, IsNonzero<scalar_t>{}));
    store_vec<kVectorized>(values + t * (kColsPerMeta / 2), out);
    meta[meta_offset_sm80(row, chunk, rows)] = packed;
  }
  add_block_count(local, violations);
}

std::tuple<at::Tensor, at::Tensor> compress_2to4_cuda(const at::Tensor& dense) {
  check_compress_args(dense);
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor x = dense.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1), meta_cols = cols / kColsPerMeta;
  at::Tensor values = at::empty({rows, cols / 2}, x.options());
  at::Tensor meta = at::empty({rows, meta_cols}, x.options().dtype(at::kShort));
  const int64_t chunks = rows * meta_cols;
  if (chunks == 0) return {values, meta};
  at::Tensor violations = at::zeros({}, x.options().dtype(at::kLong));
  const int blocks = blocks_for(chunks);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "compress_2to4_cuda", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* vals = values.mutable_data_ptr<scalar_t>();
    uint16_t* meta_out = reinterpret_cast<uint16_t*>(meta.mutable_data_ptr<int16_t>());
    const bool vectorized =
        is_aligned_for_vec<scalar_t, kColsPerMeta>(src) && is_aligned_for_vec<scalar_t, kColsPerMeta / 2>(vals);
    if (vectorized) {
      compress_2to4_kernel<scalar_t, true>
          <<<blocks, kThreads, 0, stream>>>(src, vals, meta_out, rows, meta_cols, counter_ptr(violations));
    } else {
      compress_2to4_kernel<scalar_t, false>
          <<<blocks, kThreads, 0, stream>>>(src, vals, meta_out, rows, meta_cols, counter_ptr(violations));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t count = violations.item<int64_t>();
  if (count > 0) {
    // Error path only: the first offending group in row-major order, as the CPU kernel reports it.
    // `!= 0` compares as float would: -0.0 is zero, NaN is not.
    const at::Tensor over = x.ne(0).view({rows, cols / 4, 4}).sum(-1).gt(2).view({-1}).nonzero();
    const int64_t first = over.numel() > 0 ? over[0][0].item<int64_t>() : -1;
    const int64_t r = first >= 0 ? first / (cols / 4) : -1;
    const int64_t c = first >= 0 ? (first % (cols / 4)) * 4 : -1;
    TORCH_CHECK_VALUE(false, "compress_2to4: dense is not 2:4 sparse: ", count,
                      " group(s) of 4 along a row hold more than 2 non-zeros (the first at row ", r, ", columns ", c,
                      "..", c + 3, "); prune it first, e.g. dense * prunedm.ops.nm_mask(dense)");
  }
  return {values, meta};
}

template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    decompress_2to4_kernel(const scalar_t* __restrict__ values, const uint16_t* __restrict__ meta,
                           scalar_t* __restrict__ dense, int64_t rows, int64_t meta_cols, unsigned long long* invalid) {
  unsigned long long local = 0;
  const int64_t chunks = rows * meta_cols;
  for (int64_t t = first_index(); t < chunks; t += grid_stride()) {
    const int64_t row = t / meta_cols, chunk = t - row * meta_cols;
    const uint16_t packed = meta[meta_offset_sm80(row, chunk, rows)];
#pragma unroll
    for (int g = 0; g < 4; ++g) local += nibble_is_valid((uint32_t(packed) >> (4 * g)) & 0xFu) ? 0u : 1u;
    const Vec<scalar_t, kColsPerMeta / 2> in =
        load_vec<kVectorized, scalar_t, kColsPerMeta / 2>(values + t * (kColsPerMeta / 2));
    Vec<scalar_t, kColsPerMeta> out;
    unpack_16_cols(in.val, packed, out.val, scalar_t(0));
    store_vec<kVectorized>(dense + t * kColsPerMeta, out);
  }
  // Uniform over the grid, so every thread of a block takes the same branch (add_block_count syncs).
  if (invalid != nullptr) add_block_count(local, invalid);
}

// Launches the decompression; counts invalid metadata entries into `invalid` when it is defined.
at::Tensor decompress_2to4_launch(const at::Tensor& values_in, const at::Tensor& meta_in, at::Tensor* invalid) {
  check_decompress_args(values_in, meta_in);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous();
  const at::Tensor meta = meta_in.contiguous();
  const int64_t rows = values.size(0), cols = 2 * values.size(1), meta_cols = cols / kColsPerMeta;
  at::Tensor dense = at::empty({rows, cols}, values.options());
  const int64_t chunks = rows * meta_cols;
  if (chunks == 0) return dense;
  unsigned long long* invalid_ptr = nullptr;
  if (invalid != nullptr) {
    *invalid = at::zeros({}, values.options().dtype(at::kLong));
    invalid_ptr = counter_ptr(*invalid);
  }
  const int blocks = blocks_for(chunks);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(values.scalar_type(), "decompress_2to4_cuda", [&] {
    const scalar_t* vals = values.const_data_ptr<scalar_t>();
    const uint16_t* meta_ptr = reinterpret_cast<const uint16_t*>(meta.const_data_ptr<int16_t>());
    scalar_t* dst = dense.mutable_data_ptr<scalar_t>();
    const bool vectorized =
        is_aligned_for_vec<scalar_t, kColsPerMeta / 2>(vals) && is_aligned_for_vec<scalar_t, kColsPerMeta>(dst);
    if (vectorized) {
      decompress_2to4_kernel<scalar_t, true>
          <<<blocks, kThreads, 0, stream>>>(vals, meta_ptr, dst, rows, meta_cols, invalid_ptr);
    } else {
      decompress_2to4_kernel<scalar_t, false>
          <<<blocks, kThreads, 0, stream>>>(vals, meta_ptr, dst, rows, meta_cols, invalid_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dense;
}

// The public op: refuses invalid metadata as the CPU kernel does, which reads the count back (a host sync).
at::Tensor decompress_2to4_cuda(const at::Tensor& values, const at::Tensor& meta) {
  at::Tensor invalid;
  at::Tensor dense = decompress_2to4_launch(values, meta, &invalid);
  if (!invalid.defined()) return dense;  // nothing to decompress
  const int64_t count = invalid.item<int64_t>();
  TORCH_CHECK_VALUE(count == 0, "decompress_2to4: meta holds ", count,
                    " invalid 2:4 index pair(s) (each 4-bit entry must name two increasing indices); "
                    "was it made by compress_2to4 for values of this shape?");
  return dense;
}

// The per-forward op of the sparse layers: no count, no host sync, so it runs inside CUDA graph capture.
// Their metadata was checked once when it was packed or loaded (prunedm.nn._packing.check_meta).
at::Tensor decompress_2to4_unchecked_cuda(const at::Tensor& values, const at::Tensor& meta) {
  return decompress_2to4_launch(values, meta, nullptr);
}

}  // namespace

// CUDA-only op beside the schemas of csrc/ops.cpp: the CPU kernel's check costs no host sync, so CPU callers
// keep decompress_2to4. Its fake implementation is registered by prunedm.ops.sparse24.
TORCH_LIBRARY_FRAGMENT(prunedm, m) { m.def("decompress_2to4_unchecked(Tensor values, Tensor meta) -> Tensor"); }

TORCH_LIBRARY_IMPL(prunedm, CUDA, m) {
  m.impl("decompress_2to4_unchecked", &decompress_2to4_unchecked_cuda);
  m.impl("nm_mask", &nm_mask_cuda);
  m.impl("nm_violations", &nm_violations_cuda);
  m.impl("compress_2to4", &compress_2to4_cuda);
  m.impl("decompress_2to4", &decompress_2to4_cuda);
}

}  // namespace prunedm
