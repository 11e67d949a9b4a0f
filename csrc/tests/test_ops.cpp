// C++ test of the senformer ops, run by ctest: each op is called through the dispatcher by its
// registered schema (as any C++ caller would) and compared with a plain libtorch reimplementation,
// in float64 at small ragged sizes. Exit status 0 = all checks passed.
#include <torch/torch.h>

#include <iostream>
#include <string>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << std::endl;
  if (!ok) ++failures;
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).norm() / b.norm().clamp_min(1e-30)).item<double>();
}

c10::OperatorHandle op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

at::Tensor resize(const at::Tensor& x, int64_t h, int64_t w) {
  if (x.size(2) == h && x.size(3) == w) return x;
  return at::upsample_bilinear2d(x, {h, w}, false);
}

// Mean NLL over non-ignored pixels (0 when all are ignored), as reference.masked_cross_entropy.
at::Tensor masked_ce(const at::Tensor& z, const at::Tensor& target, int64_t ignore) {
  const auto valid = target != ignore;
  const auto safe = at::where(valid, target, at::zeros_like(target));
  auto nll = -at::log_softmax(z, 1).gather(1, safe.unsqueeze(1)).squeeze(1);
  nll = at::where(valid, nll, at::zeros_like(nll));
  return nll.sum() / valid.sum().clamp_min(1).to(nll.scalar_type());
}

// upsampled_ce, the loss's full-resolution step: NLL sums of bilinear(map_k -> (H, W)) and their
// gradients w.r.t. each channels-last map, against autograd through plain libtorch ops.
void test_upsampled_ce() {
  const int64_t K = 2, B = 2, N = 7, h = 5, w = 6, H = 19, W = 23;
  auto maps = (torch::randn({K, B, h, w, N}, torch::kDouble) * 3).requires_grad_(true);
  auto target = torch::randint(0, N, {B, H, W}, torch::kLong);
  target.masked_fill_(torch::rand({B, H, W}) < 0.2, 255);
  std::vector<at::Tensor> ref_sums;
  for (int64_t k = 0; k < K; ++k) {
    const auto z = resize(maps[k].permute({0, 3, 1, 2}), H, W);
    ref_sums.push_back(masked_ce(z, target, 255) * (target != 255).sum().to(torch::kDouble));
  }
  const auto ref = at::stack(ref_sums);
  const auto ref_grad = torch::autograd::grad({ref.sum()}, {maps})[0];

  auto step = op("senformer::upsampled_ce")
                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                    int64_t, bool, bool)>();
  const at::NoGradGuard no_grad;
  auto [sums, count, bad, grad] = step.call(maps.detach(), target, 255, false, true);
  check(rel(sums, ref.detach()) < 1e-10, "upsampled_ce NLL sums");
  check(rel(grad, ref_grad) < 1e-10, "upsampled_ce gradient of every map");
  check(count.item<int64_t>() == (target != 255).sum().item<int64_t>() && bad[0].item<int64_t>() == 0,
        "upsampled_ce valid count and clean label summary");

  auto bad_target = target.clone();
  bad_target[0][1][2] = N;
  auto out = step.call(maps.detach(), bad_target, 255, false, false);
  const auto summary = std::get<2>(out);
  check(summary[0].item<int64_t>() == 1 && summary[1].item<int64_t>() == N && !std::get<3>(out).numel(),
        "upsampled_ce reports a bad label (count, value) and skips it");
}

void test_ensemble_predict_steps() {
  std::vector<at::Tensor> logits = {torch::randn({2, 6, 8, 7}, torch::kDouble),
                                    torch::randn({2, 6, 4, 4}, torch::kDouble)};
  auto mean = (at::softmax(logits[0], 1) + at::softmax(resize(logits[1], 8, 7), 1)) / 2.0;
  auto merge = op("senformer::merge_scores").typed<at::Tensor(at::TensorList, c10::string_view, bool)>();
  const auto scores = merge.call(logits, "mean", false);
  check(rel(scores, mean.permute({0, 2, 3, 1})) < 1e-12, "merge_scores (mean), channels-last");
  auto argmax = op("senformer::upsampled_argmax").typed<at::Tensor(const at::Tensor&, int64_t, int64_t, bool)>();
  check(at::equal(argmax.call(scores.contiguous(), 17, 15, false), resize(mean, 17, 15).argmax(1)),
        "upsampled_argmax labels");
}

void test_mask_logits() {
  auto f = torch::randn({2, 35, 9}, torch::kDouble).requires_grad_(true);
  auto c = torch::randn({2, 5, 9}, torch::kDouble).requires_grad_(true);
  auto ml = op("senformer::mask_logits").typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  auto out = ml.call(f, c, 5, 7);
  const auto want = at::bmm(c, f.transpose(1, 2)).view({2, 5, 5, 7});
  check(out.sizes() == want.sizes() && rel(out, want) < 1e-12, "mask_logits forward");
  auto g = torch::randn_like(want);
  auto grads = torch::autograd::grad({out}, {f, c}, {g});
  auto grads_ref = torch::autograd::grad({want}, {f, c}, {g});
  check(rel(grads[0], grads_ref[0]) < 1e-12 && rel(grads[1], grads_ref[1]) < 1e-12, "mask_logits backward");
}

void test_class_attention() {
  auto q = torch::randn({2, 3, 11, 8}, torch::kDouble).requires_grad_(true);
  auto k = torch::randn({2, 3, 150, 8}, torch::kDouble).requires_grad_(true);
  auto v = torch::randn({2, 3, 150, 8}, torch::kDouble).requires_grad_(true);
  auto attn = op("senformer::class_cross_attention")
                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  auto out = attn.call(q, k, v, 0.35);
  const auto want = at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * 0.35, -1), v);
  check(rel(out, want) < 1e-11, "class_cross_attention forward");
  auto g = torch::randn_like(want);
  auto grads = torch::autograd::grad({out}, {q, k, v}, {g});
  auto grads_ref = torch::autograd::grad({want}, {q, k, v}, {g});
  bool ok = true;
  for (int i = 0; i < 3; ++i) ok = ok && rel(grads[i], grads_ref[i]) < 1e-10;
  check(ok, "class_cross_attention backward (dq, dk, dv)");
}

}  // namespace

int main() {
  torch::manual_seed(0);
  test_upsampled_ce();
  test_ensemble_predict_steps();
  test_mask_logits();
  test_class_attention();
  std::cout << (failures == 0 ? "all passed" : "FAILURES: " + std::to_string(failures)) << std::endl;
  return failures == 0 ? 0 : 1;
}
