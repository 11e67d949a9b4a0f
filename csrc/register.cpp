// Operator registry of senformer._C: schemas (TORCH_LIBRARY), autograd kernels and meta kernels.
// Device kernels register themselves in cpu/*.cpp and cuda/*.cu. The public schemas are fixed: the
// Python dispatcher (senformer/ops/*.py) calls exactly these. Ops starting with '_' are the
// forward-with-saved-state / backward halves used by the autograd kernels.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
// `import senformer._C` only has to load the library (which runs the registrations above); no
// Python bindings are needed, so a bare module object is enough and pybind11 is not compiled in.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "senformer compiled ops (torch.ops.senformer.*)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
#endif

namespace senformer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// ---------------------------------------------------------------- ensemble_cross_entropy
using CeWithGradSig = std::tuple<Tensor, Tensor, std::vector<Tensor>>(TensorList, const Tensor&, int64_t, bool,
                                                                        double);
using CeSig = std::tuple<Tensor, Tensor>(TensorList, const Tensor&, int64_t, bool, double);

// The gradient is computed in the forward pass (it needs the same softmaxes) and stored scaled for
// d(loss)=1; backward only mixes the two losses' gradients with the incoming scalars.
struct EnsembleCeFunction : public torch::autograd::Function<EnsembleCeFunction> {
  static variable_list forward(AutogradContext* ctx, TensorList logits, const Tensor& target, int64_t ignore_index,
                               bool align_corners, double eps) {
    bool need = false;
    for (const auto& x : logits) need = need || x.requires_grad();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["M"] = static_cast<int64_t>(logits.size());
    if (!need) {
      static auto op = find_op("senformer::ensemble_cross_entropy").typed<CeSig>();
      auto out = op.call(logits, target, ignore_index, align_corners, eps);
      return {std::get<0>(out), std::get<1>(out)};
    }
    static auto op = find_op("senformer::_ensemble_cross_entropy_with_grad").typed<CeWithGradSig>();
    auto out = op.call(logits, target, ignore_index, align_corners, eps);
    ctx->save_for_backward(std::get<2>(out));
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const int64_t M = ctx->saved_data["M"].toInt();
    const auto saved = ctx->get_saved_variables();
    variable_list grads(M + 4);  // one per logits tensor, then target, ignore_index, align_corners, eps
    for (int64_t i = 0; i < M; ++i) {
      Tensor g;
      if (grad_out[0].defined()) g = saved[i] * grad_out[0].to(saved[i].scalar_type());
      if (grad_out[1].defined()) {
        Tensor gl = saved[M + i] * grad_out[1].to(saved[i].scalar_type());
        g = g.defined() ? g.add_(gl) : gl;
      }
      grads[i] = g;
    }
    return grads;
  }
};

std::tuple<Tensor, Tensor> ensemble_ce_autograd(TensorList logits, const Tensor& target, int64_t ignore_index,
                                                bool align_corners, double eps) {
  auto out = EnsembleCeFunction::apply(logits, target, ignore_index, align_corners, eps);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------- mask_logits
struct MaskLogitsFunction : public torch::autograd::Function<MaskLogitsFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& features, const Tensor& cls, int64_t h, int64_t w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({features, cls});
    static auto op = find_op("senformer::mask_logits").typed<Tensor(const Tensor&, const Tensor&, int64_t, int64_t)>();
    return op.call(features, cls, h, w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    static auto op = find_op("senformer::_mask_logits_backward")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>();
    auto g = op.call(grad_out[0], saved[0], saved[1]);
    return {std::get<0>(g), std::get<1>(g), Tensor(), Tensor()};
  }
};

Tensor mask_logits_autograd(const Tensor& features, const Tensor& cls, int64_t h, int64_t w) {
  return MaskLogitsFunction::apply(features, cls, h, w);
}

// ---------------------------------------------------------------- class_cross_attention
struct ClassAttentionFunction : public torch::autograd::Function<ClassAttentionFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = find_op("senformer::_class_cross_attention_fwd")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>();
    auto out = op.call(q, k, v, scale);
    ctx->save_for_backward({q, k, v, std::get<0>(out), std::get<1>(out)});
    ctx->saved_data["scale"] = scale;
    return std::get<0>(out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto s = ctx->get_saved_variables();
    static auto op = find_op("senformer::_class_cross_attention_bwd")
                         .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, const Tensor&, const Tensor&, double)>();
    auto g = op.call(grad_out[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["scale"].toDouble());
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), Tensor()};
  }
};

