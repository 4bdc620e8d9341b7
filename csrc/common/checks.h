// Argument checks shared by the CPU and CUDA implementations of the ops in ops.cpp.
// They raise ValueError / TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) and name
// the argument and the rule, matching the checks of prunedm/ops/_checks.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "prunedm/gumbel.h"
#include "prunedm/implicit_gemm.h"
#include "prunedm/sparse24.h"
#include "prunedm/sparse_gemm.h"

namespace prunedm {

inline void check_nm_args(const char* op, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxGroupSize, op, ": m must be in [1, ", kMaxGroupSize, "], got ", m);
  TORCH_CHECK_VALUE(n >= 0 && n <= m, op, ": n must be in [0, m] = [0, ", m, "], got ", n);
}

inline void check_last_dim_groups(const char* op, const char* arg, const at::Tensor& t, int64_t m) {
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", arg, " must have at least 1 dimension, got a 0-D tensor");
  TORCH_CHECK_VALUE(t.size(-1) % m == 0, op, ": the last dim of ", arg, " (", t.size(-1),
                    ") must be divisible by m = ", m);
}

inline void check_nm_mask_args(const at::Tensor& weight, int64_t n, int64_t m) {
  check_nm_args("nm_mask", n, m);
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()),
                   "nm_mask: weight must be a floating-point tensor, got ", weight.scalar_type());
  check_last_dim_groups("nm_mask", "weight", weight, m);
}

inline void check_nm_violations_args(const at::Tensor& t, int64_t n, int64_t m) {
  check_nm_args("nm_violations", n, m);
  TORCH_CHECK_TYPE(!at::isComplexType(t.scalar_type()), "nm_violations: t must be real, got ", t.scalar_type());
  check_last_dim_groups("nm_violations", "t", t, m);
}

inline void check_16bit_float(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": ", arg,
                   " must be float16 or bfloat16, got ", t.scalar_type());
}

inline void check_compress_args(const at::Tensor& dense) {
  TORCH_CHECK_VALUE(dense.dim() == 2, "compress_2to4: dense must be 2-D, got ", dense.dim(), "-D");
  check_16bit_float("compress_2to4", "dense", dense);
  TORCH_CHECK_VALUE(dense.size(0) % kRowTile == 0 && dense.size(1) % kColTile == 0,
                    "compress_2to4: dense's rows and columns must be multiples of ", kRowTile, " and ", kColTile,
                    ", got ", dense.sizes());
}

inline void check_decompress_args(const at::Tensor& values, const at::Tensor& meta) {
  TORCH_CHECK_VALUE(values.dim() == 2, "decompress_2to4: values must be 2-D, got ", values.dim(), "-D");
  check_16bit_float("decompress_2to4", "values", values);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "decompress_2to4: meta must be int16, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(values.device() == meta.device(), "decompress_2to4: values and meta must be on one device, got ",
                    values.device(), " and ", meta.device());
  const int64_t rows = values.size(0), cols = 2 * values.size(1);
  TORCH_CHECK_VALUE(rows % kRowTile == 0 && cols % kColTile == 0, "decompress_2to4: values must be [R, C/2] with R a ",
                    "multiple of ", kRowTile, " and C of ", kColTile, ", got ", values.sizes());
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == rows && meta.size(1) == cols / kColsPerMeta,
                    "decompress_2to4: meta must be [", rows, ", ", cols / kColsPerMeta, "] for values of shape ",
                    values.sizes(), ", got ", meta.sizes());
}

// A metadata nibble is valid when its two indices increase (idx0 < idx1).
inline constexpr bool nibble_is_valid(uint32_t nibble) { return (nibble & 3u) < ((nibble >> 2) & 3u); }

// Argument checks of the gumbel ops (CPU and CUDA). They match
// prunedm/ops/_checks.py (ValueError / TypeError naming the argument and the rule).
inline void check_gumbel_tau(const char* op, double tau) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op, ": tau must be a finite number > 0, got ", tau);
}

// offset: the flat index of the input's first element in the tensor whose noise it draws (a shard's start).
inline void check_gumbel_offset(const char* op, int64_t offset) {
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0 (the flat index of the first element), got ", offset);
}

inline void check_gumbel_nm_args(const char* op, const at::Tensor& logits, int64_t n, int64_t m, double tau) {
  check_nm_args(op, n, m);
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()) && logits.element_size() >= 2, op,
                   ": logits must be float16, bfloat16, float32 or float64, got ", logits.scalar_type());
  check_last_dim_groups(op, "logits", logits, m);
  check_gumbel_tau(op, tau);
}

