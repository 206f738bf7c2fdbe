// Registration of the "sparge" Torch library (schemas, autograd composite), the CPU
// implementations (ATen, fp32 compute, same selection rules as the CUDA kernels) and the C++
// helpers of sparge_ops.h.
#include "engine/ops/sparge_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "engine/ops/sparge_ops_internal.h"

namespace sparge::ops {

using at::Tensor;

namespace internal {

void CheckQkv(const Tensor& q, const char* name) {
  TORCH_CHECK(q.dim() == 4, name, " must be [B, L, H, D], got ", q.sizes());
  TORCH_CHECK(q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0 && q.size(3) > 0, name,
              " must be non-empty, got ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), name, " must be floating point");
}

Tensor ExpandKnob(const Tensor& t, int64_t B, int64_t H, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  Tensor x = t.to(dtype);
  if (x.dim() == 0) x = x.view({1});
  if (x.dim() == 1) {
    TORCH_CHECK(x.size(0) == B || x.size(0) == 1, name, " must have B=", B, " entries, got ",
                x.size(0));
    x = x.view({-1, 1}).expand({B, H});
  } else {
    TORCH_CHECK(x.dim() == 2 && (x.size(0) == B || x.size(0) == 1) && (x.size(1) == H || x.size(1) == 1),
                name, " must be [B] or [B, H], got ", x.sizes());
    x = x.expand({B, H});
  }
  return x.contiguous();
}

void CheckKnobs(const Tensor& mode, const Tensor& topk, const Tensor& topp) {
  Tensor m = mode.cpu(), k = topk.cpu(), p = topp.cpu();
  TORCH_CHECK(((m >= kModeDense) & (m <= kModeHybrid)).all().item<bool>(),
              "mode must be 1 (DENSE), 2 (TOPK), 3 (TOPP) or 4 (HYBRID)");
  TORCH_CHECK(((k >= 0) & (k <= 1)).all().item<bool>(), "topk must be in [0, 1]");
  TORCH_CHECK(((p >= 0) & (p <= 1)).all().item<bool>(), "topp must be in [0, 1]");
}

std::pair<Tensor, Tensor> NoTransposedMask(int64_t B, int64_t H, const at::TensorOptions& like) {
  auto iopt = like.dtype(at::kInt);
  return {at::empty({B, H, 0}, iopt), at::empty({B, H, 0, 0}, iopt)};
}

void CheckTransposedMask(const Tensor& t_counts) {
  TORCH_CHECK(!(t_counts.dim() == 3 && t_counts.size(2) == 0),
              "the mask was predicted with transposed=False (inference only); the backward pass "
              "needs predict_block_mask(..., transposed=True)");
}

void CheckMask(const Tensor& counts, const Tensor& indices, int64_t B, int64_t H, int64_t nq,
               int64_t nk) {
  TORCH_CHECK(counts.scalar_type() == at::kInt && indices.scalar_type() == at::kInt,
              "mask tensors must be int32");
  TORCH_CHECK(counts.sizes() == at::IntArrayRef({B, H, nq}), "counts must be [B, H, Nq]=[", B, ", ",
              H, ", ", nq, "], got ", counts.sizes());
  TORCH_CHECK(indices.sizes() == at::IntArrayRef({B, H, nq, nk}), "indices must be [B, H, Nq, Nk]=[",
              B, ", ", H, ", ", nq, ", ", nk, "], got ", indices.sizes());
}

}  // namespace internal

namespace {

using internal::CheckMask;
using internal::CheckQkv;
using internal::ExpandKnob;

double ResolveScale(double scale, int64_t d) { return scale > 0 ? scale : 1.0 / std::sqrt(double(d)); }

// [B, H, L, D] float -> per-block means [B, H, n, D] (partial last block: mean of its real rows).
Tensor BlockMean(const Tensor& x, int64_t bs) {
  const int64_t L = x.size(2), n = (L + bs - 1) / bs;
  Tensor padded = at::constant_pad_nd(x, {0, 0, 0, n * bs - L});
  Tensor sums = padded.view({x.size(0), x.size(1), n, bs, x.size(3)}).sum(3);
  Tensor cnt = at::clamp_max(L - at::arange(n, x.options()) * bs, double(bs));
  return sums / cnt.view({n, 1});
}

// Ascending list of the true positions along the last dim, -1 past the count.
Tensor CompactAscending(const Tensor& keep) {
  const int64_t n = keep.size(-1);
  Tensor ar = at::arange(n, keep.options().dtype(at::kLong));
  Tensor key = at::where(keep, ar, at::full({}, n, ar.options()));
  Tensor sorted = std::get<0>(key.sort(-1));
  return at::where(sorted == n, at::full({}, -1, sorted.options()), sorted).to(at::kInt).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> PredictBlockMaskCpu(const Tensor& q, const Tensor& k,
                                                               const Tensor& mode, const Tensor& topk,
                                                               const Tensor& topp, int64_t block_q,
                                                               int64_t block_k, bool transposed) {
  CheckQkv(q, "q");
  CheckQkv(k, "k");
  TORCH_CHECK(q.sizes() == k.sizes(), "q and k must have the same shape");
  TORCH_CHECK(block_q > 0 && block_k > 0, "block sizes must be positive");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t nk = (L + block_k - 1) / block_k;
  Tensor m = ExpandKnob(mode, B, H, at::kInt, "mode");
  Tensor tk = ExpandKnob(topk, B, H, at::kFloat, "topk");
  Tensor tp = ExpandKnob(topp, B, H, at::kFloat, "topp");
  internal::CheckKnobs(m, tk, tp);

  Tensor qf = q.to(at::kFloat).permute({0, 2, 1, 3});
  Tensor kf = k.to(at::kFloat).permute({0, 2, 1, 3});
  Tensor qpool = BlockMean(qf, block_q);
  Tensor kpool = BlockMean(kf, block_k) - kf.mean(2, /*keepdim=*/true);
  Tensor s = at::matmul(qpool, kpool.transpose(-1, -2)) / std::sqrt(float(D));
  Tensor p = at::softmax(s, -1);
  auto [sorted, order] = p.sort(/*stable=*/true, -1, /*descending=*/true);
  Tensor cum = sorted.to(at::kDouble).cumsum(-1);
  Tensor n_p = (cum < tp.to(at::kDouble).view({B, H, 1, 1})).sum(-1) + 1;  // [B,H,Nq] int64
  Tensor n_k = at::ceil(tk.to(at::kDouble) * double(nk) - 1e-6).to(at::kLong).view({B, H, 1});
  Tensor mv = m.to(at::kLong).view({B, H, 1});
  Tensor n = at::where(mv == kModeTopK, n_k.expand_as(n_p),
                       at::where(mv == kModeTopP, n_p,
                                 at::where(mv == kModeHybrid, at::maximum(n_k, n_p),
                                           at::full_like(n_p, nk))));
  n = at::clamp(n, 1, nk);
  Tensor rank_keep = at::arange(nk, n.options()).view({1, 1, 1, nk}) < n.unsqueeze(-1);
  Tensor keep = at::zeros_like(rank_keep).scatter(-1, order, rank_keep);
  if (!transposed) {
    auto [tc, ti] = internal::NoTransposedMask(B, H, q.options());
    return {n.to(at::kInt).contiguous(), CompactAscending(keep), tc, ti};
  }
  Tensor keep_t = keep.transpose(-1, -2);
  return {n.to(at::kInt).contiguous(), CompactAscending(keep), keep_t.sum(-1).to(at::kInt).contiguous(),
          CompactAscending(keep_t)};
}

// Token indices of the kept key blocks of one (b, h, query block).
Tensor KeptTokens(const int32_t* lut, int count, int64_t block_k, int64_t L) {
  std::vector<int64_t> idx;
  for (int t = 0; t < count; ++t) {
    const int64_t j = lut[t];
    TORCH_CHECK(j >= 0 && j * block_k < L, "mask index out of range: ", j);
    for (int64_t x = j * block_k; x < std::min(L, (j + 1) * block_k); ++x) idx.push_back(x);
  }
  return at::tensor(idx, at::kLong);
}

std::tuple<Tensor, Tensor> AttentionFwdCpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& counts, const Tensor& indices,
                                           int64_t block_q, int64_t block_k, double scale) {
  CheckQkv(q, "q");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must have the same shape");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t nq = (L + block_q - 1) / block_q, nk = (L + block_k - 1) / block_k;
  CheckMask(counts, indices, B, H, nq, nk);
  scale = ResolveScale(scale, D);
  Tensor cnt = counts.cpu().contiguous(), idx = indices.cpu().contiguous();
  Tensor o = at::empty({B, L, H, D}, q.options());
  Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  at::parallel_for(0, B * H, 1, [&](int64_t beg, int64_t end) {
    for (int64_t bh = beg; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Tensor qb = q[b].select(1, h).to(at::kFloat), kb = k[b].select(1, h).to(at::kFloat),
             vb = v[b].select(1, h).to(at::kFloat);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t r0 = i * block_q, r1 = std::min(L, r0 + block_q);
        const int c = cnt.data_ptr<int32_t>()[bh * nq + i];
        Tensor toks = KeptTokens(idx.data_ptr<int32_t>() + (bh * nq + i) * nk, c, block_k, L);
        Tensor s = at::matmul(qb.slice(0, r0, r1), kb.index_select(0, toks).t()) * scale;
        Tensor l = at::logsumexp(s, -1);
        Tensor oi = at::matmul(at::exp(s - l.unsqueeze(-1)), vb.index_select(0, toks));
        o[b].select(1, h).slice(0, r0, r1).copy_(oi);
        lse[b][h].slice(0, r0, r1).copy_(l);
      }
    }
  });
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> AttentionBwdCpu(
    const Tensor& grad_o, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
    const Tensor& lse, const Tensor& counts, const Tensor& indices, const Tensor& t_counts,
    const Tensor& t_indices, int64_t block_q, int64_t block_k, double scale) {
  CheckQkv(q, "q");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t nq = (L + block_q - 1) / block_q, nk = (L + block_k - 1) / block_k;
  CheckMask(counts, indices, B, H, nq, nk);
  scale = ResolveScale(scale, D);
  Tensor cnt = counts.cpu().contiguous(), idx = indices.cpu().contiguous();
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::parallel_for(0, B * H, 1, [&](int64_t beg, int64_t end) {
    for (int64_t bh = beg; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Tensor qb = q[b].select(1, h).to(at::kFloat), kb = k[b].select(1, h).to(at::kFloat),
             vb = v[b].select(1, h).to(at::kFloat), ob = o[b].select(1, h).to(at::kFloat),
             gb = grad_o[b].select(1, h).to(at::kFloat), lb = lse[b][h].to(at::kFloat);
      Tensor dkb = at::zeros({L, D}, qb.options()), dvb = at::zeros({L, D}, qb.options());
      Tensor dqb = at::zeros({L, D}, qb.options());
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t r0 = i * block_q, r1 = std::min(L, r0 + block_q);
        const int c = cnt.data_ptr<int32_t>()[bh * nq + i];
        Tensor toks = KeptTokens(idx.data_ptr<int32_t>() + (bh * nq + i) * nk, c, block_k, L);
        Tensor qi = qb.slice(0, r0, r1), gi = gb.slice(0, r0, r1);
        Tensor kk = kb.index_select(0, toks), vk = vb.index_select(0, toks);
        Tensor p = at::exp(at::matmul(qi, kk.t()) * scale - lb.slice(0, r0, r1).unsqueeze(-1));
        Tensor delta = (gi * ob.slice(0, r0, r1)).sum(-1, /*keepdim=*/true);
        Tensor ds = p * (at::matmul(gi, vk.t()) - delta);
        dqb.slice(0, r0, r1).copy_(at::matmul(ds, kk) * scale);
        dkb.index_add_(0, toks, at::matmul(ds.t(), qi) * scale);
        dvb.index_add_(0, toks, at::matmul(p.t(), gi));
      }
      dq[b].select(1, h).copy_(dqb);
      dk[b].select(1, h).copy_(dkb);
      dv[b].select(1, h).copy_(dvb);
    }
  });
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> CallFwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& counts, const Tensor& indices, int64_t block_q,
                                   int64_t block_k, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparge::block_sparse_attention_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, int64_t,
                                                         int64_t, double)>();
  return op.call(q, k, v, counts, indices, block_q, block_k, scale);
}

std::tuple<Tensor, Tensor, Tensor> CallBwd(const Tensor& grad_o, const Tensor& q, const Tensor& k,
                                           const Tensor& v, const Tensor& o, const Tensor& lse,
                                           const Tensor& counts, const Tensor& indices,
                                           const Tensor& t_counts, const Tensor& t_indices,
                                           int64_t block_q, int64_t block_k, double scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparge::block_sparse_attention_bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
              int64_t, double)>();
  return op.call(grad_o, q, k, v, o, lse, counts, indices, t_counts, t_indices, block_q, block_k,
                 scale);
}

