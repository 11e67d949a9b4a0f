// CPU kernels of ensemble_predict's steps (contracts in ops.h): merge_scores, the learners' merge on
// the finest grid, row by row with every learner added while the row is in cache, and
// upsampled_argmax, the bilinear upsample of the merged class scores fused with the argmax over
// classes, one output row at a time; only the (B, H, W) label map is written at full resolution.
#include <ATen/Dispatch.h>
#include <c10/core/GradMode.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/bilinear.h"
#include "cpu/layout.h"
#include "cpu/simd_math.h"
#include "ops.h"

namespace senformer {
namespace {

// First index of the maximum, as torch.argmax (a NaN counts as the maximum: the first NaN wins).
template <typename T>
SENF_ALWAYS_INLINE void argmax_row(const T* rv, const int64_t* x0, const int64_t* x1, const T* lx0, const T* lx1,
                                   int64_t W, int64_t N, T* z, int64_t* out) {
  // The search for the first hit runs in chunks whose test vectorises; only the chunk holding the
  // hit is scanned scalar (a plain early-exit loop stays scalar and costs ~N/2 compares per pixel).
  constexpr int64_t kChunk = 16;
  for (int64_t x = 0; x < W; ++x) {
    const T* pa = rv + x0[x] * N;
    const T* pb = rv + x1[x] * N;
    const T wa = lx0[x], wb = lx1[x];
    T m = -std::numeric_limits<T>::infinity();
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t c = 0; c < N; ++c) {
      z[c] = wa * pa[c] + wb * pb[c];
      m = z[c] > m ? z[c] : m;
      nan |= z[c] != z[c];
    }
    int64_t c0 = 0;
    for (; c0 + kChunk <= N; c0 += kChunk) {
      int hit = 0;
#pragma omp simd reduction(| : hit)
      for (int64_t j = 0; j < kChunk; ++j) hit |= nan ? z[c0 + j] != z[c0 + j] : z[c0 + j] == m;
      if (hit) break;
    }
    int64_t best = c0;
    for (int64_t c = c0; c < N; ++c) {
      if (nan ? z[c] != z[c] : z[c] == m) {
        best = c;
        break;
      }
    }
    out[x] = best;
  }
}

SENF_TARGET_CLONES void blend_f32(float* rv, const float* r0, const float* r1, float l0, float l1, int64_t n) {
  blend<float>(rv, r0, r1, l0, l1, n);
}

void blend_f32_or_f64(double* rv, const double* r0, const double* r1, double l0, double l1, int64_t n) {
  blend<double>(rv, r0, r1, l0, l1, n);
}

void blend_f32_or_f64(float* rv, const float* r0, const float* r1, float l0, float l1, int64_t n) {
  blend_f32(rv, r0, r1, l0, l1, n);
}

// argmax over c of wa * pa[c] + wb * pb[c] for N >= kLanes classes, kLanes classes per step: lane i
// keeps the maximum of classes i, i + kLanes, ... and the first class reaching it (a strict compare,
// in increasing class order), so the first maximum overall is the smallest such class among the
// lanes holding the largest value; nothing reduces across lanes until the end. A ragged tail is one
// more step over the last kLanes classes (each lane still sees its classes in increasing order).
// -1 when a NaN appears: the caller takes argmax_row, where the first NaN wins as in torch.argmax.
SENF_ALWAYS_INLINE int64_t argmax_blend_lanes(const float* pa, const float* pb, float wa, float wb, int64_t N) {
  const floatv va = splat(wa), vb = splat(wb);
  floatv iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = static_cast<float>(i);
  floatv m = splat(-std::numeric_limits<float>::infinity()), first = iota;
  floatv nan = floatv{};  // a NaN z leaves m alone; it is summed here to be seen at the end
  // No lambda for the step: GCC sometimes kept a capturing lambda's state in memory (2x slower).
  const int64_t last = N - kLanes;
  for (int64_t c = 0;; c += kLanes) {
    c = std::min(c, last);
    const floatv z = va * *reinterpret_cast<const floatv_u*>(pa + c) + vb * *reinterpret_cast<const floatv_u*>(pb + c);
    const intv up = z > m;
    m = up ? z : m;
    first = up ? iota + static_cast<float>(c) : first;
    nan += z - z;  // 0, or NaN from the first NaN on (z - z is NaN for an infinite z too: a false alarm only)
    if (c == last) break;
  }
  const floatv k = min_all(max_all(m) == m ? first : splat(static_cast<float>(N)));
  const float any_nan = max_all(nan != nan ? splat(1.0f) : floatv{})[0];
  return any_nan != 0.0f ? -1 : static_cast<int64_t>(k[0]);
}

SENF_TARGET_CLONES void argmax_row_f32(const float* rv, const int64_t* x0, const int64_t* x1, const float* lx0,
                                       const float* lx1, int64_t W, int64_t N, float* z, int64_t* out) {
  if (N < kLanes) return argmax_row<float>(rv, x0, x1, lx0, lx1, W, N, z, out);
  for (int64_t x = 0; x < W; ++x) {
    out[x] = argmax_blend_lanes(rv + x0[x] * N, rv + x1[x] * N, lx0[x], lx1[x], N);
    if (out[x] < 0) argmax_row<float>(rv, x0 + x, x1 + x, lx0 + x, lx1 + x, 1, N, z, out + x);
  }
}

void argmax_row_any(const float* rv, const int64_t* x0, const int64_t* x1, const float* lx0, const float* lx1,
                    int64_t W, int64_t N, float* z, int64_t* out) {
  argmax_row_f32(rv, x0, x1, lx0, lx1, W, N, z, out);
}

void argmax_row_any(const double* rv, const int64_t* x0, const int64_t* x1, const double* lx0, const double* lx1,
                    int64_t W, int64_t N, double* z, int64_t* out) {
  argmax_row<double>(rv, x0, x1, lx0, lx1, W, N, z, out);
}

Tensor upsampled_argmax_cpu(const Tensor& scores, int64_t H, int64_t W, bool align_corners) {
  check_upsampled_argmax(scores, H, W);
  const int64_t B = scores.size(0), h1 = scores.size(1), w1 = scores.size(2), N = scores.size(3);
  Tensor out = at::empty({B, H, W}, scores.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "senformer_upsampled_argmax_cpu", [&] {
    using T = scalar_t;
    const Axis<T> ay = bilinear_axis<T>(h1, H, align_corners);
    const Axis<T> ax = bilinear_axis<T>(w1, W, align_corners);
    const T* sp = scores.data_ptr<T>();
    const int64_t rown = w1 * N;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> rv(rown), z(N);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / H, y = idx % H;
        const T* base = sp + b * h1 * rown;
        blend_f32_or_f64(rv.data(), base + ay.i0[y] * rown, base + ay.i1[y] * rown, ay.l0[y], ay.l1[y], rown);
        argmax_row_any(rv.data(), ax.i0.data(), ax.i1.data(), ax.l0.data(), ax.l1.data(), W, N, z.data(), op + idx * W);
      }
    });
  });
  return out;
}

