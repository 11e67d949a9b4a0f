// Bilinear sampling tables shared by the CPU kernels, computed exactly as ATen's
// upsample_bilinear2d does (area_pixel_compute_scale / compute_source_index_and_lambda), so a fused
// kernel samples the same points with the same weights as F.interpolate(size=...).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/simd_math.h"

namespace senformer {

template <typename T>
struct Axis {
  std::vector<int64_t> i0, i1;  // source indices of the two taps
  std::vector<T> l0, l1;        // their weights
};

template <typename T>
Axis<T> bilinear_axis(int64_t in, int64_t out, bool align_corners) {
  Axis<T> a;
  a.i0.resize(out);
  a.i1.resize(out);
  a.l0.resize(out);
  a.l1.resize(out);
  const T scale = align_corners ? (out > 1 ? static_cast<T>(in - 1) / static_cast<T>(out - 1) : T(0))
                                : static_cast<T>(in) / static_cast<T>(out);
  for (int64_t d = 0; d < out; ++d) {
    if (in == out) {
      a.i0[d] = a.i1[d] = d;
      a.l0[d] = T(1);
      a.l1[d] = T(0);
      continue;
    }
    T src = align_corners ? scale * static_cast<T>(d) : scale * (static_cast<T>(d) + T(0.5)) - T(0.5);
    if (!align_corners && src < T(0)) src = T(0);
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const T l1 = std::min(std::max(src - static_cast<T>(i0), T(0)), T(1));
    a.i0[d] = i0;
    a.i1[d] = i0 + (i0 < in - 1 ? 1 : 0);
    a.l1[d] = l1;
    a.l0[d] = T(1) - l1;
  }
  return a;
}

// Output rows [first[r], first[r + 1]) have their upper tap on source row r (i0 is monotone).
inline std::vector<int64_t> rows_by_source(const std::vector<int64_t>& i0, int64_t in) {
  std::vector<int64_t> first(in + 1, static_cast<int64_t>(i0.size()));
  for (int64_t d = static_cast<int64_t>(i0.size()) - 1; d >= 0; --d) first[i0[d]] = d;
  for (int64_t r = in - 1; r >= 0; --r) first[r] = std::min(first[r], first[r + 1]);
  return first;
}

// rv = l0 * r0 + l1 * r1 over n values: one bilinear tap pair, for a row of pixels or one pixel's classes.
template <typename T>
SENF_ALWAYS_INLINE void blend(T* rv, const T* r0, const T* r1, T l0, T l1, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) rv[j] = l0 * r0[j] + l1 * r1[j];
}

}  // namespace senformer
