// ensemble_predict, device-agnostic part: the merge runs on the finest learner grid with ATen ops;
// the per-device kernel samples the merged grid per output pixel and keeps only the argmax.
#include <c10/core/GradMode.h>

#include "ops.h"

namespace senformer {

Tensor merged_scores_cl(TensorList logits, const std::string& merge, bool align_corners) {
  const auto acc = acc_type(logits[0].scalar_type());
  const int64_t h1 = logits[0].size(2), w1 = logits[0].size(3);
  Tensor total;
  for (size_t i = 0; i < logits.size(); ++i) {
    const Tensor u = resize_to(channels_last(logits[i], acc), h1, w1, align_corners).permute({0, 2, 3, 1});
    Tensor s;
    if (merge == "product") {
      s = at::log_softmax(u, -1);
    } else {
      s = at::softmax(u, -1);
      if (merge == "vote") {
        const Tensor top = s.argmax(-1, /*keepdim=*/true);
        s = at::zeros_like(s).scatter_(-1, top, s.gather(-1, top));
      }
    }
    total = i == 0 ? s.contiguous() : total.add_(s);
  }
  // Normalise exactly as the reference does: the scores are resized before the argmax, and a
  // bilinear blend of probabilities does not rank classes like a blend of log-probabilities.
  if (merge == "product") return at::softmax(total, -1);
  return total.div_(static_cast<double>(logits.size()));
}

Tensor ensemble_predict_forward(TensorList logits, int64_t height, int64_t width, const std::string& merge,
                                bool align_corners, UpsampledArgmaxFn argmax, MergedScoresFn merged) {
  check_maps("ensemble_predict", logits);
  check_merge(merge);
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "ensemble_predict: size must be positive, got (", height, ", ", width,
                    ")");
  const c10::NoGradGuard no_grad;  // the merge's ATen calls must not record autograd history
  return argmax(merged(logits, merge, align_corners), height, width, align_corners);
}

}  // namespace senformer
