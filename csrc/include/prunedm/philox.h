// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator behind prunedm's sampling ops, and the mapping from (seed, element
// index) to an element's 32 random bits. Torch-free: compiled into the CPU extension, the CUDA
// kernels and the C++ unit tests alike.
//
// Element i of a sampled tensor (its flat index in the contiguous tensor) draws word i % 4 of
// Philox4x32-10 with counter {lo32(i / 4), hi32(i / 4), 0, 0} and key {lo32(seed), hi32(seed)}.
// This is the stream Triton's tl.randint4x(seed, i / 4) returns, and what the Python reference
// (prunedm.ops.reference.philox_bits_ref) computes, so every backend draws the same bits for
// the same seed however the work is split among threads.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef PRUNEDM_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PRUNEDM_HD __host__ __device__ __forceinline__
#else
#define PRUNEDM_HD inline
#endif
#endif

namespace prunedm {

// Round multipliers and Weyl key increments of Philox4x32 (Random123's PHILOX_M4x32_* and
// PHILOX_W32_*).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Elements per Philox call: the four output words go to four consecutive elements.
constexpr int kPhiloxLanes = 4;

PRUNEDM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// out = Philox4x32-10(counter, key). out may alias counter.
PRUNEDM_HD void philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  uint32_t k0 = key[0], k1 = key[1];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;  // the key bump after the last round is never used
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The four words drawn for elements 4 * block .. 4 * block + 3 under `seed`.
PRUNEDM_HD void philox_block(uint64_t seed, uint64_t block, uint32_t out[4]) {
  const uint32_t counter[4] = {uint32_t(block), uint32_t(block >> 32), 0u, 0u};
  const uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
  philox4x32_10(counter, key, out);
}

// The 32 random bits of element `index` under `seed`.
PRUNEDM_HD uint32_t philox_bits(uint64_t seed, uint64_t index) {
  uint32_t out[4];
  philox_block(seed, index / kPhiloxLanes, out);
  return out[index % kPhiloxLanes];
}

// Draws the bits of consecutive elements one Philox call per four, when a thread walks a run
// of indices (a group of m elements). bits(i) is philox_bits(seed, offset + i): a slice that starts at
// flat element `offset` of a larger tensor (a shard of sharded logits) draws that tensor's bits.
class PhiloxStream {
 public:
  PRUNEDM_HD explicit PhiloxStream(uint64_t seed, uint64_t offset = 0)
      : seed_(seed), offset_(offset), block_(~uint64_t{0}), words_{0u, 0u, 0u, 0u} {}

  PRUNEDM_HD uint32_t bits(uint64_t index) {
    index += offset_;
    const uint64_t block = index / kPhiloxLanes;
    if (block != block_) {
      philox_block(seed_, block, words_);
      block_ = block;
    }
    return words_[index % kPhiloxLanes];
  }

 private:
  uint64_t seed_;
  uint64_t offset_;
  uint64_t block_;
  uint32_t words_[4];
};

// The bits of elements first .. first + count - 1 into out[0 .. count). Same bits as philox_bits;
// whole blocks are computed kBatch at a time in lanes the compiler vectorizes (host code).
inline void philox_bits_range(uint64_t seed, uint64_t first, int64_t count, uint32_t* out) {
  constexpr int kBatch = 8;
  int64_t i = 0;
  for (; i < count && (first + uint64_t(i)) % kPhiloxLanes != 0; ++i) out[i] = philox_bits(seed, first + uint64_t(i));
  const uint32_t key0 = uint32_t(seed), key1 = uint32_t(seed >> 32);
  for (; i + kBatch * kPhiloxLanes <= count; i += kBatch * kPhiloxLanes) {
    const uint64_t block = (first + uint64_t(i)) / kPhiloxLanes;
    uint32_t c0[kBatch], c1[kBatch], c2[kBatch], c3[kBatch];
    for (int l = 0; l < kBatch; ++l) {
      c0[l] = uint32_t(block + l);
      c1[l] = uint32_t((block + l) >> 32);
      c2[l] = 0u;
      c3[l] = 0u;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int l = 0; l < kBatch; ++l) {
        const uint64_t p0 = uint64_t(kPhiloxM0) * c0[l], p1 = uint64_t(kPhiloxM1) * c2[l];
        const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[l] ^ k0, n2 = uint32_t(p0 >> 32) ^ c3[l] ^ k1;
        c1[l] = uint32_t(p1);
        c3[l] = uint32_t(p0);
        c0[l] = n0;
        c2[l] = n2;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int l = 0; l < kBatch; ++l) {
      out[i + 4 * l] = c0[l];
      out[i + 4 * l + 1] = c1[l];
      out[i + 4 * l + 2] = c2[l];
      out[i + 4 * l + 3] = c3[l];
    }
  }
  for (; i < count; ++i) out[i] = philox_bits(seed, first + uint64_t(i));
}

// A uniform in the open interval (0, 1): (bits + 1/2) / 2^32, exact in double, never 0 or 1.
PRUNEDM_HD double uniform_open01(uint32_t bits) { return (double(bits) + 0.5) * (1.0 / 4294967296.0); }

// Standard Gumbel noise -log(-log(u)) of an element's bits, in double (within [-3.2, 22.9]).
// Computed in double and rounded once to the compute type, it is the same number on every
// backend unless two libms' last-bit differences straddle a rounding boundary (~2^-29 for float).
PRUNEDM_HD double gumbel_from_bits(uint32_t bits) {
  const double u = uniform_open01(bits);
#if defined(__CUDA_ARCH__)
  return -::log(-::log(u));
#else
  return -std::log(-std::log(u));
#endif
}

}  // namespace prunedm
