#include "engine/models/wan_vae_decoder.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/ops/mkldnn_convolution.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/upsampling.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/models/model_loader.h"

namespace sparge::engine {
namespace {

namespace nn = torch::nn;

// Per-Decode state of every cached causal conv, indexed in call order within a chunk (the
// reference implementations' feat_cache / feat_idx).
class FeatureCache {
 public:
  enum class Slot { kEmpty, kFirstChunk, kFrames };

  // Called once per chunk before the decoder runs: the same convs claim the same slots again.
  void StartChunk() { next_ = 0; }
  size_t Claim() {
    if (next_ == slots_.size()) {
      slots_.push_back(Slot::kEmpty);
      frames_.emplace_back();
    }
    return next_++;
  }
  Slot slot(size_t i) const { return slots_[i]; }
  const torch::Tensor& frames(size_t i) const { return frames_[i]; }
  void MarkFirstChunk(size_t i) { slots_[i] = Slot::kFirstChunk; }
  void Store(size_t i, torch::Tensor frames) {
    slots_[i] = Slot::kFrames;
    frames_[i] = std::move(frames);
  }

 private:
  std::vector<Slot> slots_;
  std::vector<torch::Tensor> frames_;
  size_t next_ = 0;
};

constexpr int64_t kCacheFrames = 2;  // a temporal kernel of 3 needs the 2 frames before a chunk

// Last kCacheFrames frames of a conv input; a one-frame chunk borrows the newest cached frame so
// that the next chunk still sees two frames of history.
torch::Tensor NextCache(const torch::Tensor& x, const torch::Tensor& previous) {
  const int64_t t = x.size(2);
  torch::Tensor tail =
      x.narrow(2, std::max<int64_t>(0, t - kCacheFrames), std::min<int64_t>(t, kCacheFrames))
          .clone();
  if (tail.size(2) < kCacheFrames && previous.defined()) {
    tail = torch::cat({previous.narrow(2, previous.size(2) - 1, 1), tail}, 2);
  }
  return tail;
}

// Conv3d that pads time only in front (2 frames for a temporal kernel of 3), so that output frame
// t depends on input frames <= t. A cache of earlier frames replaces part of that zero padding.
class CausalConv3dImpl : public nn::Module {
 public:
  CausalConv3dImpl(int64_t in, int64_t out, int64_t kernel_t, int64_t kernel_h, int64_t kernel_w)
      : time_pad_(kernel_t - 1), height_pad_((kernel_h - 1) / 2), width_pad_((kernel_w - 1) / 2) {
    weight_ = register_parameter("weight", torch::empty({out, in, kernel_t, kernel_h, kernel_w}));
    bias_ = register_parameter("bias", torch::zeros({out}));
  }

  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cache = {}) {
    int64_t front = time_pad_;
    if (cache.defined() && front > 0) {
      x = torch::cat({cache, x}, 2);
      front -= cache.size(2);
    }
    if (front > 0) {
      auto shape = x.sizes().vec();
      shape[2] = front;
      x = torch::cat({torch::zeros(shape, x.options()), x}, 2);
    }
    // Spatial zero padding is symmetric, so the convolution itself can do it without a copy.
    if (x.is_cpu() && x.scalar_type() == torch::kFloat32 && at::hasMKLDNN()) {
      // ATen's conv3d sends batch-1 inputs with N*C*T*H <= 20480 (every chunk here) to its im2col
      // fallback; oneDNN's direct convolution is about 10x faster on those shapes.
      return at::mkldnn_convolution(x.contiguous(), weight_, bias_, {0, height_pad_, width_pad_},
                                    {1, 1, 1}, {1, 1, 1}, 1);
    }
    return torch::conv3d(x, weight_, bias_, /*stride=*/1, /*padding=*/{0, height_pad_, width_pad_});
  }

