// A minimal assertion helper for the header tests: count failures, print where, exit non-zero.
#pragma once

#include <cstdio>

namespace prunedm_test {
inline int failures = 0;
}

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++prunedm_test::failures;                                                \
    }                                                                          \
  } while (0)

#define CHECK_EQ(a, b)                                                                          \
  do {                                                                                          \
    const auto va = (a);                                                                        \
    const auto vb = (b);                                                                        \
    if (!(va == vb)) {                                                                          \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__, __LINE__, #a, #b, \
                   (long long)va, (long long)vb);                                               \
      ++prunedm_test::failures;                                                                 \
    }                                                                                           \
  } while (0)

#define TEST_MAIN_RESULT()                                                      \
  (prunedm_test::failures == 0 ? (std::printf("all checks passed\n"), 0)       \
                               : (std::fprintf(stderr, "%d check(s) failed\n", prunedm_test::failures), 1))
