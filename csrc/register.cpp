// Operator registry of senformer._C: schemas (TORCH_LIBRARY), autograd kernels and meta kernels.
// Device kernels register themselves in cpu/*.cpp and cuda/*.cu. The public schemas are fixed: the
// Python dispatcher (senformer/ops/*.py) calls exactly these. Ops starting with '_' are the
// forward-with-saved-state / backward halves used by the autograd kernels; the ensemble ops' steps
// have no autograd here (their one chain is in Python).
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

std::tuple<Tensor, Tensor, Tensor, Tensor> upsampled_ce_meta(const Tensor& maps, const Tensor& target, int64_t, bool,
                                                             bool need_grad) {
  check_upsampled_ce(maps, target);
  const auto opt = maps.options();
  return {at::empty({maps.size(0)}, opt.dtype(at::kDouble)), at::empty({}, opt.dtype(at::kLong)),
          at::empty({2}, opt.dtype(at::kLong)), need_grad ? at::empty(maps.sizes(), opt) : at::empty({0}, opt)};
}

Tensor upsampled_argmax_meta(const Tensor& scores, int64_t height, int64_t width, bool) {
  check_upsampled_argmax(scores, height, width);
  return at::empty({scores.size(0), height, width}, scores.options().dtype(at::kLong));
}

// The merged scores' (B, h1, w1, N) channels-last grid of the finest learner x (B, N, h1, w1).
Tensor merged_grid(const Tensor& x, at::ScalarType dtype) {
  return at::empty({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options().dtype(dtype));
}

Tensor merge_scores_meta(TensorList logits, c10::string_view merge, bool) {
  check_maps("ensemble_predict", logits);
  check_merge(std::string(merge));
  return merged_grid(logits[0], acc_type(logits[0].scalar_type()));
}

std::tuple<Tensor, Tensor> learner_map_meta(const Tensor& x, int64_t height, int64_t width, bool,
                                            const c10::optional<Tensor>& d_sum) {
  check_learner_map(x, height, width, d_sum);
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  return {at::empty({x.size(0), height, width, x.size(1)}, opts),
          learner_map_grad_buffer(x, height, width, d_sum.has_value() && d_sum->defined())};
}

std::tuple<Tensor, Tensor> log_sum_scores_meta(TensorList logits, bool, double) {
  check_maps("ensemble_cross_entropy", logits);
  return {merged_grid(logits[0], acc_type(logits[0].scalar_type())), merged_grid(logits[0], at::kBool)};
}

std::tuple<Tensor, Tensor> learner_grads_meta(const Tensor& x, const Tensor& d_sum, const Tensor& g, bool) {
  check_learner_grads(x, d_sum, g);
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  return {at::empty(x.sizes(), opts), at::empty(x.sizes(), opts)};
}

Tensor log_sum_grad_meta(const Tensor& d_e, const Tensor& e, const Tensor& active) {
  check_log_sum_grad(d_e, e, active);
  return at::empty(d_e.sizes(), d_e.options());
}

Tensor combine_grads_meta(const Tensor& d_ens, const Tensor& d_learn, const Tensor& scale_e, const Tensor& scale_l,
                          at::ScalarType dtype) {
  check_combine_grads(d_ens, d_learn, scale_e, scale_l);
  return at::empty(d_ens.sizes(), d_ens.options().dtype(dtype));
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
  // Kernel-level steps of ensemble_cross_entropy / ensemble_predict (contracts in ops.h).
  m.def("upsampled_ce(Tensor maps, Tensor target, int ignore_index, bool align_corners, bool need_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("upsampled_argmax(Tensor scores, int height, int width, bool align_corners) -> Tensor");
  m.def("merge_scores(Tensor[] logits, str merge, bool align_corners) -> Tensor");
  m.def("learner_map(Tensor x, int height, int width, bool align_corners, Tensor? d_sum) -> (Tensor, Tensor)");
  m.def("combine_grads(Tensor d_ens, Tensor d_learn, Tensor scale_e, Tensor scale_l, ScalarType dtype) -> Tensor");
  m.def("log_sum_scores(Tensor[] logits, bool align_corners, float eps) -> (Tensor, Tensor)");
  m.def("log_sum_grad(Tensor d_e, Tensor e, Tensor active) -> Tensor");
  m.def("learner_grads(Tensor x, Tensor d_sum, Tensor g, bool align_corners) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(senformer, Autograd, m) {
  m.impl("mask_logits", &mask_logits_autograd);
  m.impl("class_cross_attention", &class_attention_autograd);
}

TORCH_LIBRARY_IMPL(senformer, Meta, m) {
  m.impl("upsampled_ce", &upsampled_ce_meta);
  m.impl("upsampled_argmax", &upsampled_argmax_meta);
  m.impl("merge_scores", &merge_scores_meta);
  m.impl("learner_map", &learner_map_meta);
  m.impl("combine_grads", &combine_grads_meta);
  m.impl("log_sum_scores", &log_sum_scores_meta);
  m.impl("log_sum_grad", &log_sum_grad_meta);
  m.impl("learner_grads", &learner_grads_meta);
  m.impl("mask_logits", &mask_logits_meta);
  m.impl("_mask_logits_backward", &mask_logits_backward_meta);
  m.impl("class_cross_attention", &class_attention_meta);
  m.impl("_class_cross_attention_fwd", &class_attention_fwd_meta);
  m.impl("_class_cross_attention_bwd", &class_attention_bwd_meta);
}

}  // namespace senformer