// total (n pixels, N) channels-last += softmax over classes of u (N rows of stride P, n <= kTile
// pixels each; log_softmax when log_space), for a learner already at the finest size: the class loops
// run across pixels in SIMD lanes and the transpose to channels-last happens in cache, so the
// full-size learner is never copied to channels-last.
constexpr int64_t kTile = 16;

template <typename T>
SENF_ALWAYS_INLINE void softmax_accumulate_tile(T* total, const T* u, int64_t P, int64_t N, int64_t n, T* e,
                                                bool log_space) {
  T m[kTile], s[kTile];
  for (int64_t j = 0; j < kTile; ++j) {
    m[j] = -std::numeric_limits<T>::infinity();
    s[j] = T(0);
  }
  for (int64_t c = 0; c < N; ++c) {
    const T* row = u + c * P;
    __builtin_prefetch(row + kAhead);  // N streams a plane apart: see cpu/layout.h
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) m[j] = row[j] > m[j] ? row[j] : m[j];
  }
  for (int64_t c = 0; c < N; ++c) {
    const T* row = u + c * P;
    T* ec = e + c * kTile;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      ec[j] = exp_nonpos(row[j] - m[j]);
      s[j] += ec[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    T* t = total + j * N;
    if (log_space) {
      const T lse = m[j] + std::log(s[j]);
      for (int64_t c = 0; c < N; ++c) t[c] += u[c * P + j] - lse;
    } else {
      const T inv = T(1) / s[j];
      for (int64_t c = 0; c < N; ++c) t[c] += e[c * kTile + j] * inv;
    }
  }
}

