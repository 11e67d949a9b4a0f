// CPU kernel of ensemble_predict: bilinear upsample of the merged class scores fused with the
// argmax over classes, one output row at a time; only the (B, H, W) label map is written.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "cpu/bilinear.h"
#include "cpu/simd_math.h"
#include "ops.h"

namespace senformer {
namespace {

// First index of the maximum, as torch.argmax (NaN counts as the maximum).
template <typename T>
SENF_ALWAYS_INLINE void argmax_row(const T* rv, const int64_t* x0, const int64_t* x1, const T* lx0, const T* lx1,
                                   int64_t W, int64_t N, T* z, int64_t* out) {
  for (int64_t x = 0; x < W; ++x) {
    const T* pa = rv + x0[x] * N;
    const T* pb = rv + x1[x] * N;
    const T wa = lx0[x], wb = lx1[x];
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < N; ++c) {
      z[c] = wa * pa[c] + wb * pb[c];
      m = z[c] > m ? z[c] : m;
    }
    int64_t best = 0;
    for (int64_t c = 0; c < N; ++c) {
      if (z[c] == m || std::isnan(z[c])) {
        best = c;
        break;
      }
    }
    out[x] = best;
  }
}

SENF_TARGET_CLONES void blend_f32(float* rv, const float* r0, const float* r1, float l0, float l1, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) rv[j] = l0 * r0[j] + l1 * r1[j];
}

void blend_f32_or_f64(double* rv, const double* r0, const double* r1, double l0, double l1, int64_t n) {
  for (int64_t j = 0; j < n; ++j) rv[j] = l0 * r0[j] + l1 * r1[j];
}

void blend_f32_or_f64(float* rv, const float* r0, const float* r1, float l0, float l1, int64_t n) {
  blend_f32(rv, r0, r1, l0, l1, n);
}

SENF_TARGET_CLONES void argmax_row_f32(const float* rv, const int64_t* x0, const int64_t* x1, const float* lx0,
                                       const float* lx1, int64_t W, int64_t N, float* z, int64_t* out) {
  argmax_row<float>(rv, x0, x1, lx0, lx1, W, N, z, out);
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
  TORCH_CHECK(scores.is_contiguous() && scores.dim() == 4, "upsampled_argmax_cpu: scores must be contiguous (B, h1, w1, N)");
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
        argmax_row_any(rv.data(), ax.i0.data(), ax.i1.data(), ax.l0.data(), ax.l1.data(), W, N, z.data(),
                       op + idx * W);
      }
    });
  });
  return out;
}

// total[r, :] += softmax(u[r, :]) (or log_softmax when log_space), one class row at a time: replaces
// ATen's softmax + add (two passes and a temporary grid per learner) in the 'mean' / 'product' merges.
template <typename T>
SENF_ALWAYS_INLINE void softmax_accumulate_row(T* total, const T* z, T* e, int64_t N, bool log_space) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < N; ++c) m = z[c] > m ? z[c] : m;
#pragma omp simd
  for (int64_t c = 0; c < N; ++c) e[c] = exp_nonpos(z[c] - m);
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < N; ++c) s += e[c];
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

SENF_TARGET_CLONES void softmax_accumulate_rows_f32(float* total, const float* z, float* e, int64_t rows, int64_t N,
                                                    bool log_space) {
  for (int64_t r = 0; r < rows; ++r) softmax_accumulate_row<float>(total + r * N, z + r * N, e, N, log_space);
}

void softmax_accumulate_rows(float* total, const float* z, float* e, int64_t rows, int64_t N, bool log_space) {
  softmax_accumulate_rows_f32(total, z, e, rows, N, log_space);
}

void softmax_accumulate_rows(double* total, const double* z, double* e, int64_t rows, int64_t N, bool log_space) {
  for (int64_t r = 0; r < rows; ++r) softmax_accumulate_row<double>(total + r * N, z + r * N, e, N, log_space);
}

Tensor merged_scores_cpu(TensorList logits, const std::string& merge, bool align_corners) {
  if (merge == "vote") return merged_scores_cl(logits, merge, align_corners);
  const auto acc = acc_type(logits[0].scalar_type());
  const int64_t h1 = logits[0].size(2), w1 = logits[0].size(3), N = logits[0].size(1);
  const bool log_space = merge == "product";
  Tensor total;
  for (size_t i = 0; i < logits.size(); ++i) {
    const Tensor u = resize_to(channels_last(logits[i], acc), h1, w1, align_corners).permute({0, 2, 3, 1}).contiguous();
    if (i == 0) total = at::zeros_like(u);
    const int64_t rows = u.numel() / N;
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "senformer_merge_cpu", [&] {
      scalar_t* tp = total.data_ptr<scalar_t>();
      const scalar_t* up = u.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> e(N);
        softmax_accumulate_rows(tp + begin * N, up + begin * N, e.data(), end - begin, N, log_space);
      });
    });
  }
  if (log_space) return at::softmax(total, -1);
  return total.div_(static_cast<double>(logits.size()));
}

Tensor ensemble_predict_cpu(TensorList logits, int64_t height, int64_t width, c10::string_view merge,
                            bool align_corners) {
  return ensemble_predict_forward(logits, height, width, std::string(merge), align_corners, &upsampled_argmax_cpu,
                                  &merged_scores_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(senformer, CPU, m) { m.impl("ensemble_predict", &ensemble_predict_cpu); }

}  // namespace senformer
