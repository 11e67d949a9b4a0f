// Shared declarations of senformer._C: argument checks, the kernel-level steps' contracts and small
// ATen helpers. Ops are registered in register.cpp (schemas,
// autograd, meta) and in the per-device files (CPU / CUDA kernels).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace senformer {

using at::Tensor;
using at::TensorList;

// Accumulation dtype: float64 stays float64, everything else (f32/bf16/f16) accumulates in f32.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- argument checks (each message names the op and the argument) ----
void check_maps(const char* op, TensorList logits);
void check_target(const char* op, TensorList logits, const Tensor& target);
void check_attention(const Tensor& q, const Tensor& k, const Tensor& v);
void check_mask_logits(const Tensor& features, const Tensor& cls, int64_t h, int64_t w);
void check_merge(const std::string& merge);
void check_upsampled_ce(const Tensor& maps, const Tensor& target);
void check_upsampled_argmax(const Tensor& scores, int64_t height, int64_t width);
void check_learner_map(const Tensor& x, int64_t height, int64_t width, const c10::optional<Tensor>& d_sum);
void check_combine_grads(const Tensor& d_ens, const Tensor& d_learn, const Tensor& scale_e, const Tensor& scale_l);
void check_log_sum_grad(const Tensor& d_e, const Tensor& e, const Tensor& active);
void check_learner_grads(const Tensor& x, const Tensor& d_sum, const Tensor& g);

// ---- kernel-level steps of the ensemble ops ----
// The ops' autograd chains live once, in senformer/ops/ensemble_ce.py and ensemble_predict.py; the
// extension provides their steps under the Triton launchers' names and contracts
// (kernels/ensemble_ce.py, kernels/ensemble_predict.py): on CUDA only the full-resolution ones
// (upsampled_ce, upsampled_argmax), on the CPU every one below:
//
//   upsampled_ce(maps (K, B, h1, w1, N) contiguous acc dtype, target (B, H, W) int64 contiguous,
//                ignore_index, align_corners, need_grad)
//     -> (sums (K,) float64: per map, the NLL summed over valid pixels of bilinear(map -> (H, W));
//         count () int64: valid pixels; bad (2,) int64: [labels outside [0, N) and not ignored,
//         one such label]; grad: (K, B, h1, w1, N) d(sums[k])/d(map k), or an empty tensor).
//     A bad label counts as ignored; nothing syncs with the host, the caller inspects `bad`.
//   upsampled_argmax(scores (B, h1, w1, N) contiguous acc dtype, height, width, align_corners)
//     -> (B, H, W) int64 labels of bilinear(scores -> (H, W)), first maximum as torch.argmax.
//   merge_scores(logits, merge, align_corners) (CPU) -> (B, h1, w1, N) merged scores as
//     reference.merged_scores, channels-last. (Triton's, kernels/ensemble_predict.py, also takes row_align.)
//   learner_map(x (B, N, h, w), height, width, align_corners, d_sum (B, h1, w1, N) acc dtype or None) (CPU)
//     -> (U = resize(x -> (h1, w1)) (B, h1, w1, N) contiguous acc dtype, dU = P * (d_sum - <P, d_sum>)
//        with P = softmax(U) over classes, (B, h1, w1, N), or an empty tensor without d_sum). dU's memory
//        is the layout its consumer wants (learner_map_grad_buffer): class-major when x is already
//        (h1, w1) -- x's own gradient --, else channels-last, which ATen's bilinear backward reads fastest.
//   learner_grads(x (B, N, h, w), d_sum, g: (B, h1, w1, N) contiguous acc dtype, align_corners) (CPU)
//     -> (dX_ens, dX_learn) (B, N, h, w) contiguous acc dtype: the resize's adjoint applied to dU = softmax'(U)^T d_sum
//        (U = resize(x -> (h1, w1)), as learner_map's d_sum call, which this replaces for a resized learner) and to g.
//   log_sum_scores(logits, align_corners, eps) (CPU) -> (E = log(clamp(S, eps)) of S = sum_i softmax(U_i), (B, h1,
//     w1, N) contiguous acc dtype; active = S >= eps, (B, h1, w1, N) bool): the 'mean' merge's pass, summed, with a
//     log epilogue. (Triton's also takes row_align.)
//   log_sum_grad(d_e, e, active: (B, h1, w1, N) contiguous, active bool) (CPU) -> dS = d_e * exp(-e) where active,
//     else 0, contiguous.
//   combine_grads(d_ens (B, N, h, w) contiguous, d_learn of its shape and dtype, contiguous or a channels-last
//                 view, scale_e, scale_l one-element tensors, dtype) (CPU)
//     -> d_ens * scale_e + d_learn * scale_l in `dtype`, (B, N, h, w) contiguous: the loss's backward.

// x in dtype `acc`, stored channels-last: resizes keep that layout, so the (B, h, w, N) view the
// kernels read is contiguous and class-dim softmaxes take ATen's fast last-dim path.
inline Tensor channels_last(const Tensor& x, at::ScalarType acc) {
  return x.to(acc).contiguous(at::MemoryFormat::ChannelsLast);
}

// learner_map's dU buffer (B, h1, w1, N): a permuted class-major tensor when x is (h1, w1) already,
// else contiguous channels-last; empty without a gradient.
inline Tensor learner_map_grad_buffer(const Tensor& x, int64_t h1, int64_t w1, bool grad) {
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  if (!grad) return at::empty({0}, opts);
  const int64_t B = x.size(0), N = x.size(1);
  if (x.size(2) == h1 && x.size(3) == w1) return at::empty({B, N, h1, w1}, opts).permute({0, 2, 3, 1});
  return at::empty({B, h1, w1, N}, opts);
}

// Learner maps resized to the finest grid (reference.learner_maps); the identity at equal size.
inline Tensor resize_to(const Tensor& x, int64_t h, int64_t w, bool align_corners) {
  if (x.size(2) == h && x.size(3) == w) return x;
  return at::upsample_bilinear2d(x, {h, w}, align_corners);
}

}  // namespace senformer
