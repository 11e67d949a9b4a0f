// Shared declarations of senformer._C: argument checks, the device-agnostic orchestration of the
// ensemble ops, and the per-device kernels they call. Ops are registered in register.cpp (schemas,
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

// ---- ensemble cross-entropy ----
// Per-device pieces used by the shared orchestration in ensemble_ce.cpp.
struct CeKernels {
  // Number of non-ignored pixels (0-dim int64 tensor); raises ValueError (naming the value) for a
  // label outside [0, num_classes) that is not ignore_index.
  Tensor (*count_valid)(const Tensor& target, int64_t num_classes, int64_t ignore_index);
  // maps: (K, B, h1, w1, N) contiguous (channels-last learner grids, acc dtype); target (B, H, W)
  // int64. For every map k and non-ignored output pixel p, z = bilinear(map_k -> (H, W))[p]:
  // sums[k] = sum_p logsumexp(z) - z[target] (float64 vector (K,)) and, when need_grad, grad
  // (K, B, h1, w1, N) = adjoint of the resize applied to softmax(z) - onehot(target) (unscaled).
  std::tuple<Tensor, Tensor> (*upsampled_ce)(const Tensor& maps, const Tensor& target, int64_t ignore_index,
                                              bool align_corners, bool need_grad);
};

// (loss_ensemble, loss_learners, grads): grads are [dL_ens/dX_i ..., dL_learn/dX_i ...] (2M tensors)
// when need_grad, else empty.
std::tuple<Tensor, Tensor, std::vector<Tensor>> ensemble_ce_forward(
    TensorList logits, const Tensor& target, int64_t ignore_index, bool align_corners, double eps,
    bool need_grad, const CeKernels& kernels);

// ---- ensemble predict ----
// scores (B, h1, w1, N) contiguous acc dtype -> argmax over classes of bilinear(scores -> (H, W)),
// (B, H, W) int64.
using UpsampledArgmaxFn = Tensor (*)(const Tensor& scores, int64_t height, int64_t width, bool align_corners);

// Merged class scores on the finest grid, channels-last (B, h1, w1, N), ordered like
// reference.merged_scores.
Tensor merged_scores_cl(TensorList logits, const std::string& merge, bool align_corners);
using MergedScoresFn = Tensor (*)(TensorList logits, const std::string& merge, bool align_corners);
// `merged` lets a device replace the ATen merge with a fused one (same result, fewer passes).
Tensor ensemble_predict_forward(TensorList logits, int64_t height, int64_t width, const std::string& merge,
                                bool align_corners, UpsampledArgmaxFn argmax,
                                MergedScoresFn merged = &merged_scores_cl);

// x in dtype `acc`, stored channels-last: resizes keep that layout, so the (B, h, w, N) view the
// kernels read is contiguous and class-dim softmaxes take ATen's fast last-dim path.
inline Tensor channels_last(const Tensor& x, at::ScalarType acc) {
  return x.to(acc).contiguous(at::MemoryFormat::ChannelsLast);
}

// Learner maps resized to the finest grid (reference.learner_maps), in the accumulation dtype.
Tensor resize_to(const Tensor& x, int64_t h, int64_t w, bool align_corners);

}  // namespace senformer
