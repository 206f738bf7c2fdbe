// Torch custom ops of SpargeAttention2 (library "sparge", see sparge_ops.cc for the schemas):
// hybrid Top-k/Top-p block-mask prediction and block-sparse attention with autograd, on CUDA
// (kernels/) and CPU (ATen, same semantics). These helpers call through the dispatcher; like any
// ATen call they throw c10::Error on bad input, so callers catch it at their module edge.
// Thread-safe: stateless.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace sparge::ops {

// Values of the mode tensor (same numbers as sparge.v1.AttentionMode).
inline constexpr int32_t kModeDense = 1, kModeTopK = 2, kModeTopP = 3, kModeHybrid = 4;

// A predicted block mask. counts [B,H,Nq] int32; indices [B,H,Nq,Nk] int32 kept key blocks in
// ascending order, -1 past the count; t_counts [B,H,Nk], t_indices [B,H,Nk,Nq] the transpose
// (for the backward pass; empty [B,H,0] / [B,H,0,0] when predicted with transposed = false).
struct BlockMask {
  at::Tensor counts, indices, t_counts, t_indices;
  int64_t block_q = 128, block_k = 64;
};

// q, k: [B, L, H, D] (any strides with unit stride over D; head-major tensors via transpose(1, 2)).
// mode int32, topk and topp float32, each of shape [B] or [B, H], on any device.
// transposed = false skips the transposed mask (inference: only the backward pass reads it).
BlockMask PredictBlockMask(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mode,
                           const at::Tensor& topk, const at::Tensor& topp, int64_t block_q = 128,
                           int64_t block_k = 64, bool transposed = true);

// Masked attention over the kept blocks; differentiable in q, k, v (the mask is stop-gradient).
// Returns O [B, L, H, D] (dtype of q) and lse [B, H, L] float32 (not differentiable).
// scale <= 0 means 1/sqrt(D).
std::tuple<at::Tensor, at::Tensor> BlockSparseAttention(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const BlockMask& mask,
                                                        double scale = 0.0);

// 1 - (kept block pairs weighted by their token counts) / (L * L), averaged over (b, h).
double AchievedSparsity(const BlockMask& mask, int64_t seqlen);

}  // namespace sparge::ops