class BlockSparseAttentionFn : public torch::autograd::Function<BlockSparseAttentionFn> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& counts, const Tensor& indices,
                                                const Tensor& t_counts, const Tensor& t_indices,
                                                int64_t block_q, int64_t block_k, double scale) {
    auto [o, lse] = CallFwd(q, k, v, counts, indices, block_q, block_k, scale);
    ctx->save_for_backward({q, k, v, o, lse, counts, indices, t_counts, t_indices});
    ctx->saved_data["block_q"] = block_q;
    ctx->saved_data["block_k"] = block_k;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {o, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    Tensor g = grads[0];
    if (!g.defined()) g = at::zeros_like(s[3]);
    auto [dq, dk, dv] = CallBwd(g, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                                ctx->saved_data["block_q"].toInt(),
                                ctx->saved_data["block_k"].toInt(),
                                ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> BlockSparseAttentionComposite(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& counts, const Tensor& indices,
    const Tensor& t_counts, const Tensor& t_indices, int64_t block_q, int64_t block_k,
    double scale) {
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    internal::CheckTransposedMask(t_counts);  // fail at the forward, not in the backward pass
  }
  auto out = BlockSparseAttentionFn::apply(q, k, v, counts, indices, t_counts, t_indices, block_q,
                                           block_k, scale);
  return {out[0], out[1]};
}

}  // namespace

BlockMask PredictBlockMask(const Tensor& q, const Tensor& k, const Tensor& mode, const Tensor& topk,
                           const Tensor& topp, int64_t block_q, int64_t block_k, bool transposed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparge::predict_block_mask", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, int64_t, int64_t, bool)>();
  auto [c, i, tc, ti] = op.call(q, k, mode, topk, topp, block_q, block_k, transposed);
  return BlockMask{c, i, tc, ti, block_q, block_k};
}

std::tuple<Tensor, Tensor> BlockSparseAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const BlockMask& mask, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparge::block_sparse_attention", "")
                       .typed<std::tuple<Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double)>();
  return op.call(q, k, v, mask.counts, mask.indices, mask.t_counts, mask.t_indices, mask.block_q,
                 mask.block_k, scale);
}

