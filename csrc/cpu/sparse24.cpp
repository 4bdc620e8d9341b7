// CPU kernels of the N:M mask and 2:4 compression ops (schemas in csrc/ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "../common/checks.h"
#include "prunedm/sparse24.h"

namespace prunedm {
namespace {

template <typename T>
using key_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

at::Tensor nm_mask_cpu(const at::Tensor& weight, int64_t n, int64_t m) {
  check_nm_mask_args(weight, n, m);
  const at::Tensor w = weight.contiguous();
  at::Tensor mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const int64_t groups = w.numel() / m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "nm_mask_cpu", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    bool* dst = mask.mutable_data_ptr<bool>();
    at::parallel_for(0, groups, 4096 / m + 1, [&](int64_t begin, int64_t end) {
      key_t<scalar_t> keys[kMaxGroupSize];
      for (int64_t g = begin; g < end; ++g) {
        for (int64_t i = 0; i < m; ++i) keys[i] = std::abs(static_cast<key_t<scalar_t>>(src[g * m + i]));
        const uint64_t kept = top_n_bits(keys, int(n), int(m));
        for (int64_t i = 0; i < m; ++i) dst[g * m + i] = (kept >> i) & 1u;
      }
    });
  });
  return mask;
}

at::Tensor nm_violations_cpu(const at::Tensor& t, int64_t n, int64_t m) {
  check_nm_violations_args(t, n, m);
  const at::Tensor x = t.contiguous();
  const int64_t groups = x.numel() / m;
  std::atomic<int64_t> total{0};
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "nm_violations_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, groups, 4096 / m + 1, [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      for (int64_t g = begin; g < end; ++g) {
        int64_t nonzeros = 0;
        for (int64_t i = 0; i < m; ++i) nonzeros += src[g * m + i] != scalar_t(0) ? 1 : 0;
        local += nonzeros > n ? 1 : 0;
      }
      total += local;
    });
  });
  return at::scalar_tensor(total.load(), t.options().dtype(at::kLong));
}

// The first group (row, column) with more than two non-zeros, for the error message.
template <typename T>
std::pair<int64_t, int64_t> first_violation(const T* src, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += 4) {
      int nonzeros = 0;
      for (int i = 0; i < 4; ++i) nonzeros += static_cast<float>(src[r * cols + c + i]) != 0.f ? 1 : 0;
      if (nonzeros > 2) return {r, c};
    }
  return {-1, -1};
}

std::tuple<at::Tensor, at::Tensor> compress_2to4_cpu(const at::Tensor& dense) {
  check_compress_args(dense);
  const at::Tensor x = dense.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1), meta_cols = cols / kColsPerMeta;
  at::Tensor values = at::empty({rows, cols / 2}, x.options());
  at::Tensor meta = at::empty({rows, meta_cols}, x.options().dtype(at::kShort));
  std::atomic<int64_t> violations{0};
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "compress_2to4_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* vals = values.mutable_data_ptr<scalar_t>();
    uint16_t* meta_out = reinterpret_cast<uint16_t*>(meta.mutable_data_ptr<int16_t>());
    const auto is_nonzero = [](scalar_t v) { return static_cast<float>(v) != 0.f; };
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < meta_cols; ++j) {
          uint16_t packed = 0;
          local += pack_16_cols(src + r * cols + j * kColsPerMeta, vals + r * (cols / 2) + j * 8, &packed, is_nonzero);
          meta_out[meta_offset_sm80(r, j, rows)] = packed;
        }
      violations += local;
    });
    if (violations.load() > 0) {
      const auto [r, c] = first_violation(src, rows, cols);
      TORCH_CHECK_VALUE(false, "compress_2to4: dense is not 2:4 sparse: ", violations.load(),
                        " group(s) of 4 along a row hold more than 2 non-zeros (the first at row ", r, ", columns ", c,
                        "..", c + 3, "); prune it first, e.g. dense * prunedm.ops.nm_mask(dense)");
    }
  });
  return {values, meta};
}

at::Tensor decompress_2to4_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  check_decompress_args(values_in, meta_in);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor meta = meta_in.contiguous();
  const int64_t rows = values.size(0), cols = 2 * values.size(1), meta_cols = cols / kColsPerMeta;
  at::Tensor dense = at::empty({rows, cols}, values.options());
  std::atomic<int64_t> invalid{0};
  AT_DISPATCH_REDUCED_FLOATING_TYPES(values.scalar_type(), "decompress_2to4_cpu", [&] {
    const scalar_t* vals = values.const_data_ptr<scalar_t>();
    const uint16_t* meta_in_ptr = reinterpret_cast<const uint16_t*>(meta.const_data_ptr<int16_t>());
    scalar_t* dst = dense.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < meta_cols; ++j) {
          const uint16_t packed = meta_in_ptr[meta_offset_sm80(r, j, rows)];
          for (int g = 0; g < 4; ++g) local += nibble_is_valid((packed >> (4 * g)) & 0xFu) ? 0 : 1;
          unpack_16_cols(vals + r * (cols / 2) + j * 8, packed, dst + r * cols + j * kColsPerMeta, scalar_t(0));
        }
      invalid += local;
    });
  });
  TORCH_CHECK_VALUE(invalid.load() == 0, "decompress_2to4: meta holds ", invalid.load(),
                    " invalid 2:4 index pair(s) (each 4-bit entry must name two increasing indices); "
                    "was it made by compress_2to4 for values of this shape?");
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(prunedm, CPU, m) {
  m.impl("nm_mask", &nm_mask_cpu);
  m.impl("nm_violations", &nm_violations_cpu);
  m.impl("compress_2to4", &compress_2to4_cpu);
  m.impl("decompress_2to4", &decompress_2to4_cpu);
}

}  // namespace prunedm