inline void check_gumbel_pattern_args(const char* op, const at::Tensor& pattern_logits, int64_t n, int64_t m, double tau) {
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxPatternGroupSize, op, ": m must be in [1, ", kMaxPatternGroupSize,
                    "] (C(m, n) candidate patterns per group), got ", m);
  TORCH_CHECK_VALUE(n >= 0 && n <= m, op, ": n must be in [0, m] = [0, ", m, "], got ", n);
  TORCH_CHECK_TYPE(at::isFloatingType(pattern_logits.scalar_type()) && pattern_logits.element_size() >= 2, op,
                   ": pattern_logits must be float16, bfloat16, float32 or float64, got ",
                   pattern_logits.scalar_type());
  const int64_t patterns = binomial(int(m), int(n));
  TORCH_CHECK_VALUE(pattern_logits.dim() >= 2 && pattern_logits.size(-1) == patterns, op,
                    ": pattern_logits must be [..., G, C(m, n)] = [..., G, ", patterns, "] for n = ", n, ", m = ", m,
                    ", got ", pattern_logits.sizes());
  check_gumbel_tau(op, tau);
}

inline void check_gumbel_grad(const char* op, const at::Tensor& grad, const at::Tensor& input, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(grad.sizes() == expected, op, ": grad must have shape ", expected, ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == input.scalar_type(), op, ": grad must have the dtype of the input (",
                   input.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == input.device(), op, ": grad and the input must be on one device, got ",
                    grad.device(), " and ", input.device());
}

inline std::vector<int64_t> pattern_mask_shape(const at::Tensor& pattern_logits, int64_t m) {
  std::vector<int64_t> shape(pattern_logits.sizes().begin(), pattern_logits.sizes().end() - 1);
  shape.back() *= m;
  return shape;
}

// ---- sparse_linear_2to4 / sparse_conv2d_2to4 (mirrors check_sparse_* in prunedm/ops/_checks.py).

inline int parse_activation(const char* op, c10::string_view activation) {
  static const char* const names[kNumActivations] = {"none", "relu", "silu", "gelu", "gelu_tanh"};
  for (int i = 0; i < kNumActivations; ++i)
    if (activation == names[i]) return i;
  TORCH_CHECK_VALUE(false, op, ": activation must be one of 'none', 'relu', 'silu', 'gelu', 'gelu_tanh', got '",
                    std::string(activation), "'");
  return 0;
}

inline void check_same_device_as(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.device() == input.device(), op, ": ", arg, " must be on input's device (", input.device(),
                    "), got ", t.device());
}

// values [M, K/2] (input's dtype: float16, bfloat16 or float32) and meta [M, K/16] int16 in the
// sm80 layout, M % 32 == 0 and K % 32 == 0. Returns (M, K).
inline std::pair<int64_t, int64_t> check_sparse_weight(const char* op, const at::Tensor& input, const at::Tensor& values,
                                                       const at::Tensor& meta) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
                   ": input must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK_TYPE(values.scalar_type() == dtype, op, ": values must have input's dtype (", dtype, "), got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, op, ": meta must be int16, got ", meta.scalar_type());
  check_same_device_as(op, "values", values, input);
  check_same_device_as(op, "meta", meta, input);
  TORCH_CHECK_VALUE(values.dim() == 2, op, ": values must be 2-D [out, K/2], got ", values.dim(), "-D");
  const int64_t rows = values.size(0), k = 2 * values.size(1);
  TORCH_CHECK_VALUE(rows % kRowTile == 0 && k % kColTile == 0 && rows > 0 && k > 0, op,
                    ": values must be [out, K/2] with out a positive multiple of ", kRowTile, " and K of ", kColTile,
                    ", got ", values.sizes());
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == rows && meta.size(1) == k / kColsPerMeta, op,
                    ": meta must be [", rows, ", ", k / kColsPerMeta, "] for values of shape ", values.sizes(),
                    ", got ", meta.sizes());
  return {rows, k};
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, const at::Tensor& input, int64_t rows) {
  if (!bias.has_value()) return;
  TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), op, ": bias must have input's dtype (",
                   input.scalar_type(), "), got ", bias->scalar_type());
  check_same_device_as(op, "bias", *bias, input);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows, op, ": bias must be [", rows, "], got ", bias->sizes());
}

