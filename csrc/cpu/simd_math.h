// Small math helpers written so that GCC/Clang vectorise the class loops that call them (no
// branches, no libm calls): the float exp is what keeps the fused loss fast on CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>

#if defined(__GNUC__)
#define SENF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SENF_ALWAYS_INLINE inline
#endif

// Hot float loops get an AVX2+FMA clone picked at load time, so one binary runs everywhere and
// still uses 8-wide vectors where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SENF_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SENF_TARGET_CLONES
#endif

namespace senformer {

// exp(x) for x <= 0 (arguments are z - max(z)), about 1 ulp: Cody-Waite reduction by ln 2 and
// Cephes' degree-6 polynomial; results below ~1e-38 are flushed to exp(-87) (irrelevant next to
// the max term, which is 1).
SENF_ALWAYS_INLINE float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer (exact below 2^22)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  // A builtin bit cast, not memcpy: memcpy takes the address of a local, which turns it into a
  // per-lane array inside `omp simd` loops and defeats the vectorisation of the caller's loop.
  // __builtin_bit_cast (GCC >= 11, Clang >= 9) rather than std::bit_cast: torch <= 2.11's
  // extension builder compiles with -std=c++17, where std::bit_cast does not exist.
  return p * __builtin_bit_cast(float, bits);
}

SENF_ALWAYS_INLINE double exp_nonpos(double x) { return std::exp(x); }

}  // namespace senformer
