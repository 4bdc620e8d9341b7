// Torch-free partition logic of the 2:4 GEMM's split-K (csrc/cuda/sparse_gemm_kernel.cuh): how many CTAs
// share one output tile's K when the tile grid is too small to fill the GPU (adaLN-like GEMMs: P = batch
// rows), which k chunks each gets, where its fp32 partial tile goes, and how the reduction kernel walks the
// partials. Deterministic by construction: no atomics; the reduction adds split 0, 1, ..., splits - 1 in
// that order for every output, so the same input and split count give bit-identical output on every run.
// test_sparse_gemm_cta.cpp simulates whole split-K launches (all CTAs of all splits, then the reduction)
// with these functions.
#pragma once

#include <cstdint>

#include "prunedm/sparse_gemm.h"

namespace prunedm {
namespace split_k {

constexpr int kMaxSplits = 16;
// At least 4 k chunks (128 dense k) per split: one more than the pipeline's stages, so a split's prologue
// is not all it does and its partial tile (64 KiB of fp32) is written for a real share of the K work.
constexpr int kMinChunksPerSplit = 4;

// The heuristic: split only when the (P / 128) x (M / 128) tile grid leaves more than half of the SMs
// idle; then as many splits as keep the whole launch within one wave of one CTA per SM (tiles x splits <=
// SMs), each split holding at least kMinChunksPerSplit chunks, at most kMaxSplits. Partials cost
// 2 x splits x P x M x 4 bytes of extra traffic, small next to the weights' M x K bytes exactly when the
// grid is small (few P columns). sm_count <= 0 (unknown) means no split.
PRUNEDM_HD int choose_splits(int64_t p, int64_t m, int64_t k, int sm_count) {
  const int64_t tiles = ((p + mma_sp::cta::kBlockN - 1) / mma_sp::cta::kBlockN) *
                        ((m + mma_sp::cta::kBlockM - 1) / mma_sp::cta::kBlockM);
  if (tiles <= 0 || sm_count <= 0 || 2 * tiles > sm_count) return 1;
  int64_t splits = sm_count / tiles;
  const int64_t by_k = (k / mma_sp::cta::kBlockK) / kMinChunksPerSplit;
  if (splits > by_k) splits = by_k;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : int(splits);
}

// The k chunks [begin, end) of split `split` of `splits` over `chunks` kBlockK-wide chunks: contiguous,
// covering every chunk once, sizes differing by at most one, none empty when splits <= chunks (the caller
// guarantees it; choose_splits does). Boundaries are chunk (kBlockK) multiples.
struct ChunkRange {
  int begin, end;
};
PRUNEDM_HD ChunkRange chunk_range(int chunks, int splits, int split) {
  // 32-bit: split * chunks < 2^31 for any K a GPU holds (chunks = K / 32, splits <= kMaxSplits); the kernel
  // keeps the result in uniform registers, so the k loop compiles as without split-K.
  return {split * chunks / splits, (split + 1) * chunks / splits};
}

// The workspace: fp32 partials [splits, M, pitch], pitch = P rounded up to even, because a CTA stores each
// accumulator pair (columns 2t, 2t + 1 of an mma.sp C fragment, row o) as one 8-byte store straight from its
// registers. Element offset of (split, output feature o, GEMM column p):
PRUNEDM_HD int64_t workspace_pitch(int64_t p_total) { return p_total + (p_total & 1); }
PRUNEDM_HD int64_t workspace_offset(int split, int64_t o, int64_t p, int64_t m, int64_t p_total) {
  return (int64_t(split) * m + o) * workspace_pitch(p_total) + p;
}
PRUNEDM_HD int64_t workspace_elements(int splits, int64_t p_total, int64_t m) {
  return int64_t(splits) * m * workspace_pitch(p_total);
}

// The reduction kernel: one thread per item = 8 consecutive output features o..o+7 of one column p
// (M % 8 == 0), items numbered column-fastest (item = (o / 8) P + p) so that consecutive threads read
// consecutive workspace columns; kReduceThreads per block.
constexpr int kReduceVector = 8, kReduceThreads = 256;
PRUNEDM_HD int64_t reduce_items(int64_t p_total, int64_t m) { return p_total * (m / kReduceVector); }
struct ReduceItem {
  int64_t p, o;  // column and first output feature
};
PRUNEDM_HD ReduceItem reduce_item(int64_t item, int64_t p_total) {
  return {item % p_total, kReduceVector * (item / p_total)};
}

}  // namespace split_k
}  // namespace prunedm
