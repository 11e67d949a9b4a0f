// Class-major <-> channels-last copies for the CPU kernels. Transposing a whole (N classes x w
// pixels) row at once writes w cache lines per class (over L1 at w = 128, N = 150); blocks of
// kBlock pixels keep the channels-last lines in L1 while the classes stream by. The class-major
// side is N streams a plane apart, more than the hardware prefetcher follows: each class's line two
// blocks ahead is prefetched by hand (1.5-2x faster at N = 150, 128 x 128 planes; prefetches past
// the end are harmless, they never fault).
#pragma once

#include <algorithm>
#include <cstdint>

namespace senformer {

constexpr int64_t kBlock = 16;
constexpr int64_t kAhead = 2 * kBlock;

// dst[j * N + c] = src[c * P + j] for j < n pixels, c < N classes.
template <typename T>
void to_channels_last(const T* src, int64_t P, int64_t N, int64_t n, T* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t m = std::min(kBlock, n - j0);
    for (int64_t c = 0; c < N; ++c) {
      __builtin_prefetch(src + c * P + j0 + kAhead);
      for (int64_t j = 0; j < m; ++j) dst[(j0 + j) * N + c] = src[c * P + j0 + j];
    }
  }
}

// dst[c * P + j] = src[j * N + c] for j < n pixels, c < N classes.
template <typename T>
void to_class_major(const T* src, int64_t N, int64_t n, T* dst, int64_t P) {
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t m = std::min(kBlock, n - j0);
    for (int64_t c = 0; c < N; ++c) {
      __builtin_prefetch(dst + c * P + j0 + kAhead, 1);
      for (int64_t j = 0; j < m; ++j) dst[c * P + j0 + j] = src[(j0 + j) * N + c];
    }
  }
}

}  // namespace senformer
