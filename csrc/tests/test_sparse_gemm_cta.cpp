// Unit tests of the CUDA kernel's CTA tile (prunedm/sparse_gemm.h, namespace mma_sp::cta) and of the conv
// gather's incremental form (prunedm/implicit_gemm.h): every stage copy lands once, cp.async and ldmatrix
// phases are free of shared-memory bank conflicts, and whole CTAs simulated on the CPU - copies through the
// swizzle with the kernel's advancing pointers, ldmatrix as the PTX ISA defines it, metadata words, mma.sp
// from the literal fragment formulas, the staged epilogue - rebuild every weight and produce the exact product.
#include <prunedm/implicit_gemm.h>
#include <prunedm/sparse24.h>
#include <prunedm/sparse_gemm.h>
#include <prunedm/split_k.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "check.h"
#include "mma_sp_model.h"

namespace ms = prunedm::mma_sp;
namespace cta = prunedm::mma_sp::cta;

namespace {

using mma_sp_model::Packed;

constexpr int kWarps = cta::kThreads / ms::kWarpSize;
constexpr int kCopyStrideA = (cta::kThreads / cta::kAChunks) * cta::kAChunks;  // units between a thread's copies
constexpr int kCopyStrideB = (cta::kThreads / cta::kBChunks) * cta::kBChunks;

// 8 16-byte accesses (one phase of a 128-bit cp.async or of an ldmatrix matrix) use all 32 banks once.
bool conflict_free(const std::array<int, 8>& units) {
  std::set<int> banks;
  for (int u : units) banks.insert(u % 8);
  return banks.size() == 8;
}

void test_stage_copies_land_once_without_conflicts() {
  std::vector<int> a_hits(cta::kBlockM * cta::kAChunks), b_hits(cta::kBlockN * cta::kBChunks);
  for (int tid = 0; tid < cta::kThreads; ++tid) {
    for (int i = 0; i < cta::kACopies; ++i) {
      const ms::Coord c = cta::a_copy(tid, i);
      CHECK(c.row < cta::kBlockM && c.col < cta::kAChunks && c.col == cta::a_copy(tid, 0).col);
      // The kernel stores copy i at the thread's base + i * kCopyStrideA units.
      CHECK_EQ(cta::a_unit(c.row, c.col), cta::a_unit(cta::a_copy(tid, 0).row, c.col) + i * kCopyStrideA);
      ++a_hits[cta::a_unit(c.row, c.col)];
    }
    for (int i = 0; i < cta::kBCopies; ++i) {
      const ms::Coord c = cta::b_copy(tid, i);
      CHECK(c.row < cta::kBlockN && c.col < cta::kBChunks && c.col == cta::b_copy(tid, 0).col);
      CHECK_EQ(cta::b_unit(c.row, c.col), cta::b_unit(cta::b_copy(tid, 0).row, c.col) + i * kCopyStrideB);
      ++b_hits[cta::b_unit(c.row, c.col)];
    }
  }
  for (int h : a_hits) CHECK_EQ(h, 1);
  for (int h : b_hits) CHECK_EQ(h, 1);
  CHECK_EQ(cta::kMetaThreads * cta::kUnit, cta::kMetaWords * 4);
  CHECK_EQ(cta::kStageBytes % 128, 0);
  // cp.async of 16 bytes: each quarter warp (8 consecutive threads) is one phase.
  for (int q = 0; q < cta::kThreads / 8; ++q)
    for (int i = 0; i < cta::kBCopies; ++i) {
      std::array<int, 8> a{}, b{};
      for (int t = 0; t < 8; ++t) {
        b[t] = cta::b_unit(cta::b_copy(8 * q + t, i).row, cta::b_copy(8 * q + t, i).col);
        if (i < cta::kACopies) a[t] = cta::a_unit(cta::a_copy(8 * q + t, i).row, cta::a_copy(8 * q + t, i).col);
      }
      if (i < cta::kACopies) CHECK(conflict_free(a));
      CHECK(conflict_free(b));
    }
}

void test_ldmatrix_sources_are_conflict_free_and_match_fragments() {
  for (int lane = 0; lane < 32; ++lane)
    for (int half = 0; half < 2; ++half) {
      const ms::Coord e = cta::ldsm_element(lane, half);
      for (int j = 0; j < 4; ++j) {
        // Matrix j's row e.row comes from lane 8 j + e.row: for A that is row .. of unit ..; it must be the
        // element a_coord / b_coord put in register j.
        const ms::Coord as = cta::a_ldsm_source(8 * j + e.row), bs = cta::b_ldsm_source(8 * j + e.row);
        const ms::Coord af = ms::a_coord(lane, j, half), bf = ms::b_coord(lane, j, half);
        CHECK_EQ(as.row, af.row);
        CHECK_EQ(8 * as.col + e.col, af.col);
        CHECK_EQ(bs.row, bf.col);                // B's matrix rows are columns (n)
        CHECK_EQ(8 * bs.col + e.col, bf.row);    // and its 16-byte units run along k
      }
    }
  for (int wm = 0; wm < cta::kWarpsM; ++wm)
    for (int j = 0; j < 4; ++j) {
      for (int mt = 0; mt < cta::kMTiles; ++mt) {
        std::array<int, 8> units{};
        for (int r = 0; r < 8; ++r) {
          const ms::Coord s = cta::a_ldsm_source(8 * j + r);
          units[r] = cta::a_unit(wm * cta::kWarpM + mt * ms::kTileM + s.row, s.col);
          // The kernel adds mt * 16 rows as a constant byte offset to tile 0's address.
          CHECK_EQ(units[r], cta::a_unit(wm * cta::kWarpM + s.row, s.col) + mt * ms::kTileM * cta::kAChunks);
        }
        CHECK(conflict_free(units));
      }
    }
  for (int wn = 0; wn < cta::kBlockN / cta::kWarpN; ++wn)
    for (int j = 0; j < 4; ++j)
      for (int nt = 0; nt < cta::kNTiles; ++nt) {
        std::array<int, 8> units{};
        for (int r = 0; r < 8; ++r) {
          const ms::Coord s = cta::b_ldsm_source(8 * j + r);
          units[r] = cta::b_unit(wn * cta::kWarpN + nt * ms::kTileN + s.row, s.col);
          CHECK_EQ(units[r], cta::b_unit(wn * cta::kWarpN + s.row, s.col) + nt * ms::kTileN * cta::kBChunks);
        }
        CHECK(conflict_free(units));
      }
}

void test_epilogue_staging_covers_the_tile() {
  // The fragment stores: each (column, row) of a half tile once, one 32-bit store per lane without conflicts.
  std::vector<int> hits(cta::kEpiColumns * cta::kEpiPitch);
  for (int mt = 0; mt < cta::kMTiles; ++mt)
    for (int nt = 0; nt < cta::kNTiles / 2; ++nt)
      for (int i = 0; i < 4; ++i) {
        std::set<int> banks;
        for (int lane = 0; lane < 32; ++lane) {
          const ms::Coord c = ms::c_coord(lane, i);
          const int word = (nt * ms::kTileN + c.col) * cta::kEpiPitch + mt * ms::kTileM + c.row;
          ++hits[word];
          banks.insert(word % 32);
        }
        CHECK_EQ(banks.size(), size_t{32});
      }
  for (int col = 0; col < cta::kEpiColumns; ++col)
    for (int row = 0; row < cta::kEpiPitch; ++row)
      CHECK_EQ(hits[col * cta::kEpiPitch + row], row < cta::kWarpM ? 1 : 0);
  // The 16-byte reads: 8 consecutive rows of one column each, every (column, 8-row group) once.
  std::vector<int> reads(cta::kEpiColumns * cta::kWarpM / 8);
  for (int step = 0; step < cta::kEpiSteps; ++step)
    for (int lane = 0; lane < 32; ++lane) {
      const ms::Coord e = cta::epi_store(lane, step);
      CHECK(e.row < cta::kEpiColumns && e.col % 8 == 0 && e.col < cta::kWarpM);
      CHECK_EQ((e.row * cta::kEpiPitch + e.col) % 4, 0);  // 16-byte aligned float4 reads
      ++reads[e.row * (cta::kWarpM / 8) + e.col / 8];
    }
  for (int r : reads) CHECK_EQ(r, 1);
}

// One CTA grid of the linear kernel, simulated: returns out [P, M] as floats (NaN where never written). With
// splits > 1, the split-K launch: the grid's gridDim.z = splits CTAs per tile each run their k chunks
// (split_k::chunk_range) from pointers set at the first one, store raw fp32 fragments to the workspace, and the
// reduction kernel's items sum them in split order and apply the bias.
std::vector<float> simulate_linear(const Packed& w, const std::vector<float>& x, const std::vector<float>& bias,
                                   int64_t P, std::vector<float>& rebuilt, int splits = 1) {
  static const mma_sp_model::Owners own;
  const int64_t M = w.rows, K = w.cols;
  const int chunks = int(K / cta::kBlockK);
  const std::vector<uint32_t> words = mma_sp_model::as_words(w.meta);
  std::vector<float> out(P * M, NAN);
  std::vector<int> written(P * M, 0);
  std::vector<float> workspace(splits > 1 ? prunedm::split_k::workspace_elements(splits, P, M) : 0, NAN);
  std::vector<int> ws_written(workspace.size(), 0);
  std::vector<int> chunk_hits(chunks, 0);
  for (int split = 0; split < splits; ++split) {
    const prunedm::split_k::ChunkRange range = prunedm::split_k::chunk_range(chunks, splits, split);
    CHECK(range.begin < range.end);  // every split non-empty
    for (int kc = range.begin; kc < range.end; ++kc) ++chunk_hits[kc];
    for (int64_t m0 = 0; m0 < M; m0 += cta::kBlockM)
      for (int64_t p0 = 0; p0 < P; p0 += cta::kBlockN) {
        // Per warp and lane: acc[mt][nt][i], as the kernel holds them.
        static float acc[kWarps][32][cta::kMTiles][cta::kNTiles][4];
        for (auto& a : acc)
          for (auto& l : a)
            for (auto& m : l)
              for (auto& n : m)
                for (float& v : n) v = 0.f;
        for (int64_t kc = range.begin; kc < range.end; ++kc) {
          // ---- The stage's copies (the kernel's pointers, set at the split's first chunk and advanced).
          const int64_t step = kc - range.begin;
          std::vector<std::array<float, 8>> sa(cta::kBlockM * cta::kAChunks), sb(cta::kBlockN * cta::kBChunks);
          std::vector<uint32_t> smeta(cta::kMetaWords);
          for (int tid = 0; tid < cta::kThreads; ++tid) {
            for (int i = 0; i < cta::kACopies; ++i) {
              const ms::Coord c = cta::a_copy(tid, i);
              const int64_t row = m0 + c.row < M ? m0 + c.row : M - 1;
              const int64_t src = ms::value_offset(row, range.begin, 8 * c.col, K) + step * ms::kKeptK;
              CHECK_EQ(src, ms::value_offset(row, kc, 8 * c.col, K));
              for (int e = 0; e < 8; ++e) sa[cta::a_unit(c.row, c.col)][e] = w.values[src + e];
            }
            if (tid < cta::kMetaThreads) {
              const int64_t row32 = m0 + ms::kMetaRowTile * (tid / 8);
              const int64_t valid32 = row32 < M ? row32 : M - ms::kMetaRowTile;
              const int64_t src = ms::meta_word_offset(valid32, range.begin, M) + 4 * (tid % 8) + step * M;
              CHECK_EQ(src, ms::meta_word_offset(valid32, kc, M) + 4 * (tid % 8));
              for (int e = 0; e < 4; ++e) smeta[4 * tid + e] = words[src + e];
            }
            for (int i = 0; i < cta::kBCopies; ++i) {
              const ms::Coord c = cta::b_copy(tid, i);
              const int64_t p = p0 + c.row < P ? p0 + c.row : P - 1;
              const int64_t src = p * K + int64_t(range.begin) * cta::kBlockK + 8 * c.col + step * cta::kBlockK;
              for (int e = 0; e < 8; ++e) sb[cta::b_unit(c.row, c.col)][e] = x[src + e];
            }
          }
          // ---- Each warp: metadata words, ldmatrix, mma.sp as the PTX ISA defines it.
          for (int warp = 0; warp < kWarps; ++warp) {
            const int wm = warp % cta::kWarpsM, wn = warp / cta::kWarpsM;
            uint32_t meta[2][32];
            for (int lane = 0; lane < 32; ++lane)
              for (int t = 0; t < 2; ++t) meta[t][lane] = smeta[wm * cta::kWarpM + lane + t * ms::kMetaRowTile];
            float a[cta::kMTiles][32][8], b[cta::kNTiles][32][8];
            for (int mt = 0; mt < cta::kMTiles; ++mt)
              mma_sp_model::ldmatrix_x4(sa, [&](int l) {
                const ms::Coord s = cta::a_ldsm_source(l);
                return cta::a_unit(wm * cta::kWarpM + s.row, s.col) + mt * ms::kTileM * cta::kAChunks;
              }, a[mt]);
            for (int nt = 0; nt < cta::kNTiles; ++nt)
              mma_sp_model::ldmatrix_x4(sb, [&](int l) {
                const ms::Coord s = cta::b_ldsm_source(l);
                return cta::b_unit(wn * cta::kWarpN + s.row, s.col) + nt * ms::kTileN * cta::kBChunks;
              }, b[nt]);
            for (int mt = 0; mt < cta::kMTiles; ++mt) {
              const int selector = mt & 1;  // the kernel's mma_sp_16832<T, 0> / <T, 1> pairs
              for (int r = 0; r < 16; ++r)
                for (int c = 0; c < 16; ++c) {
                  const float av = a[mt][own.a[r][c].row][own.a[r][c].col];
                  const int k = ms::dense_k_of_kept(meta[mt / 2], r, c, selector);
                  CHECK(k >= 4 * (c / 2) && k < 4 * (c / 2) + 4);
                  const int64_t o = m0 + wm * cta::kWarpM + mt * ms::kTileM + r;
                  if (o < M && av != 0.f) {  // warps of one warp row (and CTAs of one CTA row) read the same weights
                    float& slot = rebuilt[o * K + kc * cta::kBlockK + k];
                    CHECK(p0 == 0 && wn == 0 ? slot == 0.f : slot == av);
                    slot = av;
                  }
                  if (o >= M || av == 0.f) continue;  // rows past M are never stored; a zero adds nothing
                  for (int nt = 0; nt < cta::kNTiles; ++nt)
                    for (int n = 0; n < 8; ++n) {
                      const ms::Coord d = own.c[r][n];
                      acc[warp][d.row][mt][nt][d.col] += av * b[nt][own.b[k][n].row][own.b[k][n].col];
                    }
                }
            }
          }
        }
        // ---- Split-K epilogue: each accumulator pair (columns 2t, 2t + 1) as one 8-byte store to the workspace.
        if (splits > 1) {
          for (int warp = 0; warp < kWarps; ++warp) {
            const int wm = warp % cta::kWarpsM, wn = warp / cta::kWarpsM;
            for (int lane = 0; lane < 32; ++lane)
              for (int mt = 0; mt < cta::kMTiles; ++mt)
                for (int nt = 0; nt < cta::kNTiles; ++nt)
                  for (int h = 0; h < 2; ++h) {
                    const ms::Coord c = ms::c_coord(lane, 2 * h);
                    CHECK_EQ(ms::c_coord(lane, 2 * h + 1).col, c.col + 1);
                    CHECK_EQ(ms::c_coord(lane, 2 * h + 1).row, c.row);
                    const int64_t o = m0 + wm * cta::kWarpM + mt * ms::kTileM + c.row;
                    const int64_t p = p0 + wn * cta::kWarpN + nt * ms::kTileN + c.col;
                    if (o >= M || p >= P) continue;
                    const int64_t at = prunedm::split_k::workspace_offset(split, o, p, M, P);
                    CHECK(at % 2 == 0 && at + 1 < int64_t(workspace.size()));  // aligned float2, inside
                    for (int e = 0; e < 2; ++e) {
                      workspace[at + e] = acc[warp][lane][mt][nt][2 * h + e];
                      ++ws_written[at + e];
                    }
                  }
          }
          continue;
        }
        // ---- Epilogue: bias per fragment row, staged per warp, 8 features per lane and step.
        for (int warp = 0; warp < kWarps; ++warp) {
          const int wm = warp % cta::kWarpsM, wn = warp / cta::kWarpsM;
          for (int half = 0; half < 2; ++half) {
            std::vector<float> stage(cta::kEpiColumns * cta::kEpiPitch, NAN);
            for (int lane = 0; lane < 32; ++lane)
              for (int mt = 0; mt < cta::kMTiles; ++mt)
                for (int nt = 0; nt < cta::kNTiles / 2; ++nt)
                  for (int i = 0; i < 4; ++i) {
                    const ms::Coord c = ms::c_coord(lane, i);
                    const int64_t o = m0 + wm * cta::kWarpM + mt * ms::kTileM + lane / 4 + 8 * (i >> 1);
                    const float bv = o < M ? bias[o] : 0.f;
                    stage[(nt * ms::kTileN + c.col) * cta::kEpiPitch + mt * ms::kTileM + c.row] =
                        acc[warp][lane][mt][half * cta::kNTiles / 2 + nt][i] + bv;
                  }
            for (int step = 0; step < cta::kEpiSteps; ++step)
              for (int lane = 0; lane < 32; ++lane) {
                const ms::Coord e = cta::epi_store(lane, step);
                const int64_t p = p0 + wn * cta::kWarpN + half * cta::kEpiColumns + e.row;
                const int64_t o = m0 + wm * cta::kWarpM + e.col;
                if (p >= P || o >= M) continue;
                for (int j = 0; j < 8; ++j) {
                  out[p * M + o + j] = stage[e.row * cta::kEpiPitch + e.col + j];
                  ++written[p * M + o + j];
                }
              }
          }
        }
      }
  }
  for (int h : chunk_hits) CHECK_EQ(h, 1);  // the splits cover every k chunk once
  if (splits > 1) {
    // Every partial of (o, p) written once, the pad column of an odd P too (by the pair store of p = P - 1).
    for (int n : ws_written) CHECK_EQ(n, 1);
    // ---- The reduction kernel: item -> (p, 8 features), partials summed in split order, then the bias.
    const int64_t items = prunedm::split_k::reduce_items(P, M);
    for (int64_t item = 0; item < items; ++item) {
      const prunedm::split_k::ReduceItem it = prunedm::split_k::reduce_item(item, P);
      CHECK(it.p < P && it.o % 8 == 0 && it.o < M);
      for (int j = 0; j < 8; ++j) {
        float v = workspace[prunedm::split_k::workspace_offset(0, it.o + j, it.p, M, P)];
        for (int split = 1; split < splits; ++split)
          v += workspace[prunedm::split_k::workspace_offset(split, it.o + j, it.p, M, P)];
        out[it.p * M + it.o + j] = prunedm::apply_activation(v + bias[it.o + j], 0);
        ++written[it.p * M + it.o + j];
      }
    }
  }
  for (int n : written) CHECK_EQ(n, 1);
  return out;
}

void test_cta_simulation_rebuilds_weights_and_product() {
  struct Case {
    int64_t m, k, p;
  };
  // Partial CTAs in M (a warp with one valid metadata tile) and in P, one and several k chunks, one column.
  for (const Case cs : {Case{160, 96, 136}, Case{32, 32, 1}, Case{128, 64, 130}}) {
    const Packed w = mma_sp_model::random_packed(cs.m, cs.k, unsigned(cs.m * 31 + cs.k + cs.p));
    std::mt19937 rng(unsigned(cs.p));
    std::uniform_int_distribution<int> level(-4, 4);
    std::vector<float> x(cs.p * cs.k), bias(cs.m);
    for (auto& v : x) v = float(level(rng)) * 0.5f;
    for (auto& v : bias) v = float(level(rng)) * 0.25f;
    std::vector<float> rebuilt(cs.m * cs.k, 0.f);
    const std::vector<float> out = simulate_linear(w, x, bias, cs.p, rebuilt);
    for (int64_t i = 0; i < cs.m * cs.k; ++i) CHECK(rebuilt[i] == w.dense[i]);
    for (int64_t p = 0; p < cs.p; ++p)
      for (int64_t o = 0; o < cs.m; ++o) {
        double expected = bias[o];
        for (int64_t k = 0; k < cs.k; ++k) expected += double(w.dense[o * cs.k + k]) * double(x[p * cs.k + k]);
        CHECK(out[p * cs.m + o] == float(expected));  // exact: quarter-integers, small sums
      }
  }
}

// The split-K partition: contiguous chunk ranges covering K once, none empty, sizes within one; and the
// heuristic's choices on the shapes it is for (adaLN: P = batch) and against (large P).
void test_split_k_partition_and_heuristic() {
  namespace sk = prunedm::split_k;
  for (int chunks = 1; chunks <= 70; ++chunks)
    for (int splits = 1; splits <= std::min(chunks, sk::kMaxSplits); ++splits) {
      int next = 0;
      for (int s = 0; s < splits; ++s) {
        const sk::ChunkRange r = sk::chunk_range(chunks, splits, s);
        CHECK_EQ(r.begin, next);
        CHECK(r.end - r.begin == chunks / splits || r.end - r.begin == chunks / splits + 1);
        next = r.end;
      }
      CHECK_EQ(next, chunks);
    }
  for (int64_t p : {1, 2, 16, 17, 64, 128, 300, 4096})
    for (int64_t m : {32, 1152, 6912, 18432})
      for (int64_t k : {32, 96, 320, 1152, 4608})
        for (int sms : {0, 1, 46, 108, 132}) {
          const int splits = sk::choose_splits(p, m, k, sms);
          const int64_t tiles = ((p + 127) / 128) * ((m + 127) / 128);
          CHECK(splits >= 1 && splits <= sk::kMaxSplits);
          if (splits > 1) {
            CHECK(2 * tiles <= sms && tiles * splits <= sms);                  // fills at most one wave
            CHECK(k / cta::kBlockK >= int64_t(splits) * sk::kMinChunksPerSplit);  // every split has 4+ chunks
          }
        }
  CHECK_EQ(sk::choose_splits(16, 6912, 1152, 132), 2);   // DiT-XL/2 adaLN at batch 16 on an H100/H200: 54 tiles
  CHECK_EQ(sk::choose_splits(2, 1152, 1152, 132), 9);    // 9 tiles, 36 chunks: 9 splits of 4
  CHECK_EQ(sk::choose_splits(4096, 1152, 1152, 132), 1); // a full grid never splits
  CHECK_EQ(sk::choose_splits(1, 32, 96, 132), 1);        // 3 chunks: too short to split
}

// Whole split-K launches simulated on the CPU (every CTA of every split, then the reduction in the kernel's
// order) rebuild the weights and the exact product: P = 1..17 columns, K not a multiple of splits x 32.
void test_split_k_simulation_rebuilds_the_product() {
  struct Case {
    int64_t m, k;
    int splits;
  };
  // M 32: one metadata tile; 160: a partial CTA row. K 160 = 5 chunks, 224 = 7: uneven splits, one of 1 chunk.
  const Case cases[] = {{32, 160, 2}, {32, 224, 3}, {32, 224, 7}, {160, 160, 4}};
  for (int64_t P = 1; P <= 17; ++P) {
    const Case cs = cases[P % 4];
    const Packed w = mma_sp_model::random_packed(cs.m, cs.k, unsigned(cs.m * 7 + cs.k + P));
    std::mt19937 rng(unsigned(P + 100 * cs.splits));
    std::uniform_int_distribution<int> level(-4, 4);
    std::vector<float> x(P * cs.k), bias(cs.m);
    for (auto& v : x) v = float(level(rng)) * 0.5f;
    for (auto& v : bias) v = float(level(rng)) * 0.25f;
    std::vector<float> rebuilt(cs.m * cs.k, 0.f);
    const std::vector<float> out = simulate_linear(w, x, bias, P, rebuilt, cs.splits);
    for (int64_t i = 0; i < cs.m * cs.k; ++i) CHECK(rebuilt[i] == w.dense[i]);
    for (int64_t p = 0; p < P; ++p)
      for (int64_t o = 0; o < cs.m; ++o) {
        double expected = bias[o];
        for (int64_t k = 0; k < cs.k; ++k) expected += double(w.dense[o * cs.k + k]) * double(x[p * cs.k + k]);
        CHECK(out[p * cs.m + o] == float(expected));  // exact: quarter-integers, small sums
      }
  }
}

// The residual of 8 consecutive features is one offset plus j * stride_c (the epilogue computes it once).
void test_residual_offset_is_affine_in_features() {
  const prunedm::ResidualLayout layouts[] = {{1, 1, 40, 1, 0, 0}, {3, 5, 600, 15, 5, 1}, {3, 5, 0, 0, 5, 1}};
  for (const auto& r : layouts)
    for (int64_t p = 0; p < 30; ++p)
      for (int64_t o = 0; o < 40; o += 8)
        for (int64_t j = 0; j < 8; ++j)
          CHECK_EQ(prunedm::residual_offset(r, p, o + j), prunedm::residual_offset(r, p, o) + j * r.stride_c);
}

// The kernel's conv gather: origins per column, one cursor per thread starting at 8 * chunk (plus 32 x the
// split's first chunk under split-K) and moving on 32 channels per stage, against conv_input_offset at every
// (p, k) a copy reads.
void test_conv_cursor_matches_the_direct_mapping() {
  struct Case {
    int64_t n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw;
  };
  const Case cases[] = {
      {2, 8, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1},  {1, 16, 9, 9, 3, 3, 2, 2, 1, 1, 1, 1},
      {2, 24, 8, 5, 3, 2, 1, 2, 2, 0, 2, 1}, {1, 64, 5, 5, 1, 1, 1, 1, 0, 0, 1, 1},
      {1, 40, 6, 7, 5, 3, 3, 1, 2, 1, 1, 2}, {1, 32, 4, 4, 4, 4, 1, 1, 3, 3, 1, 1},
  };
  for (const Case& cs : cases) {
    prunedm::ConvGeometry g{cs.n, cs.c, cs.h, cs.w, cs.kh, cs.kw, cs.sh, cs.sw, cs.ph, cs.pw, cs.dh, cs.dw, 0, 0};
    g.out_h = prunedm::conv_out_size(cs.h, cs.kh, cs.sh, cs.ph, cs.dh);
    g.out_w = prunedm::conv_out_size(cs.w, cs.kw, cs.sw, cs.pw, cs.dw);
    const int64_t K = prunedm::conv_gemm_k(g), P = prunedm::conv_gemm_p(g);
    for (int chunk = 0; chunk < cta::kBChunks; ++chunk) {
      prunedm::ConvTapCursor tap(g);
      tap.advance(g, 8 * chunk);
      for (int64_t k = 8 * chunk; k < K; k += cta::kBlockK) {
        // A split-K CTA starting at this chunk sets its cursor with one advance: the same position.
        prunedm::ConvTapCursor split_start(g);
        split_start.advance(g, int(k));
        CHECK(split_start.offset == tap.offset && split_start.dh == tap.dh && split_start.dw == tap.dw);
        CHECK(split_start.kw == tap.kw && split_start.ci == tap.ci);
        for (int64_t p = 0; p < P; ++p) {
          const prunedm::ConvColumnOrigin origin = prunedm::conv_column_origin(g, p);
          for (int e = 0; e < 8; ++e) {  // the 8 channels of one 16-byte copy stay in the tap
            const prunedm::ConvTap direct_tap = prunedm::conv_tap_of(g, k + e);
            const int64_t direct = prunedm::conv_input_offset(g, prunedm::conv_pixel_of(g, p), direct_tap,
                                                              cs.h * cs.w * cs.c, 1, cs.w * cs.c, cs.c);
            const int64_t gathered = prunedm::conv_gather_offset(g, origin, tap);
            CHECK_EQ(gathered < 0 ? int64_t{-1} : gathered + e, direct);
          }
        }
        tap.advance(g, cta::kBlockK);
      }
    }
  }
}

}  // namespace

int main() {
  test_stage_copies_land_once_without_conflicts();
  test_ldmatrix_sources_are_conflict_free_and_match_fragments();
  test_epilogue_staging_covers_the_tile();
  test_cta_simulation_rebuilds_weights_and_product();
  test_split_k_partition_and_heuristic();
  test_split_k_simulation_rebuilds_the_product();
  test_residual_offset_is_affine_in_features();
  test_conv_cursor_matches_the_direct_mapping();
  return TEST_MAIN_RESULT();
}
