// CUDA implementation of sparse_linear_2to4 (schema in csrc/ops.cpp): the mma.sp kernel of
// sparse_gemm_kernel.cuh with B = X^T. Its CPU twin is csrc/cpu/sparse_mm.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "../common/sparse_mm_host.h"
#include "sparse_gemm_host.cuh"

namespace prunedm {
namespace {

using namespace sparse_gemm_cuda;

at::Tensor sparse_linear_2to4_cuda(const at::Tensor& input, const at::Tensor& values_in, const at::Tensor& meta_in,
                                   const c10::optional<at::Tensor>& bias_in, c10::string_view activation_name,
                                   const c10::optional<at::Tensor>& residual) {
  const char* op = "sparse_linear_2to4";
  const int activation = check_sparse_linear_args(input, values_in, meta_in, bias_in, activation_name, residual);
  check_cuda_support(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor values = aligned16(values_in.contiguous()), meta = aligned16(meta_in.contiguous());
  const int64_t rows = values.size(0), k = 2 * values.size(1);
  const std::vector<int64_t> out_shape = linear_out_shape(input, rows);
  const at::Tensor x = aligned16(input.reshape({-1, k}).contiguous());
  const int64_t tokens = x.size(0);
  at::Tensor out = at::empty(out_shape, input.options());
  if (tokens == 0) return out;
  at::Tensor residual_holder;
  const ResidualLayout res = linear_residual_layout(residual, out_shape, tokens, rows, residual_holder);
  const c10::optional<at::Tensor> residual_view =
      residual.has_value() ? c10::optional<at::Tensor>(residual_holder) : c10::nullopt;
  const c10::optional<at::Tensor> bias = bias_in.has_value() ? c10::optional<at::Tensor>(bias_in->contiguous()) : bias_in;
  dispatch_and_launch<false>(input, [&](auto tag) {
    using T = decltype(tag);
    return make_params<T>(values, meta, x, bias, residual_view, res, out, tokens, activation);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunedm, CUDA, m) { m.impl("sparse_linear_2to4", &sparse_linear_2to4_cuda); }

}  // namespace prunedm
