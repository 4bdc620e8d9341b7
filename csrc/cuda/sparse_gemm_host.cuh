// Host-side glue shared by the CUDA launchers of sparse_linear_2to4 (sparse_mm.cu) and
// sparse_conv2d_2to4 (sparse_conv.cu): device checks, 16-byte alignment, kernel parameters.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "../common/sparse_mm_host.h"
#include "sparse_gemm_kernel.cuh"

namespace prunedm {
namespace sparse_gemm_cuda {

// The kernels run mma.sp on float16/bfloat16: refuse what they cannot run, saying what to do instead.
inline void check_cuda_support(const char* op, const at::Tensor& input) {
  TORCH_CHECK_TYPE(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16, op,
                   ": the CUDA kernel takes float16 or bfloat16 tensors, got ", input.scalar_type(),
                   "; use backend='reference' (prunedm.ops) for float32");
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(input.device().index());
  TORCH_CHECK(props->major >= 8, op, ": mma.sp needs compute capability >= 8.0 (Sparse Tensor Cores), got ",
              props->major, ".", props->minor);
}

// t itself when its data is 16-byte aligned (the kernels copy 16-byte chunks), else an aligned copy.
inline at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
}

template <typename T>
Params<T> make_params(const at::Tensor& values, const at::Tensor& meta, const at::Tensor& b,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual_view,
                      const ResidualLayout& res, at::Tensor& out, int64_t p, int activation) {
  Params<T> prm{};
  prm.values = reinterpret_cast<const T*>(values.const_data_ptr());
  prm.meta = reinterpret_cast<const uint32_t*>(meta.const_data_ptr());
  prm.b = reinterpret_cast<const T*>(b.const_data_ptr());
  prm.bias = bias.has_value() ? reinterpret_cast<const T*>(bias->const_data_ptr()) : nullptr;
  prm.residual = residual_view.has_value() ? reinterpret_cast<const T*>(residual_view->const_data_ptr()) : nullptr;
  prm.out = reinterpret_cast<T*>(out.mutable_data_ptr());
  prm.m = values.size(0);
  prm.k = 2 * values.size(1);
  prm.p = p;
  prm.activation = activation;
  prm.res = res;
  return prm;
}

// Launches with split-K when split_k::choose_splits says the tile grid is too small for the device's SMs:
// the fp32 workspace comes from torch's caching allocator on the current stream.
template <typename T, bool kConv>
void launch_with_split_k(const at::Tensor& input, Params<T> prm, cudaStream_t stream) {
  const int sm_count = at::cuda::getDeviceProperties(input.device().index())->multiProcessorCount;
  const int splits = split_k::choose_splits(prm.p, prm.m, prm.k, sm_count);
  at::Tensor workspace;
  if (splits > 1) {
    workspace = at::empty({split_k::workspace_elements(splits, prm.p, prm.m)}, input.options().dtype(at::kFloat));
    prm.workspace = workspace.mutable_data_ptr<float>();
  }
  launch_sparse_gemm<T, kConv>(prm, splits, stream);
}

// Runs the kernel for T = the CUDA type of input's dtype.
template <bool kConv, typename Fill>
void dispatch_and_launch(const at::Tensor& input, Fill fill_params) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (input.scalar_type() == at::kHalf) {
    launch_with_split_k<__half, kConv>(input, fill_params(__half{}), stream);
  } else {
    launch_with_split_k<__nv_bfloat16, kConv>(input, fill_params(__nv_bfloat16{}), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparse_gemm_cuda
}  // namespace prunedm