// residual must broadcast to the output's shape (and have input's dtype).
inline void check_residual(const char* op, const c10::optional<at::Tensor>& residual, const at::Tensor& input,
                           at::IntArrayRef out_shape) {
  if (!residual.has_value()) return;
  TORCH_CHECK_TYPE(residual->scalar_type() == input.scalar_type(), op, ": residual must have input's dtype (",
                   input.scalar_type(), "), got ", residual->scalar_type());
  check_same_device_as(op, "residual", *residual, input);
  bool ok = residual->dim() <= int64_t(out_shape.size());
  for (int64_t i = 1; ok && i <= residual->dim(); ++i) {
    const int64_t r = residual->size(-i), o = out_shape[out_shape.size() - i];
    ok = r == o || r == 1;
  }
  TORCH_CHECK_VALUE(ok, op, ": residual of shape ", residual->sizes(), " does not broadcast to the output's shape ",
                    out_shape);
}

// Returns the activation code.
inline int check_sparse_linear_args(const at::Tensor& input, const at::Tensor& values, const at::Tensor& meta,
                                    const c10::optional<at::Tensor>& bias, c10::string_view activation,
                                    const c10::optional<at::Tensor>& residual) {
  const char* op = "sparse_linear_2to4";
  const auto [rows, k] = check_sparse_weight(op, input, values, meta);
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == k, op, ": input must be [..., ", k,
                    "] (K = 2 * values.shape[1]), got ", input.sizes());
  check_bias(op, bias, input, rows);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = rows;
  check_residual(op, residual, input, out_shape);
  return parse_activation(op, activation);
}

inline int64_t pair_entry(const char* op, const char* arg, at::IntArrayRef v, int i, int64_t minimum) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", arg, " must have 2 entries (h, w), got ", v.size());
  TORCH_CHECK_VALUE(v[i] >= minimum, op, ": ", arg, " must be >= ", minimum, ", got ", v);
  return v[i];
}

// Returns the conv geometry (output size included) and the activation code.
inline std::pair<ConvGeometry, int> check_sparse_conv_args(const at::Tensor& input, const at::Tensor& values,
                                                           const at::Tensor& meta, at::IntArrayRef weight_shape,
                                                           const c10::optional<at::Tensor>& bias,
                                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                                           at::IntArrayRef dilation, c10::string_view activation,
                                                           const c10::optional<at::Tensor>& residual) {
  const char* op = "sparse_conv2d_2to4";
  const auto [rows, k] = check_sparse_weight(op, input, values, meta);
  TORCH_CHECK_VALUE(weight_shape.size() == 4, op, ": weight_shape must be (Cout, Cin, kh, kw), got ", weight_shape);
  for (int64_t s : weight_shape) TORCH_CHECK_VALUE(s > 0, op, ": weight_shape must be positive, got ", weight_shape);
  TORCH_CHECK_VALUE(weight_shape[0] == rows && weight_shape[1] * weight_shape[2] * weight_shape[3] == k, op,
                    ": weight_shape ", weight_shape, " does not match values of shape ", values.sizes(),
                    " (needs Cout = ", rows, " and Cin*kh*kw = K = ", k, ")");
  TORCH_CHECK_VALUE(input.dim() == 4 && input.size(1) == weight_shape[1], op, ": input must be [N, Cin, H, W] with Cin = ",
                    weight_shape[1], ", got ", input.sizes());
  ConvGeometry g{input.size(0), input.size(1), input.size(2), input.size(3), weight_shape[2], weight_shape[3],
                 pair_entry(op, "stride", stride, 0, 1), pair_entry(op, "stride", stride, 1, 1),
                 pair_entry(op, "padding", padding, 0, 0), pair_entry(op, "padding", padding, 1, 0),
                 pair_entry(op, "dilation", dilation, 0, 1), pair_entry(op, "dilation", dilation, 1, 1), 0, 0};
  g.out_h = conv_out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h, g.dil_h);
  g.out_w = conv_out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w, g.dil_w);
  TORCH_CHECK_VALUE(g.out_h > 0 && g.out_w > 0, op, ": the (dilated) kernel ", weight_shape.slice(2),
                    " does not fit the padded input ", input.sizes().slice(2));
  check_bias(op, bias, input, rows);
  check_residual(op, residual, input, {g.batch, rows, g.out_h, g.out_w});
  return {g, parse_activation(op, activation)};
}

// Output memory format of sparse_conv2d_2to4: channels_last when the input is (and is not also
// contiguous), as prunedm/ops/_fake.py assumes.
inline bool conv_output_channels_last(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
}

}  // namespace prunedm