double AchievedSparsity(const BlockMask& mask, int64_t seqlen) {
  const int64_t L = seqlen, nq = mask.indices.size(2), nk = mask.indices.size(3);
  auto opts = at::TensorOptions().dtype(at::kDouble).device(mask.indices.device());
  Tensor kcols = at::clamp_max(L - at::arange(nk, opts) * mask.block_k, double(mask.block_k));
  Tensor qrows = at::clamp_max(L - at::arange(nq, opts) * mask.block_q, double(mask.block_q));
  Tensor idx = mask.indices.to(at::kLong);
  Tensor cols = at::where(idx >= 0, kcols.index({idx.clamp_min(0)}), at::zeros({}, opts)).sum(-1);
  Tensor kept = (cols * qrows).sum({-1});  // [B, H]
  return 1.0 - (kept / double(L * L)).mean().item<double>();
}

}  // namespace sparge::ops

TORCH_LIBRARY(sparge, m) {
  // transposed=False skips t_counts / t_indices (returned empty: [B, H, 0], [B, H, 0, 0]), which
  // only the backward pass reads: the inference path's mask.
  m.def("predict_block_mask(Tensor q, Tensor k, Tensor mode, Tensor topk, Tensor topp, "
        "int block_q=128, int block_k=64, bool transposed=True) -> (Tensor counts, Tensor indices, "
        "Tensor t_counts, Tensor t_indices)");
  m.def("block_sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor counts, Tensor indices, "
        "int block_q=128, int block_k=64, float scale=0.0) -> (Tensor o, Tensor lse)");
  m.def("block_sparse_attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, "
        "Tensor lse, Tensor counts, Tensor indices, Tensor t_counts, Tensor t_indices, "
        "int block_q=128, int block_k=64, float scale=0.0) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor counts, Tensor indices, "
        "Tensor t_counts, Tensor t_indices, int block_q=128, int block_k=64, float scale=0.0) -> "
        "(Tensor o, Tensor lse)");
}

TORCH_LIBRARY_IMPL(sparge, CPU, m) {
  m.impl("predict_block_mask", &sparge::ops::PredictBlockMaskCpu);
  m.impl("block_sparse_attention_fwd", &sparge::ops::AttentionFwdCpu);
  m.impl("block_sparse_attention_bwd", &sparge::ops::AttentionBwdCpu);
}

TORCH_LIBRARY_IMPL(sparge, CompositeImplicitAutograd, m) {
  m.impl("block_sparse_attention", &sparge::ops::BlockSparseAttentionComposite);
}
