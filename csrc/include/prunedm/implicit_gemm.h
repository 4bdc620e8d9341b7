// Torch-free index mapping of a Conv2d as an implicit GEMM (groups = 1), shared by the CUDA
// kernel (csrc/cuda/sparse_conv.cu), its CPU twin (csrc/cpu/sparse_mm.cpp) and the header tests.
//
// out[n, co, oh, ow] = sum_{kh, kw, ci} W[co, ci, kh, kw] in[n, ci, ih, iw] with
// ih = oh * stride_h - pad_h + kh * dil_h and iw likewise (zero outside the input), is the GEMM
// D[co, p] = sum_k A[co, k] B[k, p] with A = conv_weight_to_matrix(W) ([Cout, kh*kw*Cin], K in
// (kh, kw, Cin) order, 2:4 along K) and B[k, p] gathered from the input: GEMM column p is the
// output pixel (n, oh, ow) in row-major order (so D^T is the NHWC output), GEMM row k the tap
// (kh, kw, ci). With an NHWC input, 8 consecutive k within one tap (Cin % 8 == 0) are 16
// contiguous bytes of one input pixel, which the CUDA kernel copies with one cp.async.
#pragma once

#include <cstdint>

#include "prunedm/sparse24.h"

namespace prunedm {

struct ConvGeometry {
  int64_t batch, in_channels, in_h, in_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
};

// Output size of one spatial dim, as torch computes it (floor division); <= 0 means no output.
PRUNEDM_HD int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dil) {
  const int64_t span = in + 2 * pad - dil * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// GEMM sizes: K = kh*kw*Cin (rows of B), P = N*OH*OW (columns of B, output pixels).
PRUNEDM_HD int64_t conv_gemm_k(const ConvGeometry& g) { return g.kernel_h * g.kernel_w * g.in_channels; }
PRUNEDM_HD int64_t conv_gemm_p(const ConvGeometry& g) { return g.batch * g.out_h * g.out_w; }

struct ConvPixel {
  int64_t n, oh, ow;
};

struct ConvTap {
  int64_t kh, kw, ci;
};

// GEMM column p -> output pixel (n, oh, ow), row-major over (N, OH, OW).
PRUNEDM_HD ConvPixel conv_pixel_of(const ConvGeometry& g, int64_t p) {
  const int64_t ow = p % g.out_w;
  const int64_t rest = p / g.out_w;
  return {rest / g.out_h, rest % g.out_h, ow};
}

// GEMM row k -> tap (kh, kw, ci), K ordered (kh, kw, Cin) as conv_weight_to_matrix orders it.
PRUNEDM_HD ConvTap conv_tap_of(const ConvGeometry& g, int64_t k) {
  const int64_t ci = k % g.in_channels;
  const int64_t rest = k / g.in_channels;
  return {rest / g.kernel_w, rest % g.kernel_w, ci};
}

// Element offset of the input value B[k, p] reads, for an input with the given element strides
// (of the logical [N, C, H, W] dims, so NCHW and NHWC alike), or -1 when it lies in the padding.
PRUNEDM_HD int64_t conv_input_offset(const ConvGeometry& g, const ConvPixel& px, const ConvTap& tap, int64_t stride_n,
                                     int64_t stride_c, int64_t stride_h, int64_t stride_w) {
  const int64_t ih = px.oh * g.stride_h - g.pad_h + tap.kh * g.dil_h;
  const int64_t iw = px.ow * g.stride_w - g.pad_w + tap.kw * g.dil_w;
  if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return -1;
  return px.n * stride_n + tap.ci * stride_c + ih * stride_h + iw * stride_w;
}

// The gather in the incremental form the CUDA kernel's k loop uses: a GEMM column keeps its pixel for the
// whole loop (conv_column_origin: the divisions happen once, before it) and the tap position moves on by a
// chunk of channels at a time without dividing (ConvTapCursor). conv_gather_offset(g, origin of p, cursor at
// k) equals conv_input_offset(g, conv_pixel_of(g, p), conv_tap_of(g, k), NHWC strides) (test_sparse_gemm.cpp).
struct ConvColumnOrigin {
  int64_t offset;  // NHWC element offset of (n, ih0, iw0, 0); may lie outside the input
  int ih0, iw0;    // oh * stride_h - pad_h, ow * stride_w - pad_w
};

PRUNEDM_HD ConvColumnOrigin conv_column_origin(const ConvGeometry& g, int64_t p) {
  const ConvPixel px = conv_pixel_of(g, p);
  const int64_t ih0 = px.oh * g.stride_h - g.pad_h, iw0 = px.ow * g.stride_w - g.pad_w;
  return {((px.n * g.in_h + ih0) * g.in_w + iw0) * g.in_channels, int(ih0), int(iw0)};
}

struct ConvTapCursor {
  int64_t offset = 0;  // (kh dil_h in_w + kw dil_w) Cin + ci: the tap's NHWC offset from the column origin
  int64_t next_w, next_h;  // what offset gains when ci wraps into the next kw, and when kw wraps into the next kh
  int dh = 0, dw = 0;  // kh dil_h, kw dil_w
  int kw = 0, ci = 0;

  PRUNEDM_HD explicit ConvTapCursor(const ConvGeometry& g)
      : next_w((g.dil_w - 1) * g.in_channels), next_h((g.dil_h * g.in_w - g.kernel_w * g.dil_w) * g.in_channels) {}

  // Moves on by k GEMM rows (channels): loops once per tap crossed (at most once when k <= Cin).
  PRUNEDM_HD void advance(const ConvGeometry& g, int k) {
    ci += k;
    offset += k;
    while (ci >= int(g.in_channels)) {
      ci -= int(g.in_channels);
      offset += next_w;
      dw += int(g.dil_w);
      if (++kw == int(g.kernel_w)) {
        kw = 0;
        offset += next_h;
        dw = 0;
        dh += int(g.dil_h);
      }
    }
  }

  // Whether the tap of column `origin` lies inside the input (else it reads the zero padding).
  PRUNEDM_HD bool inside(const ConvGeometry& g, const ConvColumnOrigin& origin) const {
    return unsigned(origin.ih0 + dh) < unsigned(g.in_h) && unsigned(origin.iw0 + dw) < unsigned(g.in_w);
  }
};

// NHWC element offset of B[k, p] from the column's origin and the cursor at k, or -1 in the padding.
PRUNEDM_HD int64_t conv_gather_offset(const ConvGeometry& g, const ConvColumnOrigin& origin, const ConvTapCursor& tap) {
  return tap.inside(g, origin) ? origin.offset + tap.offset : -1;
}

}  // namespace prunedm
