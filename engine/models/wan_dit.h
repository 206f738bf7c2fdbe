// The Wan2.1 text-to-video diffusion transformer (shared/design/WAN21.md
// sections 1-2), with parameters named exactly as diffusers'
// WanTransformer3DModel so that a safetensors loader maps 1:1, and
// self-attention routed through SelfAttention() (dense or SpargeAttention2 per
// element). Usage: WanDiT dit(config, 64, 64); dit->InitializeWeights(seed);
// dit->ToInference(dev, dtype); then dit->Forward(latents, timesteps, context,
// knobs). Not thread-safe (one owner thread).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "engine/attention/sparse_attention.h"
#include "engine/models/model_config.h"

namespace sparge::engine {

// Sizes of the three RoPE sub-spaces (frames, height, width) of one head, in
// real dimensions: h = w = 2 * floor(head_dim / 6), t = head_dim - h - w
// (head_dim 128 -> 44, 42, 42).
std::array<int64_t, 3> RopeAxisDims(int64_t head_dim);

// cos and sin of the per-pair rotation angles for a (frames, height, width)
// token grid: [L, head_dim / 2] fp32 each, token n = (fi * height + hi) * width
// + wi.
std::pair<at::Tensor, at::Tensor> RopeTables(int64_t head_dim, int64_t frames, int64_t height,
                                             int64_t width, int64_t max_positions);

// Rotates interleaved pairs (x[2k], x[2k+1]) of x [B, L, H, D] by the angles of
// (cos, sin) [L, D/2]; computed in fp32, returned in x's dtype.
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// Sinusoidal timestep embedding [B, dim] fp32, cos half first (diffusers
// flip_sin_to_cos).
at::Tensor TimestepSinusoid(const at::Tensor& timesteps, int64_t dim);

// RMS norm over the last dimension with a learned weight (q/k norm across all
// heads).
class RmsNormImpl : public torch::nn::Module {
 public:
  RmsNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  double eps() const { return eps_; }
  at::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RmsNorm);

// Attention with q/k RMS norm; attn1 (self, RoPE, sparse-capable) or attn2
// (cross, dense).
class WanAttentionImpl : public torch::nn::Module {
 public:
  WanAttentionImpl(int64_t dim, int64_t num_heads, double eps);
  // Self-attention over x [B, L, D]; *sparsity gets a float32 [B] tensor on x's device.
  at::Tensor SelfAttend(const at::Tensor& x, const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                        absl::Span<const AttentionKnobs> knobs, int64_t block_q, int64_t block_k,
                        at::Tensor* sparsity);
  // Cross-attention of x [B, L, D] over context [B, Lc, D].
  at::Tensor CrossAttend(const at::Tensor& x, const at::Tensor& context);

  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out;
  RmsNorm norm_q{nullptr}, norm_k{nullptr};

 private:
  int64_t num_heads_;
};
TORCH_MODULE(WanAttention);

// Linear -> tanh-GELU -> Linear, named like diffusers FeedForward (net.0.proj,
// net.2).
class WanFeedForwardImpl : public torch::nn::Module {
 public:
  WanFeedForwardImpl(int64_t dim, int64_t ffn_dim);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::ModuleList net;

 private:
  torch::nn::Linear proj_{nullptr}, out_{nullptr};
};
TORCH_MODULE(WanFeedForward);

class WanBlockImpl : public torch::nn::Module {
 public:
  WanBlockImpl(const WanDiTConfig& config);
  // x [B, L, D]; temb6 [B, 6, D] (time_proj output); context [B, Lc, D]
  // (already projected).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const at::Tensor& temb6,
                     const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                     absl::Span<const AttentionKnobs> knobs, int64_t block_q, int64_t block_k,
                     at::Tensor* sparsity);

  WanAttention attn1{nullptr}, attn2{nullptr};
  torch::nn::LayerNorm norm2{nullptr};  // the affine LN before cross-attention
  WanFeedForward ffn{nullptr};
  at::Tensor scale_shift_table;  // [1, 6, D], kept fp32