  // The regular cached call (resblock convs, conv_in, conv_out).
  torch::Tensor forward_cached(const torch::Tensor& x, FeatureCache* cache) {
    if (cache == nullptr) return forward(x);
    const size_t slot = cache->Claim();
    const torch::Tensor previous = cache->frames(slot);
    torch::Tensor next = NextCache(x, previous);
    torch::Tensor y = forward(x, previous);
    cache->Store(slot, std::move(next));
    return y;
  }

 private:
  int64_t time_pad_, height_pad_, width_pad_;
  torch::Tensor weight_, bias_;
};
TORCH_MODULE(CausalConv3d);

// The VAE's RMS norm: L2-normalize over channels, times sqrt(C) and a learned per-channel gamma.
class WanRMSNormImpl : public nn::Module {
 public:
  WanRMSNormImpl(int64_t channels, bool images) : scale_(std::sqrt(static_cast<double>(channels))) {
    gamma_ = register_parameter(
        "gamma", images ? torch::ones({channels, 1, 1}) : torch::ones({channels, 1, 1, 1}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    // x / max(||x||, 1e-12), as a multiply by rsqrt(max(||x||^2, 1e-24)): one reduction and two
    // broadcast multiplies instead of a strided norm kernel and a division.
    const torch::Tensor inv_norm = x.square().sum(1, /*keepdim=*/true).clamp_min_(1e-24).rsqrt_();
    return (x * inv_norm).mul_(gamma_ * scale_);
  }

 private:
  double scale_;
  torch::Tensor gamma_;
};
TORCH_MODULE(WanRMSNorm);

class WanResidualBlockImpl : public nn::Module {
 public:
  WanResidualBlockImpl(int64_t in, int64_t out) {
    norm1_ = register_module("norm1", WanRMSNorm(in, /*images=*/false));
    conv1_ = register_module("conv1", CausalConv3d(in, out, 3, 3, 3));
    norm2_ = register_module("norm2", WanRMSNorm(out, /*images=*/false));
    conv2_ = register_module("conv2", CausalConv3d(out, out, 3, 3, 3));
    if (in != out)
      conv_shortcut_ = register_module("conv_shortcut", CausalConv3d(in, out, 1, 1, 1));
  }
  torch::Tensor forward(const torch::Tensor& x, FeatureCache* cache) {
    const torch::Tensor shortcut = conv_shortcut_ ? conv_shortcut_->forward(x) : x;
    torch::Tensor h = conv1_->forward_cached(torch::silu(norm1_->forward(x)), cache);
    h = conv2_->forward_cached(torch::silu(norm2_->forward(h)), cache);
    return h + shortcut;
  }

 private:
  WanRMSNorm norm1_{nullptr}, norm2_{nullptr};
  CausalConv3d conv1_{nullptr}, conv2_{nullptr}, conv_shortcut_{nullptr};
};
TORCH_MODULE(WanResidualBlock);

// [B, C, T, H, W] <-> [B*T, C, H, W] for the per-frame 2-D ops.
torch::Tensor FramesToImages(const torch::Tensor& x) {
  return x.permute({0, 2, 1, 3, 4})
      .reshape({x.size(0) * x.size(2), x.size(1), x.size(3), x.size(4)});
}
torch::Tensor ImagesToFrames(const torch::Tensor& y, int64_t b, int64_t t) {
  return y.view({b, t, y.size(1), y.size(2), y.size(3)}).permute({0, 2, 1, 3, 4});
}

// Single-head self-attention over the pixels of each frame separately.
class WanAttentionBlockImpl : public nn::Module {
 public:
  explicit WanAttentionBlockImpl(int64_t c) {
    norm_ = register_module("norm", WanRMSNorm(c, /*images=*/true));
    to_qkv_ = register_module("to_qkv", nn::Conv2d(nn::Conv2dOptions(c, 3 * c, 1)));
    proj_ = register_module("proj", nn::Conv2d(nn::Conv2dOptions(c, c, 1)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), c = x.size(1), t = x.size(2), h = x.size(3), w = x.size(4);
    const torch::Tensor images = FramesToImages(x);
    // [B*T, 3C, H, W] -> [B*T, 1, H*W, 3C]; channel thirds are q, k, v.
    const torch::Tensor qkv =
        to_qkv_->forward(norm_->forward(images)).view({b * t, 1, 3 * c, h * w}).transpose(2, 3);
    const std::vector<torch::Tensor> parts = qkv.chunk(3, -1);
    const torch::Tensor attended = at::scaled_dot_product_attention(parts[0], parts[1], parts[2]);
    const torch::Tensor y =
        proj_->forward(attended.squeeze(1).transpose(1, 2).reshape({b * t, c, h, w}));
    return ImagesToFrames(y, b, t) + x;
  }

 private:
  WanRMSNorm norm_{nullptr};
  nn::Conv2d to_qkv_{nullptr}, proj_{nullptr};
};
TORCH_MODULE(WanAttentionBlock);

// Spatial 2x upsampling (nearest, then a 3x3 conv halving channels), optionally preceded by a
// temporal 2x upsampling (upsample3d): a causal time conv doubling channels, whose two halves
// become consecutive frames.
class WanResampleImpl : public nn::Module {
 public:
  WanResampleImpl(int64_t dim, bool temporal) {
    resample_ = register_module(
        "resample", nn::Sequential(nn::Upsample(nn::UpsampleOptions()
                                                    .scale_factor(std::vector<double>{2.0, 2.0})
                                                    .mode(torch::kNearest)),
                                   nn::Conv2d(nn::Conv2dOptions(dim, dim / 2, 3).padding(1))));
    if (temporal) time_conv_ = register_module("time_conv", CausalConv3d(dim, 2 * dim, 3, 1, 1));
  }

  torch::Tensor forward(torch::Tensor x, FeatureCache* cache) {
    const int64_t b = x.size(0);
    if (time_conv_ && cache != nullptr) x = TemporalUpsample(x, cache);
    const int64_t t = x.size(2);
    return ImagesToFrames(resample_->forward(FramesToImages(x)), b, t);
  }

 private:
  // The reference's first-chunk rule: the first chunk's frames skip the time conv (one latent frame
  // -> one output frame); the second chunk runs it on plain zero padding; later chunks use the
  // cache. Net effect: a causal conv over the frames after the first chunk.
  torch::Tensor TemporalUpsample(const torch::Tensor& x, FeatureCache* cache) {
    const size_t slot = cache->Claim();
    switch (cache->slot(slot)) {
      case FeatureCache::Slot::kEmpty:
        cache->MarkFirstChunk(slot);
        return x;
      case FeatureCache::Slot::kFirstChunk: {
        torch::Tensor next = NextCache(x, torch::Tensor());
        if (next.size(2) < kCacheFrames) next = torch::cat({torch::zeros_like(next), next}, 2);
        torch::Tensor y = time_conv_->forward(x);
        cache->Store(slot, std::move(next));
        return InterleaveTime(y);
      }
      case FeatureCache::Slot::kFrames:
        break;
    }
    const torch::Tensor previous = cache->frames(slot);
    torch::Tensor next = NextCache(x, previous);
    torch::Tensor y = time_conv_->forward(x, previous);
    cache->Store(slot, std::move(next));
    return InterleaveTime(y);
  }

  // [B, 2C, T, H, W] -> [B, C, 2T, H, W]: channels [0, C) give frame 2t, [C, 2C) frame 2t + 1.
  static torch::Tensor InterleaveTime(const torch::Tensor& y) {
    const int64_t b = y.size(0), c = y.size(1) / 2, t = y.size(2), h = y.size(3), w = y.size(4);
    return y.view({b, 2, c, t, h, w}).permute({0, 2, 3, 1, 4, 5}).reshape({b, c, 2 * t, h, w});
  }

  nn::Sequential resample_{nullptr};
  CausalConv3d time_conv_{nullptr};
};
TORCH_MODULE(WanResample);

class WanMidBlockImpl : public nn::Module {
 public:
  explicit WanMidBlockImpl(int64_t dim) {
    nn::ModuleList resnets, attentions;
    for (int i = 0; i < 2; ++i) {
      resnets_.push_back(WanResidualBlock(dim, dim));
      resnets->push_back(resnets_.back());
    }
    attention_ = WanAttentionBlock(dim);
    attentions->push_back(attention_);
    register_module("attentions", attentions);
    register_module("resnets", resnets);
  }
  torch::Tensor forward(torch::Tensor x, FeatureCache* cache) {
    x = resnets_[0]->forward(x, cache);
    x = attention_->forward(x);
    return resnets_[1]->forward(x, cache);
  }

 private:
  std::vector<WanResidualBlock> resnets_;
  WanAttentionBlock attention_{nullptr};
};
TORCH_MODULE(WanMidBlock);

enum class UpsampleMode { kNone, kSpatial, kSpatioTemporal };

class WanUpBlockImpl : public nn::Module {
 public:
  WanUpBlockImpl(int64_t in, int64_t out, int num_res_blocks, UpsampleMode mode) {
    nn::ModuleList resnets;
    int64_t current = in;
    for (int i = 0; i < num_res_blocks + 1; ++i) {
      resnets_.push_back(WanResidualBlock(current, out));
      resnets->push_back(resnets_.back());
      current = out;
    }
    register_module("resnets", resnets);
    if (mode != UpsampleMode::kNone) {
      upsampler_ = WanResample(out, mode == UpsampleMode::kSpatioTemporal);
      nn::ModuleList upsamplers;
      upsamplers->push_back(upsampler_);
      register_module("upsamplers", upsamplers);
    }
  }
  torch::Tensor forward(torch::Tensor x, FeatureCache* cache) {
    for (WanResidualBlock& resnet : resnets_) x = resnet->forward(x, cache);
    if (upsampler_) x = upsampler_->forward(x, cache);
    return x;
  }

 private:
  std::vector<WanResidualBlock> resnets_;
  WanResample upsampler_{nullptr};
};
TORCH_MODULE(WanUpBlock);

class WanDecoder3dImpl : public nn::Module {
 public:
  explicit WanDecoder3dImpl(const WanVaeConfig& c) {
    const size_t levels = c.dim_mult.size();
    // dims = base * [dim_mult[-1], reversed(dim_mult)...], e.g. 96 * [4, 4, 4, 2, 1].
    std::vector<int64_t> dims = {int64_t{c.base_dim} * c.dim_mult.back()};
    for (size_t i = levels; i-- > 0;) dims.push_back(int64_t{c.base_dim} * c.dim_mult[i]);

    conv_in_ = register_module("conv_in", CausalConv3d(c.z_dim, dims[0], 3, 3, 3));
    mid_block_ = register_module("mid_block", WanMidBlock(dims[0]));
    nn::ModuleList up_blocks;
    for (size_t i = 0; i + 1 < dims.size(); ++i) {
      // Every up block after the first follows a resample that halved the channels.
      const int64_t in = i > 0 ? dims[i] / 2 : dims[i];
      UpsampleMode mode = UpsampleMode::kNone;
      if (i + 1 < levels) {
        const bool temporal = c.temporal_downsample[levels - 2 - i];  // reversed
        mode = temporal ? UpsampleMode::kSpatioTemporal : UpsampleMode::kSpatial;
      }
      up_blocks_.push_back(WanUpBlock(in, dims[i + 1], c.num_res_blocks, mode));
      up_blocks->push_back(up_blocks_.back());
    }
    register_module("up_blocks", up_blocks);
    norm_out_ = register_module("norm_out", WanRMSNorm(dims.back(), /*images=*/false));
    conv_out_ = register_module("conv_out", CausalConv3d(dims.back(), 3, 3, 3, 3));
  }

  torch::Tensor forward(torch::Tensor x, FeatureCache* cache) {
    x = conv_in_->forward_cached(x, cache);
    x = mid_block_->forward(x, cache);
    for (WanUpBlock& block : up_blocks_) x = block->forward(x, cache);
    return conv_out_->forward_cached(torch::silu(norm_out_->forward(x)), cache);
  }

 private:
  CausalConv3d conv_in_{nullptr}, conv_out_{nullptr};
  WanMidBlock mid_block_{nullptr};
  std::vector<WanUpBlock> up_blocks_;
  WanRMSNorm norm_out_{nullptr};
};
TORCH_MODULE(WanDecoder3d);

class WanVaeDecoderModelImpl : public nn::Module {
 public:
  explicit WanVaeDecoderModelImpl(const WanVaeConfig& c) {
    post_quant_conv_ = register_module("post_quant_conv", CausalConv3d(c.z_dim, c.z_dim, 1, 1, 1));
    decoder_ = register_module("decoder", WanDecoder3d(c));
    ReleaseParametersForLoading(*this);  // no-op unless a checkpoint load deferred init
  }
  // De-normalized latents [B, z, T', H', W'] -> unclamped video, one latent frame per chunk.
  torch::Tensor forward(const torch::Tensor& z) {
    const torch::Tensor x = post_quant_conv_->forward(z);
    FeatureCache cache;
    std::vector<torch::Tensor> chunks;
    for (int64_t i = 0; i < x.size(2); ++i) {
      cache.StartChunk();
      chunks.push_back(decoder_->forward(x.narrow(2, i, 1), &cache));
    }
    return torch::cat(chunks, 2);
  }

 private:
  CausalConv3d post_quant_conv_{nullptr};
  WanDecoder3d decoder_{nullptr};
};
TORCH_MODULE(WanVaeDecoderModel);

absl::Status CheckConfig(const WanVaeConfig& c) {
  if (c.base_dim <= 0 || c.z_dim <= 0) {
    return absl::InvalidArgumentError("vae.base_dim and vae.z_dim must be positive");
  }
  if (c.dim_mult.empty()) return absl::InvalidArgumentError("vae.dim_mult must not be empty");
  for (int m : c.dim_mult) {
    if (m <= 0) return absl::InvalidArgumentError("vae.dim_mult entries must be positive");
  }
  // Up blocks after the first get half the previous block's width; it must stay >= 1 channel.
  for (size_t i = 0; i + 1 < c.dim_mult.size(); ++i) {
    if (c.base_dim * c.dim_mult[i + 1] / 2 < 1 || c.base_dim * c.dim_mult[i] / 2 < 1) {
      return absl::InvalidArgumentError("vae.base_dim * dim_mult is too small to halve");
    }
  }
  if (c.num_res_blocks < 0) return absl::InvalidArgumentError("vae.num_res_blocks must be >= 0");
  if (c.temporal_downsample.size() + 1 != c.dim_mult.size()) {
    return absl::InvalidArgumentError(
        "vae.temporal_downsample must have one entry fewer than vae.dim_mult");
  }
  if (c.latents_mean.size() != static_cast<size_t>(c.z_dim) ||
      c.latents_std.size() != static_cast<size_t>(c.z_dim)) {
    return absl::InvalidArgumentError(
        "vae.latents_mean and vae.latents_std need z_dim values each");
  }
  for (float s : c.latents_std) {
    if (!(s > 0.0f)) return absl::InvalidArgumentError("vae.latents_std values must be positive");
  }
  return absl::OkStatus();
}

}  // namespace

struct VaeDecoder::Model {
  WanVaeDecoderModel module{nullptr};
};

VaeDecoder::VaeDecoder(const WanVaeConfig& config, std::unique_ptr<Model> model,
                       torch::Device device)
    : config_(config), model_(std::move(model)), device_(device) {
  const int64_t z = config_.z_dim;
  mean_ = torch::tensor(config_.latents_mean, torch::kFloat32).view({1, z, 1, 1, 1}).to(device_);
  std_ = torch::tensor(config_.latents_std, torch::kFloat32).view({1, z, 1, 1, 1}).to(device_);
}

VaeDecoder::~VaeDecoder() = default;

absl::StatusOr<std::unique_ptr<VaeDecoder>> VaeDecoder::Create(const WanVaeConfig& config,
                                                               uint64_t weight_seed,
                                                               torch::Device device) {
  if (absl::Status s = CheckConfig(config); !s.ok()) return s;
  try {
    torch::NoGradGuard no_grad;
    auto model = std::make_unique<Model>();
    model->module = WanVaeDecoderModel(config);
    model->module->eval();
    // Drawn on the CPU in registration order: the same seed gives the same decoder everywhere.
    // Weights ~ N(0, 1/fan_in) keep activations O(1) through the residual stack, so a random
    // decoder still produces structured, unsaturated frames.
    torch::Generator generator = at::make_generator<at::CPUGeneratorImpl>(weight_seed);
    for (auto& item : model->module->named_parameters()) {
      torch::Tensor& p = item.value();
      if (absl::EndsWith(item.key(), ".gamma")) {
        p.fill_(1.0);
      } else if (absl::EndsWith(item.key(), ".bias")) {
        p.copy_(torch::randn(p.sizes(), generator, torch::kFloat32) * 0.02);
      } else {
        const double fan_in = static_cast<double>(p.numel() / p.size(0));
        p.copy_(torch::randn(p.sizes(), generator, torch::kFloat32) / std::sqrt(fan_in));
      }
    }
    model->module->to(device);
    return std::unique_ptr<VaeDecoder>(new VaeDecoder(config, std::move(model), device));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the VAE decoder failed: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<VaeDecoder>> VaeDecoder::CreateForLoading(
    const WanVaeConfig& config, torch::Device device) {
  if (absl::Status s = CheckConfig(config); !s.ok()) return s;
  try {
    torch::NoGradGuard no_grad;
    auto model = std::make_unique<Model>();
    {
      ScopedDeferredParameterInit deferred;
      model->module = WanVaeDecoderModel(config);
    }
    model->module->eval();
    return std::unique_ptr<VaeDecoder>(new VaeDecoder(config, std::move(model), device));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the VAE decoder failed: ", e.what()));
  }
}

absl::StatusOr<torch::Tensor> VaeDecoder::Decode(const torch::Tensor& latents) {
  if (!latents.defined() || latents.dim() != 5 || latents.size(1) != config_.z_dim ||
      latents.size(0) < 1 || latents.size(2) < 1 || latents.size(3) < 1 || latents.size(4) < 1) {
    return absl::InvalidArgumentError(absl::StrCat("VAE latents must be [B, ", config_.z_dim,
                                                   ", T', H', W'] with every size >= 1"));
  }
  try {
    torch::NoGradGuard no_grad;
    const torch::Tensor z = latents.to(device_, torch::kFloat32) * std_ + mean_;
    return model_->module->forward(z).clamp(-1.0, 1.0);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("VAE decode failed: ", e.what()));
  }
}

int VaeDecoder::temporal_upsampling() const {
  int factor = 1;
  for (bool t : config_.temporal_downsample) factor *= t ? 2 : 1;
  return factor;
}

int VaeDecoder::spatial_upsampling() const {
  return 1 << (static_cast<int>(config_.dim_mult.size()) - 1);
}

int64_t VaeDecoder::num_parameters() const {
  int64_t n = 0;
  for (const torch::Tensor& p : model_->module->parameters()) n += p.numel();
  return n;
}

std::vector<std::pair<std::string, torch::Tensor>> VaeDecoder::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : model_->module->named_parameters()) {
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

}  // namespace sparge::engine
