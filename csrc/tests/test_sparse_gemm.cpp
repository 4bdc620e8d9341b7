// Unit tests of csrc/include/prunedm/sparse_gemm.h and implicit_gemm.h: the mma.sp m16n8k32
// fragment ownership against the PTX ISA's formulas, the sm80 metadata words against
// meta_offset_sm80, a simulated warp that rebuilds the dense tile and the product from the lanes'
// registers, the implicit-GEMM conv mapping against a direct convolution, and the activations.
#include <prunedm/implicit_gemm.h>
#include <prunedm/sparse24.h>
#include <prunedm/sparse_gemm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "mma_sp_model.h"

namespace ms = prunedm::mma_sp;

namespace {

using mma_sp_model::as_words;
using mma_sp_model::Packed;
using mma_sp_model::ptx_a;
using mma_sp_model::ptx_b;
using mma_sp_model::ptx_c;
using mma_sp_model::random_packed;

void test_fragments_match_ptx() {
  int a_hits[16][16] = {}, b_hits[32][8] = {}, c_hits[16][8] = {};
  for (int lane = 0; lane < ms::kWarpSize; ++lane) {
    for (int reg = 0; reg < ms::kARegs; ++reg)
      for (int half = 0; half < 2; ++half) {
        const ms::Coord mine = ms::a_coord(lane, reg, half), ptx = ptx_a(lane, 2 * reg + half);
        CHECK_EQ(mine.row, ptx.row);
        CHECK_EQ(mine.col, ptx.col);
        ++a_hits[mine.row][mine.col];
      }
    for (int reg = 0; reg < ms::kBRegs; ++reg)
      for (int half = 0; half < 2; ++half) {
        const ms::Coord mine = ms::b_coord(lane, reg, half), ptx = ptx_b(lane, 2 * reg + half);
        CHECK_EQ(mine.row, ptx.row);
        CHECK_EQ(mine.col, ptx.col);
        ++b_hits[mine.row][mine.col];
      }
    for (int i = 0; i < ms::kCRegs; ++i) {
      const ms::Coord mine = ms::c_coord(lane, i), ptx = ptx_c(lane, i);
      CHECK_EQ(mine.row, ptx.row);
      CHECK_EQ(mine.col, ptx.col);
      ++c_hits[mine.row][mine.col];
    }
  }
  // Each fragment covers its tile exactly once.
  for (auto& row : a_hits)
    for (int h : row) CHECK_EQ(h, 1);
  for (auto& row : b_hits)
    for (int h : row) CHECK_EQ(h, 1);
  for (auto& row : c_hits)
    for (int h : row) CHECK_EQ(h, 1);
  // Metadata: selector s uses lanes 4g + 2s and 4g + 2s + 1 (a thread pair per quad), each one
  // 32-bit register covering two rows (g, g + 8) of one 16-wide dense half.
  for (int s = 0; s < 2; ++s) {
    int bit_hits[32][32] = {};
    for (int row = 0; row < 16; ++row)
      for (int half = 0; half < 2; ++half)
        for (int group = 0; group < 4; ++group) {
          const int lane = ms::meta_lane(row, half, s);
          CHECK_EQ((lane & 3) >> 1, s);
          CHECK_EQ(lane >> 2, row % 8);
          for (int b = 0; b < 4; ++b) ++bit_hits[lane][ms::meta_bit(row, group) + b];
        }
    for (int lane = 0; lane < 32; ++lane)
      for (int bit = 0; bit < 32; ++bit) CHECK_EQ(bit_hits[lane][bit], ((lane & 3) >> 1) == s ? 1 : 0);
  }
}

void test_meta_words_feed_the_lanes() {
  for (int64_t rows : {32, 64, 160})
    for (int64_t cols : {32, 64, 96}) {
      const Packed p = random_packed(rows, cols, unsigned(rows * 7 + cols));
      const std::vector<uint32_t> words = as_words(p.meta);
      for (int64_t row32 = 0; row32 < rows; row32 += ms::kMetaRowTile)
        for (int64_t kc = 0; kc < cols / ms::kTileK; ++kc)
          for (int lane = 0; lane < 32; ++lane) {
            const uint32_t word = words[ms::meta_word_offset(row32, kc, rows) + lane];
            // The lane's register as mma.sp reads it for tile m16 = selector = (lane >> 1) & 1.
            const int m16 = (lane >> 1) & 1, half = lane & 1;
            CHECK_EQ(ms::selector_of(m16), m16);
            for (int row = 0; row < 16; ++row)
              for (int group = 0; group < 4; ++group) {
                if (ms::meta_lane(row, half, m16) != lane) continue;
                const int64_t global_row = row32 + 16 * m16 + row;
                const int64_t global_group = kc * 8 + 4 * half + group;
                CHECK_EQ((word >> ms::meta_bit(row, group)) & 0xFu, p.logical_nibbles[global_row * (cols / 4) + global_group]);
              }
          }
    }
}

// Simulates a warp computing D[rows, 8] = W[rows, K] B[K, 8] tile by tile: each lane fills its
// registers through the header (values, metadata words, B), then mma.sp is evaluated as the PTX
// ISA defines it, finding each element's owner lane with the literal formulas above.
void test_warp_simulation_rebuilds_tile_and_product() {
  for (int64_t rows : {32, 64})
    for (int64_t cols : {32, 128}) {
      const Packed p = random_packed(rows, cols, unsigned(1000 + rows + cols));
      const std::vector<uint32_t> words = as_words(p.meta);
      std::mt19937 rng(5);
      std::uniform_int_distribution<int> level(-4, 4);
      std::vector<float> b(cols * ms::kTileN);  // B[k, n]
      for (auto& v : b) v = float(level(rng)) * 0.5f;

      std::vector<float> rebuilt(rows * cols, 0.f);
      std::vector<double> product(rows * ms::kTileN, 0.0);
      for (int64_t row32 = 0; row32 < rows; row32 += ms::kMetaRowTile)
        for (int64_t kc = 0; kc < cols / ms::kTileK; ++kc) {
          uint32_t lane_meta[32];
          for (int lane = 0; lane < 32; ++lane) lane_meta[lane] = words[ms::meta_word_offset(row32, kc, rows) + lane];
          float lane_b[32][8];
          for (int lane = 0; lane < 32; ++lane)
            for (int reg = 0; reg < 4; ++reg)
              for (int half = 0; half < 2; ++half) {
                const ms::Coord c = ms::b_coord(lane, reg, half);
                lane_b[lane][2 * reg + half] = b[(kc * ms::kTileK + c.row) * ms::kTileN + c.col];
              }
          for (int m16 = 0; m16 < 2; ++m16) {
            const int selector = ms::selector_of(m16);
            float lane_a[32][8];
            for (int lane = 0; lane < 32; ++lane)
              for (int reg = 0; reg < 4; ++reg)
                for (int half = 0; half < 2; ++half) {
                  const ms::Coord c = ms::a_coord(lane, reg, half);
                  lane_a[lane][2 * reg + half] =
                      p.values[ms::value_offset(row32 + 16 * m16 + c.row, kc, c.col, cols)];
                }
            // mma.sp as defined: D[r][n] += sum over kept (r, c) of A[r][c] * B[k(r, c)][n].
            for (int r = 0; r < 16; ++r)
              for (int c = 0; c < 16; ++c) {
                float a = 0.f;
                int owners = 0;
                for (int lane = 0; lane < 32; ++lane)
                  for (int i = 0; i < 8; ++i)
                    if (ptx_a(lane, i).row == r && ptx_a(lane, i).col == c) {
                      a = lane_a[lane][i];
                      ++owners;
                    }
                CHECK_EQ(owners, 1);
                const int k = ms::dense_k_of_kept(lane_meta, r, c, selector);
                CHECK(k >= 4 * (c / 2) && k < 4 * (c / 2) + 4);
                const int64_t global_row = row32 + 16 * m16 + r;
                if (a != 0.f) rebuilt[global_row * cols + kc * ms::kTileK + k] = a;
                for (int n = 0; n < 8; ++n) {
                  float bv = 0.f;
                  for (int lane = 0; lane < 32; ++lane)
                    for (int i = 0; i < 8; ++i)
                      if (ptx_b(lane, i).row == k && ptx_b(lane, i).col == n) bv = lane_b[lane][i];
                  product[global_row * 8 + n] += double(a) * double(bv);
                }
              }
          }
        }
      for (int64_t i = 0; i < rows * cols; ++i) CHECK(rebuilt[i] == p.dense[i]);
      for (int64_t r = 0; r < rows; ++r)
        for (int n = 0; n < 8; ++n) {
          double expected = 0.0;
          for (int64_t k = 0; k < cols; ++k) expected += double(p.dense[r * cols + k]) * double(b[k * 8 + n]);
          CHECK(product[r * 8 + n] == expected);  // exact: quarter-integers, small sums
        }
    }
}

// ---- Implicit GEMM: a convolution through the mapping equals a direct convolution.
void test_implicit_gemm_conv() {
  struct Case {
    int64_t n, c, h, w, cout, kh, kw, sh, sw, ph, pw, dh, dw;
  };
  const Case cases[] = {
      {2, 4, 7, 6, 3, 3, 3, 1, 1, 1, 1, 1, 1},  {1, 8, 9, 9, 2, 3, 3, 2, 2, 1, 1, 1, 1},
      {2, 3, 8, 5, 4, 3, 2, 1, 2, 2, 0, 2, 1},  {1, 16, 5, 5, 2, 1, 1, 1, 1, 0, 0, 1, 1},
      {1, 4, 6, 7, 2, 5, 3, 3, 1, 2, 1, 1, 2},  {3, 2, 4, 4, 1, 4, 4, 1, 1, 0, 0, 1, 1},
  };
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> level(-3, 3);
  for (const Case& cs : cases) {
    prunedm::ConvGeometry g{cs.n, cs.c, cs.h, cs.w, cs.kh, cs.kw, cs.sh, cs.sw, cs.ph, cs.pw, cs.dh, cs.dw, 0, 0};
    g.out_h = prunedm::conv_out_size(cs.h, cs.kh, cs.sh, cs.ph, cs.dh);
    g.out_w = prunedm::conv_out_size(cs.w, cs.kw, cs.sw, cs.pw, cs.dw);
    CHECK_EQ(g.out_h, (cs.h + 2 * cs.ph - cs.dh * (cs.kh - 1) - 1) / cs.sh + 1);
    CHECK_EQ(g.out_w, (cs.w + 2 * cs.pw - cs.dw * (cs.kw - 1) - 1) / cs.sw + 1);
    std::vector<int> in(cs.n * cs.c * cs.h * cs.w), wt(cs.cout * cs.c * cs.kh * cs.kw);
    for (auto& v : in) v = level(rng);
    for (auto& v : wt) v = level(rng);
    // NHWC copy of the input: the mapping takes strides, so NCHW and NHWC must agree.
    std::vector<int> in_nhwc(in.size());
    for (int64_t n = 0; n < cs.n; ++n)
      for (int64_t c = 0; c < cs.c; ++c)
        for (int64_t y = 0; y < cs.h; ++y)
          for (int64_t x = 0; x < cs.w; ++x)
            in_nhwc[((n * cs.h + y) * cs.w + x) * cs.c + c] = in[((n * cs.c + c) * cs.h + y) * cs.w + x];
    // A = conv_weight_to_matrix(W): A[co, (kh, kw, ci)].
    const int64_t K = prunedm::conv_gemm_k(g), P = prunedm::conv_gemm_p(g);
    std::vector<int> a(cs.cout * K);
    for (int64_t co = 0; co < cs.cout; ++co)
      for (int64_t c = 0; c < cs.c; ++c)
        for (int64_t y = 0; y < cs.kh; ++y)
          for (int64_t x = 0; x < cs.kw; ++x)
            a[co * K + (y * cs.kw + x) * cs.c + c] = wt[((co * cs.c + c) * cs.kh + y) * cs.kw + x];
    for (int64_t p = 0; p < P; ++p) {
      const prunedm::ConvPixel px = prunedm::conv_pixel_of(g, p);
      CHECK_EQ((px.n * g.out_h + px.oh) * g.out_w + px.ow, p);
      for (int64_t co = 0; co < cs.cout; ++co) {
        long gemm_nchw = 0, gemm_nhwc = 0;
        for (int64_t k = 0; k < K; ++k) {
          const prunedm::ConvTap tap = prunedm::conv_tap_of(g, k);
          CHECK_EQ((tap.kh * cs.kw + tap.kw) * cs.c + tap.ci, k);
          const int64_t o1 = prunedm::conv_input_offset(g, px, tap, cs.c * cs.h * cs.w, cs.h * cs.w, cs.w, 1);
          const int64_t o2 = prunedm::conv_input_offset(g, px, tap, cs.h * cs.w * cs.c, 1, cs.w * cs.c, cs.c);
          CHECK((o1 < 0) == (o2 < 0));
          if (o1 >= 0) gemm_nchw += long(a[co * K + k]) * in[o1];
          if (o2 >= 0) gemm_nhwc += long(a[co * K + k]) * in_nhwc[o2];
        }
        // Direct convolution, written from the definition.
        long direct = 0;
        for (int64_t c = 0; c < cs.c; ++c)
          for (int64_t y = 0; y < cs.kh; ++y)
            for (int64_t x = 0; x < cs.kw; ++x) {
              const int64_t iy = px.oh * cs.sh - cs.ph + y * cs.dh, ix = px.ow * cs.sw - cs.pw + x * cs.dw;
              if (iy < 0 || iy >= cs.h || ix < 0 || ix >= cs.w) continue;
              direct += long(wt[((co * cs.c + c) * cs.kh + y) * cs.kw + x]) * in[((px.n * cs.c + c) * cs.h + iy) * cs.w + ix];
            }
        CHECK_EQ(gemm_nchw, direct);
        CHECK_EQ(gemm_nhwc, direct);
      }
    }
  }
  CHECK_EQ(prunedm::conv_out_size(2, 5, 1, 0, 1), int64_t{0});  // kernel larger than the input
}

void test_activations() {
  using prunedm::apply_activation;
  using prunedm::Activation;
  CHECK(apply_activation(-1.5f, int(Activation::kNone)) == -1.5f);
  CHECK(apply_activation(-1.5f, int(Activation::kRelu)) == 0.f);
  CHECK(apply_activation(2.f, int(Activation::kRelu)) == 2.f);
  CHECK(std::isnan(apply_activation(NAN, int(Activation::kRelu))));
  CHECK(std::fabs(apply_activation(1.f, int(Activation::kSilu)) - 0.7310585786f) < 1e-6f);
  CHECK(std::fabs(apply_activation(1.f, int(Activation::kGelu)) - 0.8413447461f) < 1e-6f);
  CHECK(std::fabs(apply_activation(-2.f, int(Activation::kGelu)) + 0.0455002639f) < 1e-6f);
  CHECK(std::fabs(apply_activation(1.f, int(Activation::kGeluTanh)) - 0.8411919906f) < 1e-6f);
  CHECK(apply_activation(-30.f, int(Activation::kSilu)) > -1e-10f);
}

}  // namespace

int main() {
  test_fragments_match_ptx();
  test_meta_words_feed_the_lanes();
  test_warp_simulation_rebuilds_tile_and_product();
  test_implicit_gemm_conv();
  test_activations();
  return TEST_MAIN_RESULT();
}
