// Argument checks of senformer._C. They mirror senformer/ops/_checks.py so that a bad call fails
// the same way whichever backend runs it; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE map to Python's
// ValueError / TypeError.
#include "ops.h"

namespace senformer {

void check_maps(const char* op, TensorList logits) {
  TORCH_CHECK_TYPE(!logits.empty(), op, ": logits must be a non-empty list of (B, N, h, w) tensors, finest first");
  const Tensor& first = logits[0];
  for (size_t i = 0; i < logits.size(); ++i) {
    const Tensor& x = logits[i];
    TORCH_CHECK_VALUE(x.defined() && x.dim() == 4, op, ": logits[", i, "] must be a 4-D tensor (B, N, h, w), got ",
                      x.defined() ? x.sizes() : at::IntArrayRef{});
    TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": logits[", i, "] must be floating point, got ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(x.size(0) == first.size(0) && x.size(1) == first.size(1), op, ": logits[", i,
                      "] has (B, N) = (", x.size(0), ", ", x.size(1), "), logits[0] has (", first.size(0), ", ",
                      first.size(1), ")");
    TORCH_CHECK_TYPE(x.device() == first.device() && x.scalar_type() == first.scalar_type(), op, ": logits[", i,
                     "] is ", x.scalar_type(), " on ", x.device(), ", logits[0] is ", first.scalar_type(), " on ",
                     first.device());
    TORCH_CHECK_VALUE(x.size(2) >= 1 && x.size(3) >= 1, op, ": logits[", i, "] has an empty spatial size (",
                      x.size(2), ", ", x.size(3), ")");
  }
  TORCH_CHECK_VALUE(first.size(1) >= 1, op, ": logits need at least one class (N >= 1)");
}

void check_target(const char* op, TensorList logits, const Tensor& target) {
  TORCH_CHECK_VALUE(target.defined() && target.dim() == 3, op, ": target must be a (B, H, W) integer tensor, got ",
                    target.defined() ? target.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), op,
                   ": target must hold integer class labels, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.size(0) == logits[0].size(0), op, ": target batch ", target.size(0),
                    " != logits batch ", logits[0].size(0));
  TORCH_CHECK_VALUE(target.device() == logits[0].device(), op, ": target on ", target.device(), ", logits on ",
                    logits[0].device());
}

void check_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* names[3] = {"q", "k", "v"};
  const Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(ts[i]->dim() == 4, "class_cross_attention: ", names[i], " must be 4-D (B, H, len, D), got shape ",
                      ts[i]->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(ts[i]->scalar_type()), "class_cross_attention: ", names[i],
                     " must be floating point, got ", ts[i]->scalar_type());
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "class_cross_attention: k ", k.sizes(), " and v ", v.sizes(),
                    " must have the same shape");
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
                    "class_cross_attention: q ", q.sizes(), " and k ", k.sizes(), " must agree on B, H and D");
  TORCH_CHECK_VALUE(k.size(2) >= 1, "class_cross_attention: k and v need at least one key (L >= 1)");
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(),
                    "class_cross_attention: q, k, v on different devices (", q.device(), ", ", k.device(), ", ",
                    v.device(), ")");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "class_cross_attention: q, k, v dtypes differ (", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type(), ")");
}

void check_mask_logits(const Tensor& features, const Tensor& cls, int64_t h, int64_t w) {
  TORCH_CHECK_VALUE(features.dim() == 3 && cls.dim() == 3,
                    "mask_logits: features must be (B, L, C) and cls (B, N, C); got ", features.sizes(), " and ",
                    cls.sizes());
  TORCH_CHECK_VALUE(features.size(0) == cls.size(0) && features.size(2) == cls.size(2), "mask_logits: features ",
                    features.sizes(), " and cls ", cls.sizes(), " must agree on B and C");
  TORCH_CHECK_VALUE(h >= 0 && w >= 0 && h * w == features.size(1), "mask_logits: hw=", h, "x", w,
                    " does not match the ", features.size(1), " tokens of features");
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()), "mask_logits: features must be floating point, got ",
                   features.scalar_type());
  TORCH_CHECK_TYPE(features.scalar_type() == cls.scalar_type() && features.device() == cls.device(),
                   "mask_logits: features (", features.scalar_type(), ", ", features.device(), ") and cls (",
                   cls.scalar_type(), ", ", cls.device(), ") must share dtype and device");
}

void check_merge(const std::string& merge) {
  TORCH_CHECK_VALUE(merge == "mean" || merge == "product" || merge == "vote",
                    "ensemble_predict: merge must be one of ('mean', 'product', 'vote'), got '", merge, "'");
}

