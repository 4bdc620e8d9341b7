// The 2:4 sparse GEMM kernel behind sparse_linear_2to4 (csrc/cuda/sparse_mm.cu) and
// sparse_conv2d_2to4 (csrc/cuda/sparse_conv.cu):
//   out[p, o] = act(sum_k W[o, k] B[k, p] + bias[o]) + residual[p, o]
// with W packed by compress_2to4 (values [M, K/2], int16 metadata in the sm80 layout) and B either
// X^T for a linear layer (X [P, K] row-major) or the implicit-GEMM gather of an NHWC input.
//
// Tiling: a 128-thread block computes 64 output features x 64 columns; each of its 4 warps 32 x 32,
// i.e. 2 m16 tiles x 4 n8 tiles of mma.sp.m16n8k32 per 32-wide k step. K advances 32 dense
// (16 kept) columns per stage through a kStages-deep cp.async pipeline in shared memory: values
// [64][16], B [64 columns][32 k], and the 64 metadata words (two 32-row tiles) of the stage.
// A warp's 32 rows are one metadata tile, so lane L's register is word L of the tile
// (prunedm/sparse_gemm.h explains why) and the two m16 tiles use selectors 0 and 1.
// Fragments are read from shared memory with 32-bit loads at the coordinates of sparse_gemm.h;
// row paddings keep those loads free of bank conflicts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "prunedm/implicit_gemm.h"
#include "prunedm/sparse_gemm.h"

namespace prunedm {
namespace sparse_gemm_cuda {

namespace ms = mma_sp;

constexpr int kThreads = 128;
constexpr int kBlockM = 64, kBlockN = 64, kBlockK = ms::kTileK;
constexpr int kWarpM = 32, kWarpN = 32;
constexpr int kStages = 3;
// Shared-memory row pitches in 16-bit elements: a multiple of 8 (16-byte cp.async destinations)
// whose 32-bit word stride spreads the 8 row groups of a fragment load over distinct banks.
constexpr int kAPitch = ms::kKeptK + 8;  // 24 halfs = 12 words
constexpr int kBPitch = kBlockK + 8;     // 40 halfs = 20 words
static_assert(kWarpM == ms::kMetaRowTile, "a warp covers one 32-row metadata tile");
static_assert((kBlockM / kWarpM) * (kBlockN / kWarpN) * ms::kWarpSize == kThreads, "4 warps of 32x32");

// Whether mma.sp takes the ::ordered_metadata qualifier (PTX ISA 8.5, CUDA 12.5): PTX recommends
// it, and our metadata always lists the two indices of a pair in increasing order.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define PRUNEDM_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define PRUNEDM_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// d += A(2:4) * B for one m16n8k32 tile, with the metadata of lanes selected by kSelector.
template <typename T, int kSelector>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t meta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(PRUNEDM_MMA_SP "f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta),
                   "n"(kSelector));
  } else {
    asm volatile(PRUNEDM_MMA_SP "bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta),
                   "n"(kSelector));
  }
#else
  __trap();  // the host launcher never launches below sm_80
#endif
}

// 16-byte global -> shared copy; src_bytes = 0 fills the destination with zeros (out of range).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

template <typename T>
struct Params {
  const T* values;           // [M, K/2]
  const uint32_t* meta;      // the [M, K/16] int16 sm80 buffer as 32-bit words
  const T* b;                // linear: X [P, K] row-major; conv: NHWC input
  const T* bias;             // [M] or nullptr
  const T* residual;         // read through `res`, or nullptr
  T* out;                    // [P, M] row-major
  int64_t m, p, k;
  int activation;
  ResidualLayout res;
  ConvGeometry conv;         // conv only
};

struct alignas(16) Stage16 {
  uint16_t a[kBlockM][kAPitch];
  uint16_t b[kBlockN][kBPitch];
  uint32_t meta[kBlockM];
};