Tensor class_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  return ClassAttentionFunction::apply(q, k, v, scale);
}

// ---------------------------------------------------------------- meta kernels (shapes only)
at::TensorOptions acc_options(const Tensor& x) { return x.options().dtype(acc_type(x.scalar_type())); }

std::tuple<Tensor, Tensor> ensemble_ce_meta(TensorList logits, const Tensor& target, int64_t, bool, double) {
  check_maps("ensemble_cross_entropy", logits);
  check_target("ensemble_cross_entropy", logits, target);
  return {at::empty({}, acc_options(logits[0])), at::empty({}, acc_options(logits[0]))};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> ensemble_ce_with_grad_meta(TensorList logits, const Tensor& target,
                                                                           int64_t ignore_index, bool align_corners,
                                                                           double eps) {
  auto losses = ensemble_ce_meta(logits, target, ignore_index, align_corners, eps);
  std::vector<Tensor> grads;
  for (int which = 0; which < 2; ++which)
    for (const auto& x : logits) grads.push_back(at::empty(x.sizes(), x.options()));
  return {std::get<0>(losses), std::get<1>(losses), grads};
}

Tensor ensemble_predict_meta(TensorList logits, int64_t height, int64_t width, c10::string_view merge, bool) {
  check_maps("ensemble_predict", logits);
  check_merge(std::string(merge));
  return at::empty({logits[0].size(0), height, width}, logits[0].options().dtype(at::kLong));
}

Tensor mask_logits_meta(const Tensor& features, const Tensor& cls, int64_t h, int64_t w) {
  check_mask_logits(features, cls, h, w);
  return at::empty({cls.size(0), cls.size(1), h, w}, features.options());
}

std::tuple<Tensor, Tensor> mask_logits_backward_meta(const Tensor&, const Tensor& features, const Tensor& cls) {
  return {at::empty(features.sizes(), features.options()), at::empty(cls.sizes(), cls.options())};
}

Tensor class_attention_meta(const Tensor& q, const Tensor& k, const Tensor& v, double) {
  check_attention(q, k, v);
  return at::empty(q.sizes(), q.options());
}

std::tuple<Tensor, Tensor> class_attention_fwd_meta(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  return {class_attention_meta(q, k, v, scale), at::empty({q.size(0), q.size(1), q.size(2)}, acc_options(q))};
}

std::tuple<Tensor, Tensor, Tensor> class_attention_bwd_meta(const Tensor&, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor&, const Tensor&, double) {
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options())};
}

}  // namespace

TORCH_LIBRARY(senformer, m) {
  m.def("class_cross_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("_class_cross_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("_class_cross_attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("mask_logits(Tensor features, Tensor cls, int h, int w) -> Tensor");
  m.def("_mask_logits_backward(Tensor grad, Tensor features, Tensor cls) -> (Tensor, Tensor)");
  m.def("ensemble_cross_entropy(Tensor[] logits, Tensor target, int ignore_index, bool align_corners, float eps) "
        "-> (Tensor, Tensor)");
  m.def("_ensemble_cross_entropy_with_grad(Tensor[] logits, Tensor target, int ignore_index, bool align_corners, "
        "float eps) -> (Tensor, Tensor, Tensor[])");
  m.def("ensemble_predict(Tensor[] logits, int height, int width, str merge, bool align_corners) -> Tensor");
}

TORCH_LIBRARY_IMPL(senformer, Autograd, m) {
  m.impl("ensemble_cross_entropy", &ensemble_ce_autograd);
  m.impl("mask_logits", &mask_logits_autograd);
  m.impl("class_cross_attention", &class_attention_autograd);
}

TORCH_LIBRARY_IMPL(senformer, Meta, m) {
  m.impl("ensemble_cross_entropy", &ensemble_ce_meta);
  m.impl("_ensemble_cross_entropy_with_grad", &ensemble_ce_with_grad_meta);
  m.impl("ensemble_predict", &ensemble_predict_meta);
  m.impl("mask_logits", &mask_logits_meta);
  m.impl("_mask_logits_backward", &mask_logits_backward_meta);
  m.impl("class_cross_attention", &class_attention_meta);
  m.impl("_class_cross_attention_fwd", &class_attention_fwd_meta);
  m.impl("_class_cross_attention_bwd", &class_attention_bwd_meta);
}

}  // namespace senformer
