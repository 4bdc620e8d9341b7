// CPU twins of the 2:4 sparse GEMM kernels (schemas in csrc/ops.cpp): sparse_linear_2to4 and
// sparse_conv2d_2to4. They are the CUDA kernels' index logic run on the CPU: the weight is decoded
// 32 rows x 32 k at a time by emulating the warp (each lane's metadata word from the sm80 layout,
// its A fragment, the selector of each m16 tile: prunedm/sparse_gemm.h), and the conv's B operand
// is gathered pixel by pixel through prunedm/implicit_gemm.h. Products accumulate in double and
// the epilogue (bias, activation, residual) runs in float, rounding once, as on the GPU.
// Not fast: tests compare them with the reference to prove the index logic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../common/checks.h"
#include "../common/sparse_mm_host.h"
#include "prunedm/implicit_gemm.h"
#include "prunedm/sparse24.h"
#include "prunedm/sparse_gemm.h"

namespace prunedm {
namespace {

namespace ms = mma_sp;

// Decodes W = decompress(values, meta) into float [rows, k] through the warp's view of each
// 32-row x 32-k tile; returns the number of invalid metadata nibbles met.
template <typename T>
int64_t decode_weight(const T* values, const uint32_t* meta_words, int64_t rows, int64_t k, float* dense) {
  std::atomic<int64_t> invalid{0};
  at::parallel_for(0, rows / ms::kMetaRowTile, 1, [&](int64_t begin, int64_t end) {
    int64_t local = 0;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row32 = tile * ms::kMetaRowTile;
      std::fill(dense + row32 * k, dense + (row32 + ms::kMetaRowTile) * k, 0.f);
      for (int64_t kc = 0; kc < k / ms::kTileK; ++kc) {
        uint32_t lane_meta[ms::kWarpSize];
        for (int lane = 0; lane < ms::kWarpSize; ++lane)
          lane_meta[lane] = meta_words[ms::meta_word_offset(row32, kc, rows) + lane];
        for (int m16 = 0; m16 < ms::kMetaRowTile / ms::kTileM; ++m16) {
          const int selector = ms::selector_of(m16);
          for (int lane = 0; lane < ms::kWarpSize; ++lane)
            for (int reg = 0; reg < ms::kARegs; ++reg)
              for (int half = 0; half < 2; ++half) {
                const ms::Coord c = ms::a_coord(lane, reg, half);
                const int64_t row = row32 + ms::kTileM * m16 + c.row;
                const uint32_t nibble = ms::nibble_of_kept(lane_meta, c.row, c.col, selector);
                local += nibble_is_valid(nibble) ? 0 : 1;
                const int dense_k = ms::dense_k_of_kept(lane_meta, c.row, c.col, selector);
                dense[row * k + kc * ms::kTileK + dense_k] =
                    static_cast<float>(values[ms::value_offset(row, kc, c.col, k)]);
              }
        }
      }
    }
    invalid += local;
  });
  return invalid.load();
}

void check_meta_valid(const char* op, int64_t invalid) {
  TORCH_CHECK_VALUE(invalid == 0, op, ": meta holds ", invalid,
                    " invalid 2:4 index pair(s) (each 4-bit entry must name two increasing indices); "
                    "was it made by compress_2to4 for values of this shape?");
}

// out[p, o] for one GEMM column: act(sum_k W[o, k] b[k] + bias[o]) + residual, over all rows o.
template <typename T>
void epilogue_column(const float* weight, const float* b_col, int64_t rows, int64_t k, const T* bias, int activation,
                     const T* residual, const ResidualLayout& res, int64_t p, T* out_row) {
  for (int64_t o = 0; o < rows; ++o) {
    const float* w = weight + o * k;
    double acc = 0.0;
    for (int64_t i = 0; i < k; ++i) acc += double(w[i]) * double(b_col[i]);
    float v = static_cast<float>(acc);
    if (bias != nullptr) v += static_cast<float>(bias[o]);
    v = apply_activation(v, activation);
    if (residual != nullptr) v += static_cast<float>(residual[residual_offset(res, p, o)]);
    out_row[o] = static_cast<T>(v);
  }
}

const uint32_t* meta_words_of(const at::Tensor& meta) {
  // The int16 buffer read as 32-bit words (little-endian pairs), as the CUDA kernel reads it.
  return reinterpret_cast<const uint32_t*>(meta.const_data_ptr<int16_t>());
}

at::Tensor sparse_linear_2to4_cpu(const at::Tensor& input, const at::Tensor& values_in, const at::Tensor& meta_in,
                                  const c10::optional<at::Tensor>& bias_in, c10::string_view activation_name,
                                  const c10::optional<at::Tensor>& residual) {
  const int activation = check_sparse_linear_args(input, values_in, meta_in, bias_in, activation_name, residual);
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  const int64_t rows = values.size(0), k = 2 * values.size(1);
  const std::vector<int64_t> out_shape = linear_out_shape(input, rows);
  const at::Tensor x = input.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t tokens = x.size(0);
  at::Tensor out = at::empty(out_shape, input.options());
  at::Tensor residual_view;
  const ResidualLayout res = linear_residual_layout(residual, out_shape, tokens, rows, residual_view);
  const c10::optional<at::Tensor> bias = bias_in.has_value() ? c10::optional<at::Tensor>(bias_in->contiguous()) : bias_in;
  std::vector<float> weight(rows * k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sparse_linear_2to4_cpu", [&] {
    check_meta_valid("sparse_linear_2to4",
                     decode_weight(values.const_data_ptr<scalar_t>(), meta_words_of(meta), rows, k, weight.data()));
    const float* xs = x.const_data_ptr<float>();
    const scalar_t* bias_ptr = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* res_ptr = residual.has_value() ? residual_view.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        epilogue_column(weight.data(), xs + t * k, rows, k, bias_ptr, activation, res_ptr, res, t, dst + t * rows);
    });
  });
  return out;
}