// Loads one stage: values and metadata of k chunk `kc` for the block's 64 rows, and the B tile.
template <typename T, bool kConv>
__device__ __forceinline__ void load_stage(Stage16& s, const Params<T>& prm, int64_t m0, int64_t p0, int64_t kc) {
  const int tid = threadIdx.x;
  {  // values: 64 rows x 2 chunks of 8 kept values; rows past M are zero (never used).
    const int row = tid >> 1, chunk = tid & 1;
    const bool valid = m0 + row < prm.m;
    const T* src = valid ? prm.values + ms::value_offset(m0 + row, kc, 8 * chunk, prm.k) : prm.values;
    cp_async_16(&s.a[row][8 * chunk], src, valid);
  }
  if (tid < kBlockM / 4) {  // metadata: 64 words, 4 per thread (a 32-row tile is wholly in or out)
    const int word = 4 * tid;
    const bool valid = m0 + word < prm.m;
    const uint32_t* src = valid ? prm.meta + ms::meta_word_offset(m0, kc, prm.m) + word : prm.meta;
    cp_async_16(&s.meta[word], src, valid);
  }
#pragma unroll
  for (int i = 0; i < (kBlockN * kBlockK / 8) / kThreads; ++i) {  // B: 64 columns x 4 chunks of 8 k
    const int c = tid + i * kThreads;
    const int col = c >> 2, chunk = c & 3;
    const int64_t p = p0 + col;
    const int64_t k = kc * kBlockK + 8 * chunk;
    bool valid = p < prm.p;
    const T* src = prm.b;
    if constexpr (kConv) {
      // 8 consecutive k stay in one tap (Cin % 8 == 0): 16 contiguous bytes of one NHWC pixel.
      const ConvGeometry& g = prm.conv;
      if (valid) {
        const int64_t offset = conv_input_offset(g, conv_pixel_of(g, p), conv_tap_of(g, k), g.in_h * g.in_w * g.in_channels,
                                                 1, g.in_w * g.in_channels, g.in_channels);
        valid = offset >= 0;
        if (valid) src = prm.b + offset;
      }
    } else {
      if (valid) src = prm.b + p * prm.k + k;
    }
    cp_async_16(&s.b[col][8 * chunk], src, valid);
  }
}

template <typename T, bool kConv>
__global__ void __launch_bounds__(kThreads) sparse_gemm_kernel(const Params<T> prm) {
  __shared__ Stage16 stages[kStages];
  const int lane = threadIdx.x % ms::kWarpSize, warp = threadIdx.x / ms::kWarpSize;
  const int warp_m = warp % (kBlockM / kWarpM), warp_n = warp / (kBlockM / kWarpM);
  const int64_t m0 = int64_t(blockIdx.y) * kBlockM, p0 = int64_t(blockIdx.x) * kBlockN;
  // M is a multiple of 32: a warp's rows are all valid or all past the end (warp-uniform).
  const bool warp_active = m0 + warp_m * kWarpM < prm.m;
  const int64_t k_chunks = prm.k / kBlockK;

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_chunks) load_stage<T, kConv>(stages[s], prm, m0, p0, s);
    cp_async_commit();
  }

  for (int64_t kc = 0; kc < k_chunks; ++kc) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kc is visible to all, and stage kc - 1 is no longer being read
    const int64_t next = kc + kStages - 1;
    if (next < k_chunks) load_stage<T, kConv>(stages[next % kStages], prm, m0, p0, next);
    cp_async_commit();

    const Stage16& s = stages[kc % kStages];
    if (warp_active) {
      const uint32_t meta = s.meta[warp_m * kWarpM + lane];
      uint32_t a[2][4], b[4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const ms::Coord c = ms::a_coord(lane, reg, 0);
          a[mt][reg] = *reinterpret_cast<const uint32_t*>(&s.a[warp_m * kWarpM + mt * ms::kTileM + c.row][c.col]);
        }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const ms::Coord c = ms::b_coord(lane, reg, 0);
          b[nt][reg] = *reinterpret_cast<const uint32_t*>(&s.b[warp_n * kWarpN + nt * ms::kTileN + c.col][c.row]);
        }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        mma_sp_16832<T, 0>(acc[0][nt], a[0], b[nt], meta);
        mma_sp_16832<T, 1>(acc[1][nt], a[1], b[nt], meta);
      }
    }
  }
  cp_async_wait<0>();

  if (!warp_active) return;
  // Epilogue: bias, activation, residual in float; one rounding to T. D[o, p] goes to out[p, o].
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const ms::Coord c = ms::c_coord(lane, i);
        const int64_t o = m0 + warp_m * kWarpM + mt * ms::kTileM + c.row;
        const int64_t p = p0 + warp_n * kWarpN + nt * ms::kTileN + c.col;
        if (p >= prm.p) continue;
        float v = acc[mt][nt][i];
        if (prm.bias != nullptr) v += to_float(prm.bias[o]);
        v = apply_activation(v, prm.activation);
        if (prm.residual != nullptr) v += to_float(prm.residual[residual_offset(prm.res, p, o)]);
        prm.out[p * prm.m + o] = from_float<T>(v);
      }
}

#if !defined(PRUNEDM_NVRTC)  // NVRTC compiles device code only (csrc/cuda/nvrtc_entry.cu): no streams, no <<<>>>
// Launches the kernel over out [P, M] (nothing to do when P == 0).
template <typename T, bool kConv>
void launch_sparse_gemm(const Params<T>& prm, cudaStream_t stream) {
  if (prm.p == 0) return;
  const dim3 grid(unsigned((prm.p + kBlockN - 1) / kBlockN), unsigned((prm.m + kBlockM - 1) / kBlockM));
  sparse_gemm_kernel<T, kConv><<<grid, kThreads, 0, stream>>>(prm);
}
#endif

}  // namespace sparse_gemm_cuda
}  // namespace prunedm