// total[:] += softmax(z) (or log_softmax when log_space) over one pixel's N classes.
template <typename T>
SENF_ALWAYS_INLINE void softmax_accumulate_row(T* total, const T* z, T* e, int64_t N, bool log_space) {
  T m;
  const T s = exp_shifted<T>(z, e, N, &m);
  if (log_space) {
    const T lse = m + std::log(s);
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) total[c] += z[c] - lse;
  } else {
    const T inv = T(1) / s;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) total[c] += e[c] * inv;
  }
}

// The float pixel: total[:] += softmax (or log_softmax) of z = wa * pa + wb * pb over its classes as
// whole vectors (pa, pb: rows of a buffer with kLanes floats to spare past its end; their pad lanes
// are masked by exp_shifted and never stored).
SENF_ALWAYS_INLINE void softmax_accumulate_blend(const ClassVecs& cv, float* total, const float* pa, const float* pb,
                                                 float wa, float wb, floatv_u* z, floatv_u* e, bool log_space) {
  const floatv_u* va = reinterpret_cast<const floatv_u*>(pa);
  const floatv_u* vb = reinterpret_cast<const floatv_u*>(pb);
  for (int64_t i = 0; i < cv.nv; ++i) z[i] = wa * va[i] + wb * vb[i];
  float m;
  const float s = exp_shifted(cv, z, e, &m);
  if (log_space) {
    const float lse = m + std::log(s);
    for (int64_t i = 0; i < cv.nv; ++i) cv.store(total, i, cv.load(total, i) + (z[i] - lse));
  } else {
    const float inv = 1.0f / s;
    for (int64_t i = 0; i < cv.nv; ++i) cv.store(total, i, cv.load(total, i) + e[i] * inv);
  }
}

// softmax over classes in place, per pixel (the product merge's normalisation).
template <typename T>
SENF_ALWAYS_INLINE void softmax_row_inplace(T* t, int64_t N) {
  T m;
  const T inv = T(1) / exp_shifted<T>(t, t, N, &m);
#pragma omp simd
  for (int64_t c = 0; c < N; ++c) t[c] *= inv;
}

// One learner as the merge reads it: the finest ones in their own (B, N, h1 * w1) layout, coarser
// ones channels-last (B, h, w, N) with their bilinear taps onto the finest grid.
template <typename T>
struct MergeInput {
  const T* data;
  bool finest;
  int64_t h, w;
  Axis<T> ay, ax;
};

// mean, product (log-space sum, then softmax), or log_sum: ensemble_cross_entropy's
// E = log(clamp(sum_i softmax(U_i), eps)) with clamp's pass mask
enum class Merge { kMean, kProduct, kLogSum };

struct MergeShape {
  int64_t h1, w1, N;
  Merge mode;
  double eps;    // kLogSum's clamp
  ClassVecs cv;  // N's class vectors, for the float kernel
  bool log_space() const { return mode == Merge::kProduct; }
};

// In place over n summed probabilities S: E = log(clamp(S, eps)), and active = S >= eps, where
// clamp passes its gradient (as torch's clamp: a NaN S stays NaN in E and is not active).
template <typename T>
SENF_ALWAYS_INLINE void log_clamp_row(T* s, bool* active, int64_t n, T eps) {
  int64_t j = 0;
  if constexpr (std::is_same<T, float>::value) {
    const floatv ve = splat(eps), lo = splat(std::numeric_limits<float>::min());
    const floatv hi = splat(std::numeric_limits<float>::max());
    for (; j + kLanes <= n; j += kLanes) {
      const floatv v = *reinterpret_cast<const floatv_u*>(s + j);
      const bytev act = __builtin_convertvector(v >= ve, bytev) & 1;
      std::memcpy(active + j, &act, kLanes);
      const floatv c = v < ve ? ve : v;
      const floatv odd = (c >= lo) & (c <= hi) ? floatv{} : splat(1.0f);  // 0, denormal, NaN, inf
      if (max_all(odd)[0] == 0.0f) {
        *reinterpret_cast<floatv_u*>(s + j) = log_normal(c);
      } else {
        for (int64_t i = 0; i < kLanes; ++i) s[j + i] = std::log(c[i]);
      }
    }
  }
  for (; j < n; ++j) {
    active[j] = s[j] >= eps;
    s[j] = std::log(s[j] < eps ? eps : s[j]);
  }
}

