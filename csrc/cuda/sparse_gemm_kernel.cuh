// The 2:4 sparse GEMM kernel behind sparse_linear_2to4 (csrc/cuda/sparse_mm.cu) and
// sparse_conv2d_2to4 (csrc/cuda/sparse_conv.cu):
//   out[p, o] = act(sum_k W[o, k] B[k, p] + bias[o]) + residual[p, o]
// with W packed by compress_2to4 (values [M, K/2], int16 metadata in the sm80 layout) and B either
// X^T for a linear layer (X [P, K] row-major) or the implicit-GEMM gather of an NHWC input.
//
// Tiling (prunedm/sparse_gemm.h, namespace mma_sp::cta, where the CPU warp simulation reads it): a
// 128-thread block computes 128 output features x 128 columns; each of its 4 warps 64 x 64, i.e. 4 m16
// tiles x 8 n8 tiles of mma.sp.m16n8k32 per 32-wide k step. K advances 32 dense (16 kept) columns per
// stage through a 3-deep cp.async pipeline in (static, 37.5 KiB) shared memory: values [128][16], B
// [128 columns][32 k] and the 128 metadata words (four 32-row tiles) of the stage, A and B swizzled in
// 16-byte units so that cp.async stores and ldmatrix reads are free of bank conflicts. Every source
// pointer is set up once and advanced by one stage per iteration: no 64-bit index arithmetic, division
// or modulo in the k loop (the conv's tap position advances by 32 channels without dividing).
// A warp's 64 rows are two metadata tiles, so lane L's registers are word L of each (prunedm/sparse_gemm.h
// explains why) and the m16 tiles use selectors 0, 1, 0, 1. A and B fragments are read with ldmatrix.x4.
// The epilogue stages each warp's tile through shared memory and stores 16 bytes per lane.
// Split-K (prunedm/split_k.h; small P, e.g. adaLN GEMMs whose P is the batch): gridDim.z CTAs share a tile's
// K, each starting its pointers at its first chunk (the k loop itself is unchanged), and store fp32 partials;
// split_k_reduce_kernel sums them in split order and applies the fused epilogue once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "prunedm/implicit_gemm.h"
#include "prunedm/sparse_gemm.h"
#include "prunedm/split_k.h"

namespace prunedm {
namespace sparse_gemm_cuda {

namespace ms = mma_sp;
namespace cta = mma_sp::cta;

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
  float* workspace;          // split-K (gridDim.z > 1): fp32 partials (split_k.h); else nullptr
};

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy of a source known to be in range.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
#endif
}

// 16-byte zero-filling copy for the conv gather (padding taps read nothing and store zeros).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}

// Four 8x8 b16 matrices from shared memory (cta::a_ldsm_source / b_ldsm_source say which lane gives which row).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ uint32_t lds_32(uint32_t addr) {
  uint32_t v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
#endif
  return v;
}

// The A (values) and metadata copies of one thread: source pointers set once, advanced by one stage each time.
// Rows past M read a valid row instead (M % 32 == 0: whole metadata tiles); their results are never stored.
template <typename T>
struct ALoader {
  const T* values[cta::kACopies];
  const uint32_t* meta;  // threads < cta::kMetaThreads
  int64_t meta_step;     // words per stage: M

  // Pointers at k chunk `chunk0` (the CTA's split-K start; 0 without split-K).
  __device__ __forceinline__ ALoader(const Params<T>& prm, int64_t m0, int tid, int chunk0) : meta_step(prm.m) {
#pragma unroll
    for (int i = 0; i < cta::kACopies; ++i) {
      const ms::Coord c = cta::a_copy(tid, i);
      const int64_t row = m0 + c.row < prm.m ? m0 + c.row : prm.m - 1;
      values[i] = prm.values + ms::value_offset(row, chunk0, 8 * c.col, prm.k);
    }
    const int64_t row32 = m0 + ms::kMetaRowTile * (tid / 8);
    meta = prm.meta + ms::meta_word_offset(row32 < prm.m ? row32 : prm.m - ms::kMetaRowTile, chunk0, prm.m) +
           4 * (tid % 8);
  }
  // Copies one stage to the thread's A destination `dst_a` (stage base + its swizzled unit) and metadata.
  __device__ __forceinline__ void load(uint32_t stage, uint32_t dst_a, int tid) {
#pragma unroll
    for (int i = 0; i < cta::kACopies; ++i) {
      cp_async_16(dst_a + i * (cta::kThreads / cta::kAChunks) * cta::kAChunks * cta::kUnit, values[i]);
      values[i] += ms::kKeptK;
    }
    if (tid < cta::kMetaThreads) {
      cp_async_16(stage + cta::kMetaOffset + cta::kUnit * tid, meta);
      meta += meta_step;
    }
  }
};

