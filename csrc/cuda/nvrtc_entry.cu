// The translation unit NVRTC compiles at first use when prunedm._C was built without CUDA (no nvcc at
// install time): prunedm/ops/_nvrtc.py inlines the quoted includes below into one source (so its hash
// covers every header it uses), compiles it with -DPRUNEDM_NVRTC=1 -std=c++17 for the GPU's arch and
// launches the kernels with cupy. Torch-free: only the CUDA fp16/bf16 headers and our prunedm/*.h.
//
// In the extension build (setup.py compiles csrc/cuda/*.cu) PRUNEDM_NVRTC is undefined and this file
// is empty. tests/ops/test_nvrtc.py compiles the assembled source with nvcc (-ptx, sm_80 and sm_90a)
// both with the host's C++ headers and with the fallbacks below, as NVRTC without them sees it.
#if defined(PRUNEDM_NVRTC)

// NVRTC has no C++ standard library headers unless the toolkit brings them; the kernels need only
// fixed-width integers and std::is_same_v. The loader strips <cstdint>/<type_traits>/<math.h> from
// the inlined headers (device math functions are NVRTC builtins), so these are the only source.
#if !defined(PRUNEDM_NVRTC_NO_STD) && __has_include(<cstdint>) && __has_include(<type_traits>)
#include <cstdint>
#include <type_traits>
#else
#if defined(_WIN32)
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
typedef long int64_t;  // LP64, as NVRTC's integer sizes follow the host (NVRTC guide, "Integer Size")
typedef unsigned long uint64_t;
#endif
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef uint64_t uintptr_t;
// nvcc (the tests) force-includes cuda_runtime.h, which brings the host's <type_traits> along.
#if !defined(_GLIBCXX_TYPE_TRAITS) && !defined(_LIBCPP_TYPE_TRAITS)
namespace std {
template <typename A, typename B>
struct is_same {
  static constexpr bool value = false;
};
template <typename A>
struct is_same<A, A> {
  static constexpr bool value = true;
};
template <typename A, typename B>
inline constexpr bool is_same_v = is_same<A, B>::value;
}  // namespace std
#endif
#endif

#include "sparse_gemm_kernel.cuh"

namespace prunedm {
namespace sparse_gemm_cuda {

// prunedm/ops/_nvrtc.py packs Params<T> into kernel-argument bytes at these offsets (248 bytes, 8-aligned).
// Checked when nvcc compiles this source (tests/ops/test_nvrtc.py); NVRTC itself has no __builtin_offsetof.
#if !defined(__CUDACC_RTC__)
#define PRUNEDM_CHECK_OFFSET(field, offset) \
  static_assert(__builtin_offsetof(Params<__half>, field) == (offset), "Params layout changed: update _nvrtc.py")
PRUNEDM_CHECK_OFFSET(values, 0);
PRUNEDM_CHECK_OFFSET(meta, 8);
PRUNEDM_CHECK_OFFSET(b, 16);
PRUNEDM_CHECK_OFFSET(bias, 24);
PRUNEDM_CHECK_OFFSET(residual, 32);
PRUNEDM_CHECK_OFFSET(out, 40);
PRUNEDM_CHECK_OFFSET(m, 48);
PRUNEDM_CHECK_OFFSET(p, 56);
PRUNEDM_CHECK_OFFSET(k, 64);
PRUNEDM_CHECK_OFFSET(activation, 72);
PRUNEDM_CHECK_OFFSET(res, 80);
PRUNEDM_CHECK_OFFSET(conv, 128);
PRUNEDM_CHECK_OFFSET(workspace, 240);
#undef PRUNEDM_CHECK_OFFSET
#endif
static_assert(sizeof(ResidualLayout) == 48 && sizeof(ConvGeometry) == 112, "Params layout changed: update _nvrtc.py");
static_assert(sizeof(Params<__half>) == 248 && alignof(Params<__half>) == 8, "Params layout changed: update _nvrtc.py");
static_assert(sizeof(Params<__nv_bfloat16>) == 248, "Params layout changed: update _nvrtc.py");
static_assert(cta::kStages * cta::kStageBytes <= 48 * 1024, "static shared memory: the loader launches with 0 dynamic");
static_assert(cta::kThreads == 128 && cta::kBlockM == 128 && cta::kBlockN == 128,
              "launch geometry changed: update _nvrtc.py (THREADS, BLOCK_M, BLOCK_N)");

// The four kernels the loader looks up, by these name expressions (prunedm/ops/_nvrtc.py KERNELS).
template __global__ void sparse_gemm_kernel<__half, false>(const Params<__half>);
template __global__ void sparse_gemm_kernel<__half, true>(const Params<__half>);
template __global__ void sparse_gemm_kernel<__nv_bfloat16, false>(const Params<__nv_bfloat16>);
template __global__ void sparse_gemm_kernel<__nv_bfloat16, true>(const Params<__nv_bfloat16>);
// Split-K (the extension launches it, and bench.sass reads it; the NVRTC loader runs without split-K).
template __global__ void sparse_gemm_kernel<__half, false, true>(const Params<__half>);
template __global__ void sparse_gemm_kernel<__half, true, true>(const Params<__half>);
template __global__ void sparse_gemm_kernel<__nv_bfloat16, false, true>(const Params<__nv_bfloat16>);
template __global__ void sparse_gemm_kernel<__nv_bfloat16, true, true>(const Params<__nv_bfloat16>);
template __global__ void split_k_reduce_kernel<__half>(const Params<__half>, int);
template __global__ void split_k_reduce_kernel<__nv_bfloat16>(const Params<__nv_bfloat16>, int);

}  // namespace sparse_gemm_cuda
}  // namespace prunedm

#endif  // PRUNEDM_NVRTC