at::Tensor sparse_conv2d_2to4_cpu(const at::Tensor& input, const at::Tensor& values_in, const at::Tensor& meta_in,
                                  at::IntArrayRef weight_shape, const c10::optional<at::Tensor>& bias_in,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  c10::string_view activation_name, const c10::optional<at::Tensor>& residual) {
  // (Not a structured binding: C++17 lambdas cannot capture those.)
  const std::pair<ConvGeometry, int> checked = check_sparse_conv_args(
      input, values_in, meta_in, weight_shape, bias_in, stride, padding, dilation, activation_name, residual);
  const ConvGeometry g = checked.first;
  const int activation = checked.second;
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  const int64_t rows = values.size(0), k = 2 * values.size(1), pixels = conv_gemm_p(g);
  at::Tensor out = conv_output_nhwc(input, g, rows);  // memory [pixels, rows]
  at::Tensor residual_view;
  const ResidualLayout res = conv_residual_layout(residual, g, rows, residual_view);
  const c10::optional<at::Tensor> bias = bias_in.has_value() ? c10::optional<at::Tensor>(bias_in->contiguous()) : bias_in;
  std::vector<float> weight(rows * k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sparse_conv2d_2to4_cpu", [&] {
    check_meta_valid("sparse_conv2d_2to4",
                     decode_weight(values.const_data_ptr<scalar_t>(), meta_words_of(meta), rows, k, weight.data()));
    // The input is read in place through its strides (NCHW, channels_last or any view).
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    const int64_t sn = input.stride(0), sc = input.stride(1), sh = input.stride(2), sw = input.stride(3);
    const scalar_t* bias_ptr = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* res_ptr = residual.has_value() ? residual_view.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, pixels, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> column(k);
      for (int64_t p = begin; p < end; ++p) {
        const ConvPixel px = conv_pixel_of(g, p);
        for (int64_t i = 0; i < k; ++i) {
          const int64_t offset = conv_input_offset(g, px, conv_tap_of(g, i), sn, sc, sh, sw);
          column[i] = offset < 0 ? 0.f : static_cast<float>(src[offset]);
        }
        epilogue_column(weight.data(), column.data(), rows, k, bias_ptr, activation, res_ptr, res, p, dst + p * rows);
      }
    });
  });
  return conv_output_channels_last(input) ? out : out.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(prunedm, CPU, m) {
  m.impl("sparse_linear_2to4", &sparse_linear_2to4_cpu);
  m.impl("sparse_conv2d_2to4", &sparse_conv2d_2to4_cpu);
}

}  // namespace prunedm
