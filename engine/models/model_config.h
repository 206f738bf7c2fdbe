// Architecture hyper-parameters of the Wan2.1 text-to-video components (shared/design/WAN21.md),
// and the embedded tiny configuration that the default "tiny" model uses.
// Plain structs, no Torch; each Validate() names the first bad field.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace sparge::engine {

// umT5 encoder (T5 v1.1 style: pre-norm RMS, gated-GELU FFN, no biases, per-layer relative bias).
struct UMT5Config {
  int vocab_size = 256384;
  int d_model = 4096;
  int d_kv = 64;
  int num_heads = 64;
  int d_ff = 10240;
  int num_layers = 24;
  int relative_attention_num_buckets = 32;
  int relative_attention_max_distance = 128;
  float layer_norm_eps = 1e-6f;
  int text_len = 512;  // prompts are padded/truncated to this many tokens
  absl::Status Validate() const;
};

// Wan2.1 DiT (WanTransformer3DModel).
struct WanDiTConfig {
  int dim = 1536;
  int ffn_dim = 8960;
  int num_heads = 12;
  int num_layers = 30;
  std::array<int, 3> patch_size = {1, 2, 2};
  int in_channels = 16;
  int out_channels = 16;
  int text_dim = 4096;
  int freq_dim = 256;
  float eps = 1e-6f;
  int rope_max_seq_len = 1024;
  int head_dim() const { return dim / num_heads; }
  absl::Status Validate() const;
};

// Wan VAE decoder (AutoencoderKLWan, decoder path).
struct WanVaeConfig {
  int base_dim = 96;
  int z_dim = 16;
  std::vector<int> dim_mult = {1, 2, 4, 4};
  int num_res_blocks = 2;
  std::vector<bool> temporal_downsample = {false, true, true};
  // Per-channel latent statistics; the DiT works on (z - mean) / std.
  std::vector<float> latents_mean;
  std::vector<float> latents_std;
  absl::Status Validate() const;
};

struct WanModelConfig {
  UMT5Config text_encoder;
  WanDiTConfig dit;
  WanVaeConfig vae;
};

// The embedded default model: Wan2.1 architecture at a tiny size, so that a 256x256, 17-frame,
// 4-step request runs in seconds on two CPU cores. Weights are drawn from a seed.
WanModelConfig TinyWanConfig();
// The real Wan2.1 T2V 1.3B and 14B shapes (for benchmarks with random weights).
WanModelConfig Wan13BConfig();
WanModelConfig Wan14BConfig();
// The built-in "wan1.3b-random" model for GPU load tests: the Wan2.1 1.3B DiT and the real VAE
// shape, with the tiny text encoder (same tokenizer) producing 512 context rows; seeded weights.
WanModelConfig Wan13BRandomConfig();

// Wan's published latent normalization constants (16 channels).
const std::vector<float>& WanLatentsMean();
const std::vector<float>& WanLatentsStd();

}  // namespace sparge::engine
