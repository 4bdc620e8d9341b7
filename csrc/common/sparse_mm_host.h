// Host-side preparation shared by the CPU and CUDA implementations of sparse_linear_2to4 and
// sparse_conv2d_2to4: output allocation and the residual's broadcast strides.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "prunedm/implicit_gemm.h"
#include "prunedm/sparse_gemm.h"

namespace prunedm {

// Output shape of sparse_linear_2to4: input's, with the last dim replaced by the out features.
inline std::vector<int64_t> linear_out_shape(const at::Tensor& input, int64_t rows) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = rows;
  return shape;
}

// The residual's layout for a linear output [..., rows] viewed as [tokens, rows]. Broadcast dims
// get stride 0; a residual whose leading dims cannot be flattened without a copy is copied.
inline ResidualLayout linear_residual_layout(const c10::optional<at::Tensor>& residual,
                                             const std::vector<int64_t>& out_shape, int64_t tokens, int64_t rows,
                                             at::Tensor& holder) {
  ResidualLayout layout{1, 1, 0, 0, 0, 0};
  if (!residual.has_value()) return layout;
  holder = residual->expand(out_shape).reshape({tokens, rows});
  layout.stride_n = holder.stride(0);
  layout.stride_c = holder.stride(1);
  return layout;
}

inline ResidualLayout conv_residual_layout(const c10::optional<at::Tensor>& residual, const ConvGeometry& g,
                                           int64_t rows, at::Tensor& holder) {
  ResidualLayout layout{g.out_h, g.out_w, 0, 0, 0, 0};
  if (!residual.has_value()) return layout;
  holder = residual->expand({g.batch, rows, g.out_h, g.out_w});
  layout.stride_n = holder.stride(0);
  layout.stride_c = holder.stride(1);
  layout.stride_h = holder.stride(2);
  layout.stride_w = holder.stride(3);
  return layout;
}

// The [N, Cout, OH, OW] output whose memory is [N*OH*OW, Cout] (channels_last), which the kernels
// write as D^T; conv_output_channels_last() decides whether it is returned as is or made contiguous.
inline at::Tensor conv_output_nhwc(const at::Tensor& input, const ConvGeometry& g, int64_t rows) {
  return at::empty({g.batch, g.out_h, g.out_w, rows}, input.options()).permute({0, 3, 1, 2});
}

}  // namespace prunedm
