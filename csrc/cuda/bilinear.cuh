// Bilinear taps on the device, same arithmetic as ATen's upsample_bilinear2d (and cpu/bilinear.h).
#pragma once

#include <cstdint>

namespace senformer {

// Scale for size= resizes (no explicit scale factor), as area_pixel_compute_scale.
template <typename T>
inline T bilinear_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners) return out > 1 ? static_cast<T>(in - 1) / static_cast<T>(out - 1) : T(0);
  return static_cast<T>(in) / static_cast<T>(out);
}

template <typename T>
__device__ __forceinline__ void bilinear_tap(int64_t dst, int64_t in, int64_t out, bool align_corners, T scale,
                                             int64_t& i0, int64_t& i1, T& l0, T& l1) {
  if (in == out) {
    i0 = i1 = dst;
    l0 = T(1);
    l1 = T(0);
    return;
  }
  T src = align_corners ? scale * static_cast<T>(dst) : scale * (static_cast<T>(dst) + T(0.5)) - T(0.5);
  if (!align_corners && src < T(0)) src = T(0);
  int64_t i = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  i = i < in - 1 ? i : in - 1;
  T l = src - static_cast<T>(i);
  l = l < T(0) ? T(0) : (l > T(1) ? T(1) : l);
  i0 = i;
  i1 = i + (i < in - 1 ? 1 : 0);
  l1 = l;
  l0 = T(1) - l;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace senformer
