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

Tensor ensemble_predict_cpu(TensorList logits, int64_t height, int64_t width, c10::string_view merge,
                            bool align_corners) {
  return ensemble_predict_forward(logits, height, width, std::string(merge), align_corners, &upsampled_argmax_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(senformer, CPU, m) { m.impl("ensemble_predict", &ensemble_predict_cpu); }

}  // namespace senformer