 private:
  // The same computation through the fused CUDA ops (engine/models/dit_fused.h).
  at::Tensor ForwardFused(const at::Tensor& x, const at::Tensor& context, const at::Tensor& temb6,
                          const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                          absl::Span<const AttentionKnobs> knobs, int64_t block_q, int64_t block_k,
                          at::Tensor* sparsity);

  double eps_;
};
TORCH_MODULE(WanBlock);

struct DiTOutput {
  at::Tensor velocity;          // [B, out_channels, T', H', W'], fp32
  std::vector<float> sparsity;  // per element: mean achieved self-attention
                                // sparsity over layers
};

class WanDiTImpl : public torch::nn::Module {
 public:
  // block_q / block_k: sparse-attention block sizes in tokens.
  WanDiTImpl(const WanDiTConfig& config, int64_t block_q, int64_t block_k);

  // Deterministic random weights from seed (linear/conv weights N(0, 1/fan_in),
  // biases N(0, 0.02), modulation tables N(0, 1/D), norm weights 1);
  // independent of device and dtype.
  void InitializeWeights(uint64_t seed);
  // Moves to device and dtype, keeping the modules diffusers keeps in fp32
  // (time embedder, modulation tables, norms) in fp32.
  void ToInference(const torch::Device& device, torch::ScalarType dtype);
  // Whether ToInference keeps the parameter named `param_name` in fp32 (time embedder,
  // modulation tables, norms), for loaders that place each tensor themselves.
  static bool KeepsFloat32(const std::string& param_name);
  // For a loader that has placed every parameter as ToInference would (per KeepsFloat32): the
  // compute dtype Forward casts activations to.
  void SetInferenceDtype(torch::ScalarType dtype) { dtype_ = dtype; }

  // latents [B, in_channels, T', H', W'] (H', W' multiples of the patch),
  // timesteps [B] (float, 0..1000), context [B, Lc, text_dim], knobs: one per
  // element. Throws c10::Error on bad shapes.
  DiTOutput Forward(const at::Tensor& latents, const at::Tensor& timesteps,
                    const at::Tensor& context, absl::Span<const AttentionKnobs> knobs);

  // Training: recompute each block in the backward pass instead of keeping its activations
  // (engine/models/activation_checkpoint.h). Only matters with grad mode on. Default off.
  void SetActivationCheckpointing(bool enabled) { activation_checkpointing_ = enabled; }
  bool activation_checkpointing() const { return activation_checkpointing_; }
  // For a trainer that moved the parameters itself (e.g. every parameter fp32 or bf16).
  int64_t block_q() const { return block_q_; }
  int64_t block_k() const { return block_k_; }

  const WanDiTConfig& config() const { return config_; }
  int64_t num_parameters() const;
  torch::ScalarType dtype() const { return dtype_; }

  torch::nn::Conv3d patch_embedding{nullptr};
  std::shared_ptr<torch::nn::Module> condition_embedder;
  torch::nn::Linear time_linear_1{nullptr}, time_linear_2{nullptr}, time_proj{nullptr};
  torch::nn::Linear text_linear_1{nullptr}, text_linear_2{nullptr};
  torch::nn::ModuleList blocks;
  at::Tensor scale_shift_table;  // [1, 2, D], head modulation, kept fp32
  torch::nn::Linear proj_out{nullptr};

 private:
  WanDiTConfig config_;
  int64_t block_q_, block_k_;
  torch::ScalarType dtype_ = torch::kFloat;
  bool activation_checkpointing_ = false;
  // RoPE tables of the last token grid, on its device: every step of a job (and every job of one
  // size) reuses them instead of recomputing on the host.
  std::array<int64_t, 3> rope_grid_ = {-1, -1, -1};
  at::Tensor rope_cos_, rope_sin_;
};
TORCH_MODULE(WanDiT);

}  // namespace sparge::engine
