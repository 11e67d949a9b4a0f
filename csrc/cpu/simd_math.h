// Small math helpers written so that GCC/Clang vectorise the class loops that call them (no
// branches, no libm calls): the float exp is what keeps the fused loss fast on CPU.
#pragma once

#include <cmath>
#include <limits>
#include <cstdint>
#include <algorithm>

#if defined(__GNUC__)
#define SENF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SENF_ALWAYS_INLINE inline
#endif

// Hot float loops get AVX-512 and AVX2+FMA clones picked at load time, so one binary runs
// everywhere and still uses 16- or 8-wide vectors where the CPU has them. cpu/isa.cpp versions a
// function over the same list, so senformer::cpu_isa names the clone this CPU runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SENF_HAS_TARGET_CLONES 1
#define SENF_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SENF_TARGET_CLONES
#endif

// The floatv helpers are always inlined, so the vector-argument ABI GCC warns about at their call
// sites in baseline-ISA code (-Wpsabi) is never used; silenced for every file that includes this.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace senformer {

// exp(x) for x <= 0 (arguments are z - max(z)), about 1 ulp, as 2^n * exp(x - n ln 2): n =
// round(x / ln 2), then Cody-Waite reduction by ln 2 (in two parts) and Cephes' degree-6 polynomial.
// Results below ~1e-38 are flushed to exp(-87) (irrelevant next to the max term, which is 1).
// V: float, or floatv below (the same expressions, lane by lane).
template <typename V>
SENF_ALWAYS_INLINE V exp_exponent(V x) {
  const V t = x * 1.44269504088896341f;
  return (t + 12582912.0f) - 12582912.0f;  // round to nearest integer (exact below 2^22)
}

template <typename V>
SENF_ALWAYS_INLINE V exp_mantissa(V x, V n) {
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const V r2 = r * r;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r2 + r + 1.0f;
}

SENF_ALWAYS_INLINE float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = exp_exponent(x);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  // A builtin bit cast, not memcpy: memcpy takes the address of a local, which turns it into a
  // per-lane array inside `omp simd` loops and defeats the vectorisation of the caller's loop.
  // __builtin_bit_cast (GCC >= 11, Clang >= 9) rather than std::bit_cast: torch <= 2.11's
  // extension builder compiles with -std=c++17, where std::bit_cast does not exist.
  return exp_mantissa(x, n) * __builtin_bit_cast(float, bits);
}

SENF_ALWAYS_INLINE double exp_nonpos(double x) { return std::exp(x); }

// Sixteen floats as one value (GCC/Clang vector extension): one AVX-512 register in the x86-64-v4
// clone, two AVX registers in the v3 one, four SSE registers in the default one. For class loops
// that `omp simd` leaves slow: reductions (GCC keeps an `omp simd` reduction's accumulator in
// memory, one store per iteration), loops fused across a reduction, and the ragged tail of N
// classes (150 = 9 x 16 + 6 would run its last 6 scalar): callers pad class rows to kLanes.
constexpr int64_t kLanes = 16;
typedef float floatv __attribute__((vector_size(4 * kLanes)));
typedef int32_t intv __attribute__((vector_size(4 * kLanes)));
// floatv through pointers: no alignment assumed (a vector type's own alignment is not reliable in
// code compiled for the baseline ISA, where GCC caps it at 16 bytes).
typedef float floatv_u __attribute__((vector_size(4 * kLanes), aligned(4)));
// kLanes bytes, e.g. a vector's lanes as bools
typedef int8_t bytev __attribute__((vector_size(kLanes)));

SENF_ALWAYS_INLINE floatv splat(float x) { return floatv{} + x; }

// exp_nonpos(float), kLanes at a time.
SENF_ALWAYS_INLINE floatv exp_nonpos(floatv x) {
  const floatv lo = splat(-87.0f);
  x = x > lo ? x : lo;
  const floatv n = exp_exponent(x);
  const intv bits = (__builtin_convertvector(n, intv) + 127) << 23;
  return exp_mantissa(x, n) * (floatv)bits;  // a same-size vector cast reinterprets the bits
}

// exp(x) lane by lane for x up to 88 (exp(88) ~ 1.65e38 is the largest result: beyond, it saturates
// there rather than at inf), as exp_nonpos otherwise.
SENF_ALWAYS_INLINE floatv exp_bounded(floatv x) {
  const floatv hi = splat(88.0f);
  return exp_nonpos(x < hi ? x : hi);
}