// B of a linear layer: X [P, K] row-major, column p of B is row p of X. Columns past P read row P - 1.
template <typename T>
struct LinearBLoader {
  const T* src[cta::kBCopies];

  __device__ __forceinline__ LinearBLoader(const Params<T>& prm, int64_t p0, int tid, int chunk0) {
#pragma unroll
    for (int i = 0; i < cta::kBCopies; ++i) {
      const ms::Coord c = cta::b_copy(tid, i);
      const int64_t p = p0 + c.row < prm.p ? p0 + c.row : prm.p - 1;
      src[i] = prm.b + p * prm.k + int64_t(chunk0) * cta::kBlockK + 8 * c.col;
    }
  }
  __device__ __forceinline__ void load(uint32_t dst_b, const Params<T>&) {
#pragma unroll
    for (int i = 0; i < cta::kBCopies; ++i) {
      cp_async_16(dst_b + i * (cta::kThreads / cta::kBChunks) * cta::kBChunks * cta::kUnit, src[i]);
      src[i] += cta::kBlockK;
    }
  }
};

// B of a convolution (implicit GEMM, prunedm/implicit_gemm.h) from an NHWC input, Cin % 8 == 0: each column
// keeps its pixel origin (one division each, before the loop) and a thread's columns share one tap cursor
// (their chunk) that moves on 32 channels per stage without dividing. Columns past P read column P - 1.
template <typename T>
struct ConvBLoader {
  ConvColumnOrigin origin[cta::kBCopies];
  ConvTapCursor tap;

  __device__ __forceinline__ ConvBLoader(const Params<T>& prm, int64_t p0, int tid, int chunk0) : tap(prm.conv) {
#pragma unroll
    for (int i = 0; i < cta::kBCopies; ++i) {
      const int64_t p = p0 + cta::b_copy(tid, i).row;
      origin[i] = conv_column_origin(prm.conv, p < prm.p ? p : prm.p - 1);
    }
    tap.advance(prm.conv, chunk0 * cta::kBlockK + 8 * cta::b_copy(tid, 0).col);
  }
  // The copy of a padding tap has src-size 0: it reads nothing and zero-fills, so its (outside) address is
  // never dereferenced, as in CUTLASS's cp_async_zfill (a select back into the input would cost 0.65 more
  // instructions per HMMA.SP).
  __device__ __forceinline__ void load(uint32_t dst_b, const Params<T>& prm) {
    const T* tap_base = prm.b + tap.offset;
#pragma unroll
    for (int i = 0; i < cta::kBCopies; ++i)
      cp_async_16(dst_b + i * (cta::kThreads / cta::kBChunks) * cta::kBChunks * cta::kUnit, tap_base + origin[i].offset,
                  tap.inside(prm.conv, origin[i]));
    tap.advance(prm.conv, cta::kBlockK);
  }
};

// The B loader of a kernel (no std::conditional_t: NVRTC may compile without the standard headers).
template <typename T, bool kConv>
struct BLoader {
  using type = LinearBLoader<T>;
};
template <typename T>
struct BLoader<T, true> {
  using type = ConvBLoader<T>;
};

// The last step of every epilogue: out[p, o..o+7] = v + residual, in float, rounded once to T, one 16-byte store.
template <typename T>
__device__ __forceinline__ void store_output8(const Params<T>& prm, int64_t p, int64_t o, float (&v)[8]) {
  if (prm.residual != nullptr) {
    const T* r = prm.residual + residual_offset(prm.res, p, o);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] += to_float(r[j * prm.res.stride_c]);
  }
  alignas(16) T packed[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) packed[j] = from_float<T>(v[j]);
  *reinterpret_cast<uint4*>(prm.out + p * prm.m + o) = *reinterpret_cast<const uint4*>(packed);
}