// Row y of image b of the merged scores, trow (w1, N) channels-last: every learner's softmax (or
// log_softmax) added in learner order while the row stays in cache, then the mean (for the product
// the softmax, for log_sum the clamped log and arow, its mask) taken in place -- the (B, h1, w1, N)
// total is written once. rv: the widest coarser learner's row; z: N; e: N * kTile.
template <typename T>
SENF_ALWAYS_INLINE void merge_row(const MergeInput<T>* in, int64_t K, const MergeShape& sh, int64_t b, int64_t y,
                                  T* trow, bool* arow, T* rv, T* z, T* e) {
  const int64_t w1 = sh.w1, N = sh.N, P = sh.h1 * w1;
  std::fill(trow, trow + w1 * N, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const MergeInput<T>& L = in[k];
    if (L.finest) {
      const T* u = L.data + b * N * P + y * w1;
      for (int64_t p0 = 0; p0 < w1; p0 += kTile)
        softmax_accumulate_tile<T>(trow + p0 * N, u + p0, P, N, std::min(kTile, w1 - p0), e, sh.log_space());
      continue;
    }
    const int64_t rown = L.w * N;
    const T* base = L.data + b * L.h * rown;
    blend<T>(rv, base + L.ay.i0[y] * rown, base + L.ay.i1[y] * rown, L.ay.l0[y], L.ay.l1[y], rown);
    for (int64_t x = 0; x < w1; ++x) {
      if constexpr (std::is_same<T, float>::value) {
        softmax_accumulate_blend(sh.cv, trow + x * N, rv + L.ax.i0[x] * N, rv + L.ax.i1[x] * N, L.ax.l0[x],
                                 L.ax.l1[x], reinterpret_cast<floatv_u*>(z), reinterpret_cast<floatv_u*>(e),
                                 sh.log_space());
      } else {
        blend<T>(z, rv + L.ax.i0[x] * N, rv + L.ax.i1[x] * N, L.ax.l0[x], L.ax.l1[x], N);
        softmax_accumulate_row<T>(trow + x * N, z, e, N, sh.log_space());
      }
    }
  }
  if (sh.mode == Merge::kProduct) {
    for (int64_t x = 0; x < w1; ++x) softmax_row_inplace<T>(trow + x * N, N);
  } else if (sh.mode == Merge::kLogSum) {
    log_clamp_row<T>(trow, arow, w1 * N, static_cast<T>(sh.eps));
  } else {
    const T k = static_cast<T>(K);
#pragma omp simd
    for (int64_t j = 0; j < w1 * N; ++j) trow[j] /= k;
  }
}

SENF_TARGET_CLONES void merge_row_f32(const MergeInput<float>* in, int64_t K, const MergeShape& sh, int64_t b,
                                      int64_t y, float* trow, bool* arow, float* rv, float* z, float* e) {
  merge_row<float>(in, K, sh, b, y, trow, arow, rv, z, e);
}

void merge_row_any(const MergeInput<float>* in, int64_t K, const MergeShape& sh, int64_t b, int64_t y, float* trow,
                   bool* arow, float* rv, float* z, float* e) {
  merge_row_f32(in, K, sh, b, y, trow, arow, rv, z, e);
}

void merge_row_any(const MergeInput<double>* in, int64_t K, const MergeShape& sh, int64_t b, int64_t y, double* trow,
                   bool* arow, double* rv, double* z, double* e) {
  merge_row<double>(in, K, sh, b, y, trow, arow, rv, z, e);
}

// 'vote': each learner votes with its top class's probability; ATen ops (not a hot path).
Tensor vote_scores(TensorList logits, bool align_corners) {
  const auto acc = acc_type(logits[0].scalar_type());
  const int64_t h1 = logits[0].size(2), w1 = logits[0].size(3);
  Tensor total;
  for (const auto& x : logits) {
    const Tensor s = at::softmax(resize_to(channels_last(x, acc), h1, w1, align_corners).permute({0, 2, 3, 1}), -1);
    const Tensor top = s.argmax(-1, /*keepdim=*/true);
    const Tensor v = at::zeros_like(s).scatter_(-1, top, s.gather(-1, top));
    total = total.defined() ? total.add_(v) : v.contiguous();
  }
  return total.div_(static_cast<double>(logits.size()));
}

