// ensemble_cross_entropy, device-agnostic part: everything that lives on the finest learner grid
// (h1, w1) is a handful of ATen ops; only the full-resolution step (sample the grid per output pixel,
// log-sum-exp, gradient) is a per-device kernel (CeKernels), so no (B, N, H, W) tensor is built.
#include <c10/core/GradMode.h>

#include "ops.h"

namespace senformer {

Tensor resize_to(const Tensor& x, int64_t h, int64_t w, bool align_corners) {
  if (x.size(2) == h && x.size(3) == w) return x;  // reference.resize is the identity here
  return at::upsample_bilinear2d(x, {h, w}, align_corners);
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> ensemble_ce_forward(
    TensorList logits, const Tensor& target, int64_t ignore_index, bool align_corners, double eps, bool need_grad,
    const CeKernels& kernels) {
  const char* op = "ensemble_cross_entropy";
  const c10::NoGradGuard no_grad;  // gradients are computed explicitly below
  check_maps(op, logits);
  check_target(op, logits, target);
  const int64_t M = static_cast<int64_t>(logits.size());
  const int64_t B = logits[0].size(0), N = logits[0].size(1), h1 = logits[0].size(2), w1 = logits[0].size(3);
  const auto acc = acc_type(logits[0].scalar_type());
  const Tensor tgt = target.to(at::kLong).contiguous();
  // Label check first: a bad call should fail before any real work.
  const Tensor count = kernels.count_valid(tgt, N, ignore_index);

  // maps[0] = E = log(clamp(sum_i softmax(U_i), eps)), maps[1 + i] = U_i; channels-last so that the
  // kernels' class loops are contiguous. S is summed straight into maps[0] and turned into E in
  // place: no extra grids.
  Tensor maps = at::empty({M + 1, B, h1, w1, N}, logits[0].options().dtype(acc));
  Tensor E = maps[0];
  for (int64_t i = 0; i < M; ++i) {
    Tensor u = maps[1 + i];
    const Tensor& x = logits[i];
    if (x.size(2) == h1 && x.size(3) == w1) {
      u.copy_(x.permute({0, 2, 3, 1}));
    } else {
      u.copy_(resize_to(channels_last(x, acc), h1, w1, align_corners).permute({0, 2, 3, 1}));
    }
    if (i == 0) {
      E.copy_(at::softmax(u, -1));
    } else {
      E.add_(at::softmax(u, -1));
    }
  }
  E.clamp_min_(eps).log_();

  Tensor sums, grad;
  std::tie(sums, grad) = kernels.upsampled_ce(maps, tgt, ignore_index, align_corners, need_grad);
  // Mean over non-ignored pixels; all ignored -> 0 / 1 = 0, never NaN.
  const Tensor denom = count.clamp_min(1).to(at::kDouble);
  Tensor loss_ens = (sums[0] / denom).to(acc);
  Tensor loss_learn = (sums.narrow(0, 1, M).sum() / (denom * static_cast<double>(M))).to(acc);

  std::vector<Tensor> grads;
  if (!need_grad) return {loss_ens, loss_learn, grads};
  grads.resize(2 * M);
  const Tensor inv = (1.0 / denom).to(acc);
  // In place where possible: the loss's extra memory is the point of this op.
  // Back through E = log(clamp(S, eps)): clamp_min passes the gradient where S >= eps (as torch does).
  // dE/dS = 1 / clamp(S, eps) = exp(-E), and 0 where the clamp was active (E == log(eps); this
  // also drops the gradient at S == eps exactly, where torch would keep it: a measure-zero set).
  const Tensor clamped = E <= at::scalar_tensor(eps, E.options()).log();
  Tensor dS = grad[0];
  dS.mul_(inv).mul_(E.neg_().exp_()).masked_fill_(clamped, 0);
  const Tensor inv_m = inv / static_cast<double>(M);
  for (int64_t i = 0; i < M; ++i) {
    Tensor d_ens;
    {
      const Tensor p = at::softmax(maps[1 + i], -1);
      // <p, dS> per pixel as a batched dot product: no (p * dS) temporary grid.
      const Tensor dot = at::matmul(p.unsqueeze(-2), dS.unsqueeze(-1)).squeeze(-1);
      d_ens = (dS - dot).mul_(p);
    }
    Tensor d_learn = grad[1 + i].mul_(inv_m);
    for (int which = 0; which < 2; ++which) {
      // (B, N, h1, w1) view of channels-last memory: upsample's backward takes it without a copy.
      Tensor g = (which == 0 ? d_ens : d_learn).permute({0, 3, 1, 2});
      const Tensor& x = logits[i];
      if (x.size(2) != h1 || x.size(3) != w1) {
        g = at::upsample_bilinear2d_backward(g, {h1, w1}, x.sizes(), align_corners);
      }
      grads[which * M + i] = g.to(x.scalar_type()).contiguous();
    }
  }
  return {loss_ens, loss_learn, grads};
}

}  // namespace senformer