// kSplitK: the split-K instance (gridDim.z CTAs per tile, fp32 partials to prm.workspace). A separate
// instance, not a runtime branch: nvcc 13's register allocation for sm_90a costs the k loop 10 more
// instructions when one kernel holds both epilogues.
template <typename T, bool kConv, bool kSplitK = false>
__global__ void __launch_bounds__(cta::kThreads) sparse_gemm_kernel(const Params<T> prm) {
  __shared__ alignas(128) unsigned char smem[cta::kStages * cta::kStageBytes];
  const int tid = threadIdx.x, lane = tid % ms::kWarpSize, warp = tid / ms::kWarpSize;
  const int warp_m = warp % cta::kWarpsM, warp_n = warp / cta::kWarpsM;
  const int64_t m0 = int64_t(blockIdx.y) * cta::kBlockM, p0 = int64_t(blockIdx.x) * cta::kBlockN;
  // Split-K: CTA z of gridDim.z computes k chunks [begin, end) into an fp32 partial (split_k.h).
  const int chunks = int(prm.k / cta::kBlockK);
  const split_k::ChunkRange range =
      kSplitK ? split_k::chunk_range(chunks, gridDim.z, blockIdx.z) : split_k::ChunkRange{0, chunks};

  ALoader<T> a_loader(prm, m0, tid, range.begin);
  typename BLoader<T, kConv>::type b_loader(prm, p0, tid, range.begin);
  // Per-thread byte offsets inside a stage: cp.async destinations and ldmatrix / metadata sources.
  const ms::Coord ac = cta::a_copy(tid, 0), bc = cta::b_copy(tid, 0);
  const uint32_t dst_a = cta::kAOffset + cta::kUnit * cta::a_unit(ac.row, ac.col);
  const uint32_t dst_b = cta::kBOffset + cta::kUnit * cta::b_unit(bc.row, bc.col);
  const ms::Coord al = cta::a_ldsm_source(lane), bl = cta::b_ldsm_source(lane);
  const uint32_t src_a = cta::kAOffset + cta::kUnit * cta::a_unit(warp_m * cta::kWarpM + al.row, al.col);
  const uint32_t src_b = cta::kBOffset + cta::kUnit * cta::b_unit(warp_n * cta::kWarpN + bl.row, bl.col);
  const uint32_t src_meta = cta::kMetaOffset + 4 * (warp_m * cta::kWarpM + lane);

  float acc[cta::kMTiles][cta::kNTiles][4];
#pragma unroll
  for (int i = 0; i < cta::kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < cta::kNTiles; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  const uint32_t first = shared_address(smem), last = first + (cta::kStages - 1) * cta::kStageBytes;
#pragma unroll
  for (int s = 0; s < cta::kStages - 1; ++s) {
    if (range.begin + s < range.end) {
      const uint32_t stage = first + s * cta::kStageBytes;
      a_loader.load(stage, stage + dst_a, tid);
      b_loader.load(stage + dst_b, prm);
    }
    cp_async_commit();
  }

  uint32_t read = first, write = last;
  for (int kc = range.begin; kc < range.end; ++kc) {
    cp_async_wait<cta::kStages - 2>();
    __syncthreads();  // stage kc is visible to all, and stage kc - 1 is no longer being read
    if (kc + cta::kStages - 1 < range.end) {
      a_loader.load(write, write + dst_a, tid);
      b_loader.load(write + dst_b, prm);
    }
    cp_async_commit();

    // A warp's 64 rows are two metadata tiles: lane L's register is word L of each (prunedm/sparse_gemm.h).
    const uint32_t meta[2] = {lds_32(read + src_meta), lds_32(read + src_meta + 4 * ms::kMetaRowTile)};
    uint32_t a[cta::kMTiles][4], b[cta::kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < cta::kMTiles; ++mt)  // +16 rows = +32 units; the swizzle keeps
      ldsm_x4(a[mt], read + src_a + mt * ms::kTileM * cta::kAChunks * cta::kUnit);
#pragma unroll
    for (int nt = 0; nt < cta::kNTiles; ++nt)  // +8 columns = +32 units
      ldsm_x4(b[nt], read + src_b + nt * ms::kTileN * cta::kBChunks * cta::kUnit);
#pragma unroll
    for (int nt = 0; nt < cta::kNTiles; ++nt)
#pragma unroll
      for (int mt = 0; mt < cta::kMTiles; mt += 2) {
        mma_sp_16832<T, 0>(acc[mt][nt], a[mt], b[nt], meta[mt / 2]);
        mma_sp_16832<T, 1>(acc[mt + 1][nt], a[mt + 1], b[nt], meta[mt / 2]);
      }
    read = read == last ? first : read + cta::kStageBytes;
    write = write == last ? first : write + cta::kStageBytes;
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages' memory becomes the epilogue's

  // Epilogue: bias and activation in float per fragment, staged per warp as [column][feature] floats; then
  // 8 consecutive features of a column per lane: residual in float, one rounding to T, one 16-byte store.
  // A split-K partial instead stores its raw fp32 fragments to the workspace (column pairs 2t, 2t + 1 as one
  // 8-byte store, no shared-memory round trip) and leaves bias, activation and residual to
  // split_k_reduce_kernel, which applies them once, after the sum.
  if (kSplitK) {
#pragma unroll
    for (int mt = 0; mt < cta::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < cta::kNTiles; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const ms::Coord c = ms::c_coord(lane, 2 * h);
          const int64_t o = m0 + warp_m * cta::kWarpM + mt * ms::kTileM + c.row;
          const int64_t p = p0 + warp_n * cta::kWarpN + nt * ms::kTileN + c.col;
          if (o < prm.m && p < prm.p)
            *reinterpret_cast<float2*>(prm.workspace + split_k::workspace_offset(blockIdx.z, o, p, prm.m, prm.p)) =
                make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        }
    return;
  }
  const int g = lane / 4;
  float bias[cta::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < cta::kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t o = m0 + warp_m * cta::kWarpM + mt * ms::kTileM + g + 8 * h;
      bias[mt][h] = prm.bias != nullptr && o < prm.m ? to_float(prm.bias[o]) : 0.f;
    }
  float* stage = reinterpret_cast<float*>(smem) + warp * cta::kEpiColumns * cta::kEpiPitch;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int mt = 0; mt < cta::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < cta::kNTiles / 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const ms::Coord c = ms::c_coord(lane, i);
          const float v = apply_activation(acc[mt][half * cta::kNTiles / 2 + nt][i] + bias[mt][i >> 1], prm.activation);
          stage[(nt * ms::kTileN + c.col) * cta::kEpiPitch + mt * ms::kTileM + c.row] = v;
        }
    __syncwarp();
#pragma unroll
    for (int step = 0; step < cta::kEpiSteps; ++step) {
      const ms::Coord e = cta::epi_store(lane, step);
      const int64_t p = p0 + warp_n * cta::kWarpN + half * cta::kEpiColumns + e.row;
      const int64_t o = m0 + warp_m * cta::kWarpM + e.col;
      if (p >= prm.p || o >= prm.m) continue;
      const float4 lo = *reinterpret_cast<const float4*>(&stage[e.row * cta::kEpiPitch + e.col]);
      const float4 hi = *reinterpret_cast<const float4*>(&stage[e.row * cta::kEpiPitch + e.col + 4]);
      float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      store_output8(prm, p, o, v);
    }
    __syncwarp();
  }
}

