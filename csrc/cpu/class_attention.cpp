// class_cross_attention on CPU: keys are processed in blocks with an online softmax (running max m
// and normaliser l per query), so memory is O(BH x N x block), never the full N x L score matrix.
// Forward also returns the log-sum-exp per query; backward recomputes each block's probabilities
// from it (FlashAttention's scheme) and writes dK/dV block by block.
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "ops.h"

namespace senformer {
namespace {

// Keys per block: about 2M score elements across all (batch x head x query) rows.
// SENFORMER_CPU_ATTENTION_BLOCK fixes the block size (tests use it to force several blocks).
int64_t key_block(int64_t rows, int64_t L) {
  if (const char* env = std::getenv("SENFORMER_CPU_ATTENTION_BLOCK")) {
    const long long fixed = std::atoll(env);
    if (fixed > 0) return std::min<int64_t>(L, fixed);
  }
  const int64_t target = int64_t(1) << 21;
  return std::max<int64_t>(1, std::min<int64_t>(L, std::max<int64_t>(64, target / std::max<int64_t>(rows, 1))));
}

}  // namespace

std::tuple<Tensor, Tensor> class_attention_fwd_impl(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  check_attention(q, k, v);
  const auto acc = acc_type(q.scalar_type());
  const int64_t B = q.size(0), Hh = q.size(1), N = q.size(2), D = q.size(3), L = k.size(2);
  const Tensor qf = q.to(acc).reshape({B * Hh, N, D});
  const Tensor kf = k.to(acc).reshape({B * Hh, L, D});
  const Tensor vf = v.to(acc).reshape({B * Hh, L, D});
  Tensor m = at::full({B * Hh, N, 1}, -std::numeric_limits<double>::infinity(), qf.options());
  Tensor l = at::zeros({B * Hh, N, 1}, qf.options());
  Tensor o = at::zeros({B * Hh, N, D}, qf.options());
  const int64_t blk = key_block(B * Hh * N, L);
  for (int64_t s = 0; s < L; s += blk) {
    const int64_t len = std::min(blk, L - s);
    Tensor sc = at::bmm(qf, kf.narrow(1, s, len).transpose(1, 2)).mul_(scale);
    Tensor m_new = at::maximum(m, std::get<0>(sc.max(-1, /*keepdim=*/true)));
    Tensor alpha = (m - m_new).exp_();
    Tensor p = sc.sub_(m_new).exp_();
    l.mul_(alpha).add_(p.sum(-1, /*keepdim=*/true));
    o.mul_(alpha).baddbmm_(p, vf.narrow(1, s, len));
    m = m_new;
  }
  Tensor out = (o / l).view({B, Hh, N, D}).to(q.scalar_type());
  Tensor lse = (m + l.log()).view({B, Hh, N});
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> class_attention_bwd_impl(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                                            double scale) {
  const auto acc = acc_type(q.scalar_type());
  const int64_t B = q.size(0), Hh = q.size(1), N = q.size(2), D = q.size(3), L = k.size(2);
  const Tensor qf = q.to(acc).reshape({B * Hh, N, D});
  const Tensor kf = k.to(acc).reshape({B * Hh, L, D});
  const Tensor vf = v.to(acc).reshape({B * Hh, L, D});
  const Tensor go = grad.to(acc).reshape({B * Hh, N, D});
  const Tensor lse3 = lse.to(acc).reshape({B * Hh, N, 1});
  // D_i = sum_d dO_i,d O_i,d: the softmax-backward term, constant per query.
  const Tensor delta = (go * out.to(acc).reshape({B * Hh, N, D})).sum(-1, /*keepdim=*/true);
  Tensor dq = at::zeros({B * Hh, N, D}, qf.options());
  Tensor dk = at::empty({B * Hh, L, D}, qf.options());
  Tensor dv = at::empty({B * Hh, L, D}, qf.options());
  const int64_t blk = key_block(B * Hh * N, L);
  for (int64_t s = 0; s < L; s += blk) {
    const int64_t len = std::min(blk, L - s);
    const Tensor kb = kf.narrow(1, s, len), vb = vf.narrow(1, s, len);
    Tensor p = at::bmm(qf, kb.transpose(1, 2)).mul_(scale).sub_(lse3).exp_();
    dv.narrow(1, s, len).copy_(at::bmm(p.transpose(1, 2), go));
    Tensor ds = at::bmm(go, vb.transpose(1, 2)).sub_(delta).mul_(p);
    dq.baddbmm_(ds, kb, /*beta=*/1.0, /*alpha=*/scale);
    dk.narrow(1, s, len).copy_(at::bmm(ds.transpose(1, 2), qf).mul_(scale));
  }
  const auto dt = q.scalar_type();
  return {dq.view({B, Hh, N, D}).to(dt), dk.view({B, Hh, L, D}).to(dt), dv.view({B, Hh, L, D}).to(dt)};
}

namespace {

Tensor class_attention_impl(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  return std::get<0>(class_attention_fwd_impl(q, k, v, scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(senformer, CPU, m) {
  m.impl("class_cross_attention", &class_attention_impl);
  m.impl("_class_cross_attention_fwd", &class_attention_fwd_impl);
  m.impl("_class_cross_attention_bwd", &class_attention_bwd_impl);
}

// The blocked ATen code runs unchanged on CUDA tensors (the Triton kernel is the primary GPU path).
#ifdef SENFORMER_WITH_CUDA
TORCH_LIBRARY_IMPL(senformer, CUDA, m) {
  m.impl("class_cross_attention", &class_attention_impl);
  m.impl("_class_cross_attention_fwd", &class_attention_fwd_impl);
  m.impl("_class_cross_attention_bwd", &class_attention_bwd_impl);
}
#endif

}  // namespace senformer
