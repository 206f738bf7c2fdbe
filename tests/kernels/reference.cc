// Implementation of the test references (see reference.h).
#include "tests/kernels/reference.h"

#include <cmath>

namespace sparge::testing {

using at::Tensor;

Tensor KeepFromLut(const Tensor& counts, const Tensor& indices) {
  const int64_t nk = indices.size(-1);
  Tensor idx = indices.to(at::kLong);
  idx = at::where(idx < 0, at::full({}, nk, idx.options()), idx);
  Tensor keep = at::zeros({indices.size(0), indices.size(1), indices.size(2), nk + 1},
                          indices.options().dtype(at::kBool));
  keep.scatter_(-1, idx, true);
  return keep.slice(-1, 0, nk);
}

DenseRef DenseMaskedReference(const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& grad_o, const Tensor& counts, const Tensor& indices,
                              int64_t block_q, int64_t block_k, double scale) {
  const int64_t L = q.size(1);
  Tensor keep = KeepFromLut(counts, indices).to(q.device());
  Tensor allowed = keep.repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)
                       .slice(2, 0, L).slice(3, 0, L);
  Tensor qd = q.to(at::kDouble).detach().set_requires_grad(true);
  Tensor kd = k.to(at::kDouble).detach().set_requires_grad(true);
  Tensor vd = v.to(at::kDouble).detach().set_requires_grad(true);
  Tensor qh = qd.permute({0, 2, 1, 3}), kh = kd.permute({0, 2, 1, 3}), vh = vd.permute({0, 2, 1, 3});
  Tensor s = at::matmul(qh, kh.transpose(-1, -2)) * scale;
  s = s.masked_fill(allowed.logical_not(), -INFINITY);
  // A row that keeps no key block attends to nothing: O = 0, LSE = -inf, and it adds nothing to
  // any gradient (the kernels' definition). Its scores are set to 0 before the softmax and its
  // probabilities to 0 after it, so no NaN enters the forward or the backward.
  Tensor empty = allowed.any(-1).logical_not();
  s = s.masked_fill(empty.unsqueeze(-1), 0.0);
  Tensor lse = at::logsumexp(s, -1);
  Tensor p = at::exp(s - lse.unsqueeze(-1)).masked_fill(empty.unsqueeze(-1), 0.0);
  Tensor o = at::matmul(p, vh).permute({0, 2, 1, 3});
  DenseRef r;
  r.o = o.detach();
  r.lse = lse.masked_fill(empty, -INFINITY).detach();
  if (grad_o.defined()) {
    o.backward(grad_o.to(at::kDouble));
    r.dq = qd.grad().detach();
    r.dk = kd.grad().detach();
    r.dv = vd.grad().detach();
  }
  return r;
}

BlockRef QueryBlockReference(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& grad_o,
                             const Tensor& counts_cpu, const Tensor& indices_cpu, int64_t b,
                             int64_t h, int64_t i, int64_t block_q, int64_t block_k, double scale) {
  const int64_t L = q.size(1), nq = indices_cpu.size(2), nk = indices_cpu.size(3), H = q.size(2);
  const int64_t bh = b * H + h;
  const int c = counts_cpu.data_ptr<int32_t>()[bh * nq + i];
  const int32_t* lut = indices_cpu.data_ptr<int32_t>() + (bh * nq + i) * nk;
  std::vector<int64_t> toks;
  for (int t = 0; t < c; ++t)
    for (int64_t x = int64_t(lut[t]) * block_k; x < std::min(L, (lut[t] + 1) * block_k); ++x)
      toks.push_back(x);
  BlockRef r;
  r.keys = at::tensor(toks, at::kLong).to(q.device());
  const int64_t r0 = i * block_q, r1 = std::min(L, r0 + block_q);
  Tensor qi = q[b].select(1, h).slice(0, r0, r1).to(at::kDouble);
  Tensor kk = k[b].select(1, h).index_select(0, r.keys).to(at::kDouble);
  Tensor vk = v[b].select(1, h).index_select(0, r.keys).to(at::kDouble);
  Tensor s = at::matmul(qi, kk.t()) * scale;
  r.lse = at::logsumexp(s, -1);
  Tensor p = at::exp(s - r.lse.unsqueeze(-1));
  r.o = at::matmul(p, vk);
  if (grad_o.defined()) {
    Tensor gi = grad_o[b].select(1, h).slice(0, r0, r1).to(at::kDouble);
    Tensor delta = (gi * r.o).sum(-1, true);
    Tensor ds = p * (at::matmul(gi, vk.t()) - delta);
    r.dq = at::matmul(ds, kk) * scale;
    r.dk = at::matmul(ds.t(), qi) * scale;
    r.dv = at::matmul(p.t(), gi);
  }
  return r;
}

std::pair<Tensor, Tensor> StructuredQK(int64_t B, int64_t L, int64_t H, int64_t D,
                                       at::ScalarType dtype, at::Device device, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto opt = at::TensorOptions().dtype(at::kFloat);
  const int64_t coarse = 192;
  const int64_t nc = (L + coarse - 1) / coarse;
  Tensor cq = at::randn({B, nc, H, D}, gen, opt).repeat_interleave(coarse, 1).slice(1, 0, L);
  Tensor ck = at::randn({B, nc, H, D}, gen, opt).repeat_interleave(coarse, 1).slice(1, 0, L);
  Tensor sink = at::randn({1, 1, H, D}, gen, opt);
  Tensor q = cq + 0.7 * ck + 0.6 * at::randn({B, L, H, D}, gen, opt) + 0.5 * sink;
  Tensor k = ck + 0.6 * at::randn({B, L, H, D}, gen, opt);
  // A few "sink" tokens that many queries attend to.
  k.slice(1, 0, std::min<int64_t>(L, 32)).add_(sink * 2.0);
  return {q.to(device, dtype).contiguous(), k.to(device, dtype).contiguous()};
}

double RelErr(const Tensor& a, const Tensor& b) {
  Tensor ad = a.to(at::kDouble).cpu(), bd = b.to(at::kDouble).cpu();
  const double den = bd.norm().item<double>();
  const double num = (ad - bd).norm().item<double>();
  return den > 0 ? num / den : num;
}

}  // namespace sparge::testing
