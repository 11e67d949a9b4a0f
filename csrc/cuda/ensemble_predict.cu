// CUDA kernel of ensemble_predict: one warp per output pixel samples the merged channels-last grid
// (four taps, coalesced over classes) and reduces (value, index) to the first maximum, as
// torch.argmax. Only the (B, H, W) label map is written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers a bare toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/bilinear.cuh"
#include "ops.h"

namespace senformer {
namespace {

constexpr int kWarps = 8;

template <typename T>
__global__ void upsampled_argmax_kernel(const T* __restrict__ scores, int64_t* __restrict__ out, int64_t B, int64_t N,
                                        int64_t h1, int64_t w1, int64_t H, int64_t W, bool align, T sy, T sx) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t P = B * H * W;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + warp; p < P;
       p += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t x = p % W, y = (p / W) % H, b = p / (H * W);
    int64_t y0, y1, x0, x1;
    T ly0, ly1, lx0, lx1;
    bilinear_tap<T>(y, h1, H, align, sy, y0, y1, ly0, ly1);
    bilinear_tap<T>(x, w1, W, align, sx, x0, x1, lx0, lx1);
    const T* base = scores + b * h1 * w1 * N;
    const T* p00 = base + (y0 * w1 + x0) * N;
    const T* p01 = base + (y0 * w1 + x1) * N;
    const T* p10 = base + (y1 * w1 + x0) * N;
    const T* p11 = base + (y1 * w1 + x1) * N;
    T best = -INFINITY;
    int64_t idx = N;  // sentinel larger than any class: loses every tie
    for (int64_t c = lane; c < N; c += 32) {
      const T z = ly0 * (lx0 * p00[c] + lx1 * p01[c]) + ly1 * (lx0 * p10[c] + lx1 * p11[c]);
      if (z > best || idx == N) {
        best = z;
        idx = c;
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      const T ob = __shfl_xor_sync(0xffffffffu, best, off);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, off);
      if (oi != N && (idx == N || ob > best || (ob == best && oi < idx))) {
        best = ob;
        idx = oi;
      }
    }
    if (lane == 0) out[p] = idx;
  }
}

Tensor upsampled_argmax_cuda(const Tensor& scores, int64_t H, int64_t W, bool align_corners) {
  check_upsampled_argmax(scores, H, W);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), h1 = scores.size(1), w1 = scores.size(2), N = scores.size(3);
  Tensor out = at::empty({B, H, W}, scores.options().dtype(at::kLong));
  const int64_t P = B * H * W;
  if (P == 0) return out;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, scores.get_device()));
  const int64_t blocks = std::min<int64_t>((P + kWarps - 1) / kWarps, static_cast<int64_t>(sms) * 32);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "senformer_upsampled_argmax_cuda", [&] {
    upsampled_argmax_kernel<scalar_t><<<blocks, kWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), B, N, h1, w1, H, W, align_corners,
        bilinear_scale<scalar_t>(h1, H, align_corners), bilinear_scale<scalar_t>(w1, W, align_corners));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(senformer, CUDA, m) { m.impl("upsampled_argmax", &upsampled_argmax_cuda); }

}  // namespace senformer