// log(x) lane by lane for normal positive finite x, about 1 ulp: x = m * 2^k with m in
// [sqrt(1/2), sqrt(2)), then Cephes' degree-8 polynomial in m - 1 and k ln 2 in two parts. The
// caller takes lanes outside that range (0, denormals, inf, NaN) elsewhere.
SENF_ALWAYS_INLINE floatv log_normal(floatv x) {
  const intv bits = (intv)x;
  floatv k = __builtin_convertvector(((bits >> 23) & 0xff) - 126, floatv);
  floatv m = (floatv)((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const intv low = m < splat(0.707106781186547524f);
  k = low ? k - 1.0f : k;
  m = (low ? m + m : m) - 1.0f;
  const floatv z = m * m;
  floatv p = m * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  floatv y = p * m * z + k * -2.12194440e-4f - 0.5f * z;
  return (m + y) + k * 0.693359375f;
}

// Lane i of v and lane i ^ h, for the halving reductions below: four shuffle steps instead of
// sixteen dependent scalar compares.
template <int h>
SENF_ALWAYS_INLINE floatv swap_halves(floatv v) {
  static_assert(kLanes == 16, "the shuffle masks below are written for 16 lanes");
  return __builtin_shuffle(v, intv{0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h, 8 ^ h, 9 ^ h, 10 ^ h,
                                   11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h});
}

// op over all of v's lanes, the result in every lane, by halving: lane 0 combines with lane 8, then
// with lane 4's pair, and so on -- a fixed order, so a sum does not depend on the instruction set.
template <typename Op>
SENF_ALWAYS_INLINE floatv reduce_all(floatv v, Op op) {
  v = op(v, swap_halves<8>(v));
  v = op(v, swap_halves<4>(v));
  v = op(v, swap_halves<2>(v));
  return op(v, swap_halves<1>(v));
}

// (v without NaN)
SENF_ALWAYS_INLINE floatv max_all(floatv v) {
  return reduce_all(v, [](floatv a, floatv b) { return a > b ? a : b; });
}

SENF_ALWAYS_INLINE floatv min_all(floatv v) {
  return reduce_all(v, [](floatv a, floatv b) { return a < b ? a : b; });
}

SENF_ALWAYS_INLINE float hmax(floatv v) { return max_all(v)[0]; }

SENF_ALWAYS_INLINE float hsum(floatv v) {
  return reduce_all(v, [](floatv a, floatv b) { return a + b; })[0];
}

// One pixel's N float class scores as nv = ceil(N / kLanes) vectors, the last holding rem real
// lanes. Pixels of a dense (.., N) grid sit N floats apart, so a whole last vector would read into
// the next pixel (or past the tensor's end): it is loaded and stored lane by lane, its pad lanes 0.
struct ClassVecs {
  int64_t N, nv, rem;
  intv real;  // -1 on the last vector's real lanes, 0 on its pad lanes

  explicit ClassVecs(int64_t n) : N(n), nv((n + kLanes - 1) / kLanes), rem(n - (nv - 1) * kLanes), real() {
    for (int64_t j = 0; j < kLanes; ++j) real[j] = j < rem ? -1 : 0;
  }

  SENF_ALWAYS_INLINE floatv load(const float* row, int64_t i) const {
    if (i + 1 < nv) return *reinterpret_cast<const floatv_u*>(row + i * kLanes);
    floatv v = floatv{};
    for (int64_t j = 0; j < rem; ++j) v[j] = row[i * kLanes + j];
    return v;
  }

  SENF_ALWAYS_INLINE void store(float* row, int64_t i, floatv v) const {
    if (i + 1 < nv) {
      *reinterpret_cast<floatv_u*>(row + i * kLanes) = v;
      return;
    }
    for (int64_t j = 0; j < rem; ++j) row[i * kLanes + j] = v[j];
  }
};

// e[i] = exp(z[i] - m) over a pixel's class vectors (pad lanes 0), m = max z (stored in *m); returns
// sum e. A NaN score stays NaN in e (so in the sum), as in torch.softmax.
SENF_ALWAYS_INLINE float exp_shifted(const ClassVecs& cv, const floatv_u* z, floatv_u* e, float* m) {
  const floatv ninf = splat(-std::numeric_limits<float>::infinity());
  floatv vm = ninf;
  for (int64_t i = 0; i < cv.nv; ++i) {
    const floatv zi = i + 1 < cv.nv ? z[i] : (cv.real ? z[i] : ninf);
    vm = zi > vm ? zi : vm;
  }
  const float top = hmax(vm);
  floatv vs = floatv{};
  for (int64_t i = 0; i < cv.nv; ++i) {
    const floatv zi = z[i];
    floatv ei = exp_nonpos(zi - top);
    ei = zi == zi ? ei : zi;
    if (i + 1 == cv.nv) ei = cv.real ? ei : floatv{};
    e[i] = ei;
    vs += ei;
  }
  *m = top;
  return hsum(vs);
}

// e[c] = exp(z[c] - m) over one pixel's N class scores, m = their maximum (stored in *m);
// returns the sum of e: a softmax's (or log-softmax's) shared first half.
template <typename T>
SENF_ALWAYS_INLINE T exp_shifted(const T* z, T* e, int64_t N, T* m) {
  T top = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : top)
  for (int64_t c = 0; c < N; ++c) top = z[c] > top ? z[c] : top;
#pragma omp simd
  for (int64_t c = 0; c < N; ++c) e[c] = exp_nonpos(z[c] - top);
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < N; ++c) s += e[c];
  *m = top;
  return s;
}

}  // namespace senformer
