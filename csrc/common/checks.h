// Argument checks shared by the CPU and CUDA implementations of the ops in ops.cpp.
// They raise ValueError / TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) and name
// the argument and the rule, matching the checks of prunedm/ops/_checks.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "prunedm/gumbel.h"
#include "prunedm/sparse24.h"

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

}  // namespace prunedm