// The merge kernel (every mode but vote): (B, h1, w1, N) channels-last in the accumulation dtype,
// and for kLogSum the (B, h1, w1, N) bool mask.
std::tuple<Tensor, Tensor> merge_rows(TensorList logits, Merge mode, bool align_corners, double eps) {
  const c10::NoGradGuard no_grad;
  const auto acc = acc_type(logits[0].scalar_type());
  const int64_t B = logits[0].size(0), N = logits[0].size(1), h1 = logits[0].size(2), w1 = logits[0].size(3);
  const MergeShape sh{h1, w1, N, mode, eps, ClassVecs(N)};
  const int64_t K = static_cast<int64_t>(logits.size());
  Tensor total = at::empty({B, h1, w1, N}, logits[0].options().dtype(acc));
  Tensor active = mode == Merge::kLogSum ? at::empty({B, h1, w1, N}, logits[0].options().dtype(at::kBool))
                                         : at::empty({0}, logits[0].options().dtype(at::kBool));
  bool* ap = mode == Merge::kLogSum ? active.data_ptr<bool>() : nullptr;
  // Owners of the learners' read layouts; a coarser learner is small, so its channels-last copy is cheap.
  std::vector<Tensor> keep;
  AT_DISPATCH_FLOATING_TYPES(acc, "senformer_merge_cpu", [&] {
    using T = scalar_t;
    std::vector<MergeInput<T>> in;
    int64_t widest = 0;
    for (const auto& x : logits) {
      const bool finest = x.size(2) == h1 && x.size(3) == w1;
      keep.push_back(finest ? x.to(acc).contiguous() : x.to(acc).permute({0, 2, 3, 1}).contiguous());
      in.push_back({keep.back().data_ptr<T>(), finest, x.size(2), x.size(3),
                    finest ? Axis<T>{} : bilinear_axis<T>(x.size(2), h1, align_corners),
                    finest ? Axis<T>{} : bilinear_axis<T>(x.size(3), w1, align_corners)});
      if (!finest) widest = std::max(widest, x.size(3));
    }
    T* tp = total.data_ptr<T>();
    at::parallel_for(0, B * h1, 1, [&](int64_t begin, int64_t end) {
      // rv: kLanes spare values (zeroed) for whole-vector loads; z: N padded to whole vectors
      std::vector<T> rv(widest * N + kLanes), z(sh.cv.nv * kLanes), e(N * kTile);
      for (int64_t idx = begin; idx < end; ++idx)
        merge_row_any(in.data(), K, sh, idx / h1, idx % h1, tp + idx * w1 * N, ap ? ap + idx * w1 * N : nullptr,
                      rv.data(), z.data(), e.data());
    });
  });
  return {total, active};
}

Tensor merge_scores_cpu(TensorList logits, c10::string_view merge_view, bool align_corners) {
  const std::string merge(merge_view);
  check_maps("ensemble_predict", logits);
  check_merge(merge);
  if (merge == "vote") {
    const c10::NoGradGuard no_grad;
    return vote_scores(logits, align_corners);
  }
  return std::get<0>(merge_rows(logits, merge == "product" ? Merge::kProduct : Merge::kMean, align_corners, 0.0));
}

// ensemble_cross_entropy's step log_sum_scores (ops.h) is this file's merge with the log-sum
// epilogue, as its Triton launcher (kernels/ensemble_ce.py) runs kernels/ensemble_predict.py's.
std::tuple<Tensor, Tensor> log_sum_scores_cpu(TensorList logits, bool align_corners, double eps) {
  check_maps("ensemble_cross_entropy", logits);
  return merge_rows(logits, Merge::kLogSum, align_corners, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(senformer, CPU, m) {
  m.impl("merge_scores", &merge_scores_cpu);
  m.impl("log_sum_scores", &log_sum_scores_cpu);
  m.impl("upsampled_argmax", &upsampled_argmax_cpu);
}

}  // namespace senformer
