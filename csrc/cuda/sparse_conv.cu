// CUDA implementation of sparse_conv2d_2to4 (schema in csrc/ops.cpp): the mma.sp kernel of
// sparse_gemm_kernel.cuh with B gathered from the NHWC input per k tile (implicit GEMM,
// prunedm/implicit_gemm.h). Its CPU twin is in csrc/cpu/sparse_mm.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/sparse_mm_host.h"
#include "sparse_gemm_host.cuh"

namespace prunedm {
namespace {

using namespace sparse_gemm_cuda;

// 8 consecutive k of a 16-byte B chunk must be 8 channels of one tap of one pixel.
constexpr int64_t kConvChannelAlignment = 8;

at::Tensor sparse_conv2d_2to4_cuda(const at::Tensor& input, const at::Tensor& values_in, const at::Tensor& meta_in,
                                   at::IntArrayRef weight_shape, const c10::optional<at::Tensor>& bias_in,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   c10::string_view activation_name, const c10::optional<at::Tensor>& residual) {
  const char* op = "sparse_conv2d_2to4";
  const std::pair<ConvGeometry, int> checked = check_sparse_conv_args(
      input, values_in, meta_in, weight_shape, bias_in, stride, padding, dilation, activation_name, residual);
  const ConvGeometry g = checked.first;
  const int activation = checked.second;
  check_cuda_support(op, input);
  TORCH_CHECK_VALUE(g.in_channels % kConvChannelAlignment == 0, op, ": the CUDA kernel needs input channels (Cin = ",
                    g.in_channels, ") to be a multiple of ", kConvChannelAlignment,
                    " (16-byte NHWC gathers); use backend='reference' (prunedm.ops) for this layer");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor values = aligned16(values_in.contiguous()), meta = aligned16(meta_in.contiguous());
  const int64_t rows = values.size(0);
  const at::Tensor x = aligned16(input.contiguous(at::MemoryFormat::ChannelsLast));
  at::Tensor out = conv_output_nhwc(input, g, rows);  // memory [P, Cout]
  at::Tensor residual_holder;
  const ResidualLayout res = conv_residual_layout(residual, g, rows, residual_holder);
  const c10::optional<at::Tensor> residual_view =
      residual.has_value() ? c10::optional<at::Tensor>(residual_holder) : c10::nullopt;
  const c10::optional<at::Tensor> bias = bias_in.has_value() ? c10::optional<at::Tensor>(bias_in->contiguous()) : bias_in;
  dispatch_and_launch<true>(input, [&](auto tag) {
    using T = decltype(tag);
    Params<T> prm = make_params<T>(values, meta, x, bias, residual_view, res, out, conv_gemm_p(g), activation);
    prm.conv = g;
    return prm;
  });
  return conv_output_channels_last(input) ? out : out.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(prunedm, CUDA, m) { m.impl("sparse_conv2d_2to4", &sparse_conv2d_2to4_cuda); }

}  // namespace prunedm
