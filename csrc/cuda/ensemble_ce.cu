// CUDA kernel of ensemble_cross_entropy's full-resolution step, upsampled_ce (contract in ops.h; the
// autograd chain around it is senformer/ops/ensemble_ce.py). One warp per output pixel: lanes stride over classes, sample
// the four source taps of the channels-last grid (coalesced over classes), reduce max / sum of
// exps across the warp, and scatter softmax - onehot back to the taps with atomics. Losses are
// reduced per block and added once per block (float64 atomics).
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
__global__ void upsampled_ce_kernel(const T* __restrict__ maps, const int64_t* __restrict__ target, T* __restrict__ grad,
                                    double* __restrict__ sums, int64_t k, int64_t B, int64_t N, int64_t h1, int64_t w1,
                                    int64_t H, int64_t W, int64_t ignore, bool align, T sy, T sx) {
  __shared__ double block_loss[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t P = B * H * W, plane = h1 * w1 * N;
  double loss = 0.0;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + warp; p < P;
       p += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t t = target[p];
    if (t == ignore || t < 0 || t >= N) continue;  // bad labels are reported by the label summary
    const int64_t x = p % W, y = (p / W) % H, b = p / (H * W);
    int64_t y0, y1, x0, x1;
    T ly0, ly1, lx0, lx1;
    bilinear_tap<T>(y, h1, H, align, sy, y0, y1, ly0, ly1);
    bilinear_tap<T>(x, w1, W, align, sx, x0, x1, lx0, lx1);
    const T* base = maps + (k * B + b) * plane;
    const T* p00 = base + (y0 * w1 + x0) * N;
    const T* p01 = base + (y0 * w1 + x1) * N;
    const T* p10 = base + (y1 * w1 + x0) * N;
    const T* p11 = base + (y1 * w1 + x1) * N;
    auto z = [&](int64_t c) { return ly0 * (lx0 * p00[c] + lx1 * p01[c]) + ly1 * (lx0 * p10[c] + lx1 * p11[c]); };
    T m = -INFINITY;
    for (int64_t c = lane; c < N; c += 32) m = max(m, z(c));
    m = warp_max(m);
    T s = T(0);
    for (int64_t c = lane; c < N; c += 32) s += exp(z(c) - m);
    s = warp_sum(s);
    if (lane == 0) loss += static_cast<double>(m) + log(static_cast<double>(s)) - static_cast<double>(z(t));
    if (grad != nullptr) {
      T* gbase = grad + (k * B + b) * plane;
      const T inv = T(1) / s;
      const T w00 = ly0 * lx0, w01 = ly0 * lx1, w10 = ly1 * lx0, w11 = ly1 * lx1;
      for (int64_t c = lane; c < N; c += 32) {
        const T d = exp(z(c) - m) * inv - (c == t ? T(1) : T(0));
        atomicAdd(gbase + (y0 * w1 + x0) * N + c, w00 * d);
        atomicAdd(gbase + (y0 * w1 + x1) * N + c, w01 * d);
        atomicAdd(gbase + (y1 * w1 + x0) * N + c, w10 * d);
        atomicAdd(gbase + (y1 * w1 + x1) * N + c, w11 * d);
      }
    }
  }
  if (lane == 0) block_loss[warp] = loss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int i = 0; i < kWarps; ++i) total += block_loss[i];
    atomicAdd(sums + k, total);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> upsampled_ce_cuda(const Tensor& maps, const Tensor& target,
                                                             int64_t ignore_index, bool align_corners, bool need_grad) {
  check_upsampled_ce(maps, target);
  const c10::cuda::CUDAGuard guard(maps.device());
  if (need_grad) {
    // The gradient is scattered with fp32 atomics: say so under torch.use_deterministic_algorithms
    // (senformer.ops then picks the Triton kernel's ordered gather, or the reference).
    at::globalContext().alertNotDeterministic("senformer::upsampled_ce with need_grad (cuda)");
  }
  const int64_t K = maps.size(0), B = maps.size(1), h1 = maps.size(2), w1 = maps.size(3), N = maps.size(4);
  const int64_t H = target.size(1), W = target.size(2);
  Tensor sums = at::zeros({K}, maps.options().dtype(at::kDouble));
  Tensor grad = need_grad ? at::zeros_like(maps) : at::empty({0}, maps.options());
  // Label summary with ATen ops on the device: no host sync (the caller decides when to look).
  const Tensor labelled = target != ignore_index;
  const Tensor bad = labelled & ((target < 0) | (target >= N));
  const Tensor count = (labelled & bad.logical_not()).sum();
  const Tensor none = at::full({}, -(int64_t(1) << 62), target.options());  // "no bad label here"
  const Tensor summary = at::stack({bad.sum(), target.numel() > 0 ? at::where(bad, target, none).max() : none});
  const int64_t P = B * H * W;
  if (P == 0) return {sums, count, summary, grad};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, maps.get_device()));
  const int64_t blocks = std::min<int64_t>((P + kWarps - 1) / kWarps, static_cast<int64_t>(sms) * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "senformer_upsampled_ce_cuda", [&] {
    const scalar_t sy = bilinear_scale<scalar_t>(h1, H, align_corners);
    const scalar_t sx = bilinear_scale<scalar_t>(w1, W, align_corners);
    for (int64_t k = 0; k < K; ++k) {
      upsampled_ce_kernel<scalar_t><<<blocks, kWarps * 32, 0, stream>>>(
          maps.data_ptr<scalar_t>(), target.data_ptr<int64_t>(),
          need_grad ? grad.data_ptr<scalar_t>() : nullptr, sums.data_ptr<double>(), k, B, N, h1, w1, H, W,
          ignore_index, align_corners, sy, sx);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {sums, count, summary, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(senformer, CUDA, m) { m.impl("upsampled_ce", &upsampled_ce_cuda); }

}  // namespace senformer
