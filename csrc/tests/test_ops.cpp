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

void test_ensemble_ce() {
  const int64_t B = 2, N = 7, H = 19, W = 23;
  std::vector<at::Tensor> logits = {torch::randn({B, N, 9, 11}, torch::kDouble) * 3,
                                    torch::randn({B, N, 5, 6}, torch::kDouble) * 3,
                                    torch::randn({B, N, 3, 3}, torch::kDouble) * 3};
  auto target = torch::randint(0, N, {B, H, W}, torch::kLong);
  target.masked_fill_(torch::rand({B, H, W}) < 0.2, 255);

  std::vector<at::Tensor> xr, xe;
  for (const auto& x : logits) {
    xr.push_back(x.clone().requires_grad_(true));
    xe.push_back(x.clone().requires_grad_(true));
  }
  at::Tensor S;
  std::vector<at::Tensor> u;
  for (const auto& x : xr) {
    u.push_back(resize(x, 9, 11));
    S = S.defined() ? S + at::softmax(u.back(), 1) : at::softmax(u.back(), 1);
  }
  const auto E = at::log(at::clamp_min(S, 1e-15));
  const auto le_ref = masked_ce(resize(E, H, W), target, 255);
  at::Tensor ll_ref = at::zeros({}, torch::kDouble);
  for (const auto& x : u) ll_ref = ll_ref + masked_ce(resize(x, H, W), target, 255);
  ll_ref = ll_ref / 3.0;
  (le_ref * 0.7 + ll_ref * 1.3).backward();

  auto ce = op("senformer::ensemble_cross_entropy")
                .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&, int64_t, bool, double)>();
  auto [le, ll] = ce.call(xe, target, 255, false, 1e-15);
  (le * 0.7 + ll * 1.3).backward();
  check(rel(le, le_ref) < 1e-10 && rel(ll, ll_ref) < 1e-10, "ensemble_cross_entropy losses");
  bool grads_ok = true;
  for (size_t i = 0; i < xe.size(); ++i) grads_ok = grads_ok && rel(xe[i].grad(), xr[i].grad()) < 1e-9;
  check(grads_ok, "ensemble_cross_entropy gradients of every learner map");

  auto bad = target.clone();
  bad[0][1][2] = N;
  bool raised = false;
  try {
    ce.call(logits, bad, 255, false, 1e-15);
  } catch (const c10::ValueError& e) {
    raised = std::string(e.what()).find("label 7") != std::string::npos;
  }
  check(raised, "ensemble_cross_entropy raises ValueError naming a bad label");
}

void test_ensemble_predict() {
  std::vector<at::Tensor> logits = {torch::randn({2, 6, 8, 7}, torch::kDouble),
                                    torch::randn({2, 6, 4, 4}, torch::kDouble)};
  auto mean = (at::softmax(logits[0], 1) + at::softmax(resize(logits[1], 8, 7), 1)) / 2.0;
  const auto want = resize(mean, 17, 15).argmax(1);
  auto pred = op("senformer::ensemble_predict")
                  .typed<at::Tensor(at::TensorList, int64_t, int64_t, c10::string_view, bool)>();
  check(at::equal(pred.call(logits, 17, 15, "mean", false), want), "ensemble_predict (mean) labels");
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
  test_ensemble_ce();
  test_ensemble_predict();
  test_mask_logits();
  test_class_attention();
  std::cout << (failures == 0 ? "all passed" : "FAILURES: " + std::to_string(failures)) << std::endl;
  return failures == 0 ? 0 : 1;
}