// The deterministic split-K reduction (split_k.h): item i sums the partials of its (p, o..o+7) over splits
// 0, 1, ..., splits - 1 in that order, then applies bias and activation, residual and the rounding as the
// unsplit epilogue does. Consecutive threads take consecutive columns p, so each partial load is coalesced.
template <typename T>
__global__ void __launch_bounds__(split_k::kReduceThreads) split_k_reduce_kernel(const Params<T> prm, int splits) {
  const int64_t item = int64_t(blockIdx.x) * split_k::kReduceThreads + threadIdx.x;
  if (item >= split_k::reduce_items(prm.p, prm.m)) return;
  const split_k::ReduceItem it = split_k::reduce_item(item, prm.p);
  const int64_t feature_stride = split_k::workspace_offset(0, 1, 0, prm.m, prm.p);
  const int64_t split_stride = split_k::workspace_offset(1, 0, 0, prm.m, prm.p);
  const float* w = prm.workspace + split_k::workspace_offset(0, it.o, it.p, prm.m, prm.p);
  float v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = w[j * feature_stride];
  for (int s = 1; s < splits; ++s) {
    w += split_stride;
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] += w[j * feature_stride];
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    v[j] = apply_activation(v[j] + (prm.bias != nullptr ? to_float(prm.bias[it.o + j]) : 0.f), prm.activation);
  store_output8(prm, it.p, it.o, v);
}

#if !defined(PRUNEDM_NVRTC)  // NVRTC compiles device code only (csrc/cuda/nvrtc_entry.cu): no streams, no <<<>>>
// Launches the kernel over out [P, M] (nothing to do when P == 0) with `splits` k splits: splits > 1 needs
// prm.workspace (split_k::workspace_elements floats) and runs split_k_reduce_kernel after the GEMM on the same stream.
template <typename T, bool kConv>
void launch_sparse_gemm(const Params<T>& prm, int splits, cudaStream_t stream) {
  if (prm.p == 0) return;
  const dim3 grid(unsigned((prm.p + cta::kBlockN - 1) / cta::kBlockN),
                  unsigned((prm.m + cta::kBlockM - 1) / cta::kBlockM), unsigned(splits));
  if (splits == 1) {
    sparse_gemm_kernel<T, kConv><<<grid, cta::kThreads, 0, stream>>>(prm);
  } else {
    sparse_gemm_kernel<T, kConv, true><<<grid, cta::kThreads, 0, stream>>>(prm);
    const int64_t items = split_k::reduce_items(prm.p, prm.m);
    const unsigned blocks = unsigned((items + split_k::kReduceThreads - 1) / split_k::kReduceThreads);
    split_k_reduce_kernel<T><<<blocks, split_k::kReduceThreads, 0, stream>>>(prm, splits);
  }
}
#endif

}  // namespace sparse_gemm_cuda
}  // namespace prunedm
