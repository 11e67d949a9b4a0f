// mask_logits on CPU: one batched GEMM cls (B,N,C) x features^T (B,C,L) writes (B,N,L), which is
// already the channels-first (B,N,h,w) layout, so there is no transpose copy. The backward is two
// more GEMMs. The same ATen code serves CUDA tensors when the extension is built with CUDA.
#include <torch/library.h>

#include "ops.h"

namespace senformer {

Tensor mask_logits_impl(const Tensor& features, const Tensor& cls, int64_t h, int64_t w) {
  check_mask_logits(features, cls, h, w);
  const auto acc = acc_type(features.scalar_type());
  Tensor out = at::bmm(cls.to(acc), features.to(acc).transpose(1, 2));
  return out.view({cls.size(0), cls.size(1), h, w}).to(features.scalar_type());
}

std::tuple<Tensor, Tensor> mask_logits_backward_impl(const Tensor& grad, const Tensor& features, const Tensor& cls) {
  const auto acc = acc_type(features.scalar_type());
  const Tensor g = grad.to(acc).reshape({cls.size(0), cls.size(1), features.size(1)});
  Tensor d_features = at::bmm(g.transpose(1, 2), cls.to(acc)).to(features.scalar_type());
  Tensor d_cls = at::bmm(g, features.to(acc)).to(cls.scalar_type());
  return {d_features, d_cls};
}

TORCH_LIBRARY_IMPL(senformer, CPU, m) {
  m.impl("mask_logits", &mask_logits_impl);
  m.impl("_mask_logits_backward", &mask_logits_backward_impl);
}

#ifdef SENFORMER_WITH_CUDA
TORCH_LIBRARY_IMPL(senformer, CUDA, m) {
  m.impl("mask_logits", &mask_logits_impl);
  m.impl("_mask_logits_backward", &mask_logits_backward_impl);
}
#endif

}  // namespace senformer
