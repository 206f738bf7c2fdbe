// Wan-VAE decoder (shared/design/WAN21.md section 4): normalized video latents -> RGB frames, with
// the reference implementations' chunked causal decoding (one latent frame at a time, feature
// caches) and parameters named like diffusers' AutoencoderKLWan (post_quant_conv, decoder.*).
// Usage: auto vae = VaeDecoder::Create(cfg, seed, device); auto video = (*vae)->Decode(latents);
// Thread-safety: not thread-safe; one thread uses a VaeDecoder (caches live per Decode call).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/models/model_config.h"

namespace sparge::engine {

class VaeDecoder {
 public:
  // Builds the decoder with deterministic weights drawn from weight_seed, in float32 on `device`
  // (Wan runs its VAE in float32). INVALID_ARGUMENT if the config is unusable (latents_mean and
  // latents_std must hold z_dim values each).
  static absl::StatusOr<std::unique_ptr<VaeDecoder>> Create(const WanVaeConfig& config,
                                                            uint64_t weight_seed,
                                                            torch::Device device);
  // The same decoder for a checkpoint load: no random init, and every parameter a placeholder
  // (see ScopedDeferredParameterInit) until LoadVaeWeights places the checkpoint's tensors on
  // `device` in float32. Unusable before that load.
  static absl::StatusOr<std::unique_ptr<VaeDecoder>> CreateForLoading(const WanVaeConfig& config,
                                                                      torch::Device device);
  ~VaeDecoder();
  VaeDecoder(const VaeDecoder&) = delete;
  VaeDecoder& operator=(const VaeDecoder&) = delete;

  // Normalized latents [B, z_dim, T', H', W'] (any device/dtype) -> video
  // [B, 3, 1 + 4 (T' - 1), 8 H', 8 W'] float32 in [-1, 1] on the decoder's device. The latents are
  // de-normalized (z * std + mean) first. INVALID_ARGUMENT for a wrong shape.
  absl::StatusOr<torch::Tensor> Decode(const torch::Tensor& latents);

  // Frames produced per latent frame after the first, and pixels per latent cell.
  int temporal_upsampling() const;
  int spatial_upsampling() const;

  int64_t num_parameters() const;
  // Parameters under their diffusers AutoencoderKLWan names (post_quant_conv.weight,
  // decoder.up_blocks.0.resnets.0.norm1.gamma, ...), e.g. for loading a checkpoint.
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;

  const WanVaeConfig& config() const { return config_; }
  torch::Device device() const { return device_; }

 private:
  struct Model;
  VaeDecoder(const WanVaeConfig& config, std::unique_ptr<Model> model, torch::Device device);

  WanVaeConfig config_;
  std::unique_ptr<Model> model_;
  torch::Device device_;
  torch::Tensor mean_;  // [1, z_dim, 1, 1, 1] float32 on device_
  torch::Tensor std_;
};

}  // namespace sparge::engine