void check_upsampled_ce(const Tensor& maps, const Tensor& target) {
  TORCH_CHECK_VALUE(maps.is_contiguous() && maps.dim() == 5 && at::isFloatingType(maps.scalar_type()),
                    "upsampled_ce: maps must be a contiguous floating (K, B, h1, w1, N) tensor, got ", maps.sizes());
  TORCH_CHECK_VALUE(target.is_contiguous() && target.scalar_type() == at::kLong && target.dim() == 3 &&
                        target.size(0) == maps.size(1),
                    "upsampled_ce: target must be a contiguous int64 (B, H, W) tensor with B = maps.size(1), got ",
                    target.scalar_type(), " ", target.sizes());
}

void check_upsampled_argmax(const Tensor& scores, int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(scores.is_contiguous() && scores.dim() == 4 && at::isFloatingType(scores.scalar_type()),
                    "upsampled_argmax: scores must be a contiguous floating (B, h1, w1, N) tensor, got ", scores.sizes());
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "upsampled_argmax: size must be positive, got (", height, ", ", width,
                    ")");
}

void check_learner_map(const Tensor& x, int64_t height, int64_t width, const c10::optional<Tensor>& d_sum) {
  TORCH_CHECK_VALUE(x.dim() == 4 && at::isFloatingType(x.scalar_type()),
                    "learner_map: x must be a floating (B, N, h, w) tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "learner_map: size must be positive, got (", height, ", ", width, ")");
  if (!d_sum.has_value() || !d_sum->defined()) return;
  TORCH_CHECK_VALUE(d_sum->sizes() == at::IntArrayRef({x.size(0), height, width, x.size(1)}) &&
                        d_sum->scalar_type() == acc_type(x.scalar_type()),
                    "learner_map: d_sum must be (B, height, width, N) = (", x.size(0), ", ", height, ", ", width, ", ",
                    x.size(1), ") in ", acc_type(x.scalar_type()), ", got ", d_sum->scalar_type(), " ",
                    d_sum->sizes());
}

void check_combine_grads(const Tensor& d_ens, const Tensor& d_learn, const Tensor& scale_e, const Tensor& scale_l) {
  // d_learn's pixels must be evenly spaced (h and w flatten into one stride)
  const bool flat = d_learn.dim() == 4 && (d_learn.size(2) <= 1 || d_learn.size(3) <= 1 ||
                                           d_learn.stride(2) == d_learn.size(3) * d_learn.stride(3));
  TORCH_CHECK_VALUE(d_ens.dim() == 4 && d_ens.sizes() == d_learn.sizes() &&
                        d_ens.scalar_type() == d_learn.scalar_type() && at::isFloatingType(d_ens.scalar_type()) &&
                        d_ens.is_contiguous() && flat,
                    "combine_grads: d_ens ", d_ens.sizes(), " ", d_ens.scalar_type(), " and d_learn ", d_learn.sizes(),
                    " ", d_learn.scalar_type(), " strides ", d_learn.strides(),
                    " must be of one floating (B, N, h, w) shape and dtype, d_ens contiguous, d_learn contiguous or "
                    "channels-last");
  TORCH_CHECK_VALUE(scale_e.numel() == 1 && scale_l.numel() == 1,
                    "combine_grads: scale_e and scale_l must hold one element each");
}

void check_log_sum_grad(const Tensor& d_e, const Tensor& e, const Tensor& active) {
  TORCH_CHECK_VALUE(d_e.dim() == 4 && e.sizes() == d_e.sizes() && active.sizes() == d_e.sizes() &&
                        at::isFloatingType(d_e.scalar_type()) && e.scalar_type() == d_e.scalar_type() &&
                        active.scalar_type() == at::kBool && d_e.is_contiguous() && e.is_contiguous() &&
                        active.is_contiguous(),
                    "log_sum_grad: d_e ", d_e.sizes(), " ", d_e.scalar_type(), ", e ", e.sizes(), " ",
                    e.scalar_type(), " and active ", active.sizes(), " ", active.scalar_type(),
                    " must be contiguous (B, h1, w1, N) tensors of one shape, d_e and e of one floating dtype, "
                    "active bool");
}

void check_learner_grads(const Tensor& x, const Tensor& d_sum, const Tensor& g) {
  TORCH_CHECK_VALUE(x.dim() == 4 && at::isFloatingType(x.scalar_type()),
                    "learner_grads: x must be a floating (B, N, h, w) tensor, got ", x.scalar_type(), " ", x.sizes());
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK_VALUE(d_sum.dim() == 4 && d_sum.size(0) == x.size(0) && d_sum.size(3) == x.size(1) &&
                        g.sizes() == d_sum.sizes() && d_sum.scalar_type() == acc && g.scalar_type() == acc &&
                        d_sum.is_contiguous() && g.is_contiguous(),
                    "learner_grads: d_sum ", d_sum.sizes(), " ", d_sum.scalar_type(), " and g ", g.sizes(), " ",
                    g.scalar_type(), " must be contiguous (B, h1, w1, N) = (", x.size(0), ", h1, w1, ", x.size(1),
                    ") tensors in ", acc);
}

}  // namespace senformer
