#include "engine/models/model_config.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace sparge::engine {
namespace {

absl::Status Positive(const char* scope, const char* field, int value) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(scope, ".", field, " must be > 0, got ", value));
}

}  // namespace

absl::Status UMT5Config::Validate() const {
  for (const auto& [name, value] :
       {std::pair<const char*, int>{"vocab_size", vocab_size},
        {"d_model", d_model},
        {"d_kv", d_kv},
        {"num_heads", num_heads},
        {"d_ff", d_ff},
        {"num_layers", num_layers},
        {"relative_attention_num_buckets", relative_attention_num_buckets},
        {"relative_attention_max_distance", relative_attention_max_distance},
        {"text_len", text_len}}) {
    if (absl::Status s = Positive("text_encoder", name, value); !s.ok()) return s;
  }
  // Bidirectional buckets split in two halves, each with an exact and a
  // log-spaced part.
  if (relative_attention_num_buckets % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("text_encoder.relative_attention_num_buckets must be a "
                     "multiple of 4, got ",
                     relative_attention_num_buckets));
  }
  if (!(layer_norm_eps > 0.0f)) {
    return absl::InvalidArgumentError("text_encoder.layer_norm_eps must be > 0");
  }
  return absl::OkStatus();
}

absl::Status WanDiTConfig::Validate() const {
  for (const auto& [name, value] : {std::pair<const char*, int>{"dim", dim},
                                    {"ffn_dim", ffn_dim},
                                    {"num_heads", num_heads},
                                    {"num_layers", num_layers},
                                    {"in_channels", in_channels},
                                    {"out_channels", out_channels},
                                    {"text_dim", text_dim},
                                    {"freq_dim", freq_dim},
                                    {"rope_max_seq_len", rope_max_seq_len},
                                    {"patch_size[0]", patch_size[0]},
                                    {"patch_size[1]", patch_size[1]},
                                    {"patch_size[2]", patch_size[2]}}) {
    if (absl::Status s = Positive("dit", name, value); !s.ok()) return s;
  }
  if (dim % num_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dit.dim (", dim, ") must be divisible by dit.num_heads (", num_heads, ")"));
  }
  // RoPE rotates interleaved pairs and splits them over three axes.
  if (head_dim() % 2 != 0 || head_dim() < 6) {
    return absl::InvalidArgumentError(
        absl::StrCat("dit head_dim (dim / num_heads) must be even and >= 6, got ", head_dim()));
  }
  if (freq_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("dit.freq_dim must be even, got ", freq_dim));
  }
  if (!(eps > 0.0f)) return absl::InvalidArgumentError("dit.eps must be > 0");
  return absl::OkStatus();
}

absl::Status WanVaeConfig::Validate() const {
  if (absl::Status s = Positive("vae", "base_dim", base_dim); !s.ok()) return s;
  if (absl::Status s = Positive("vae", "z_dim", z_dim); !s.ok()) return s;
  if (absl::Status s = Positive("vae", "num_res_blocks", num_res_blocks); !s.ok()) return s;
  if (dim_mult.empty()) return absl::InvalidArgumentError("vae.dim_mult must not be empty");
  for (int m : dim_mult) {
    if (m <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("vae.dim_mult entries must be > 0, got ", m));
    }
  }
  if (temporal_downsample.size() + 1 != dim_mult.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("vae.temporal_downsample must have len(dim_mult) - 1 = ", dim_mult.size() - 1,
                     " entries, got ", temporal_downsample.size()));
  }
  if (latents_mean.size() != static_cast<size_t>(z_dim) ||
      latents_std.size() != static_cast<size_t>(z_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("vae.latents_mean and vae.latents_std must have z_dim = ", z_dim,
                     " entries, got ", latents_mean.size(), " and ", latents_std.size()));
  }
  for (float s : latents_std) {
    if (!(s > 0.0f)) return absl::InvalidArgumentError("vae.latents_std entries must be > 0");
  }
  return absl::OkStatus();
}

const std::vector<float>& WanLatentsMean() {
  static const std::vector<float>* const kMean = new std::vector<float>{
      -0.7571f, -0.7089f, -0.9113f, 0.1075f,  -0.1745f, 0.9653f,  -0.1517f, 1.5508f,
      0.4134f,  -0.0715f, 0.5517f,  -0.3632f, -0.1922f, -0.9497f, 0.2503f,  -0.2921f};
  return *kMean;
}

const std::vector<float>& WanLatentsStd() {
  static const std::vector<float>* const kStd = new std::vector<float>{
      2.8184f, 1.4541f, 2.3275f, 2.6558f, 1.2196f, 1.7708f, 2.6052f, 2.0743f,
      3.2687f, 2.1526f, 2.8652f, 1.5579f, 1.6382f, 1.1253f, 2.8251f, 1.9160f};
  return *kStd;
}

namespace {

WanVaeConfig RealWanVae() {
  WanVaeConfig vae;  // the struct defaults are the real Wan-VAE shapes
  vae.latents_mean = WanLatentsMean();
  vae.latents_std = WanLatentsStd();
  return vae;
}

}  // namespace

WanModelConfig TinyWanConfig() {
  WanModelConfig config;
  UMT5Config& t5 = config.text_encoder;
  t5.vocab_size = 512;
  t5.d_model = 64;
  t5.d_kv = 16;
  t5.num_heads = 4;
  t5.d_ff = 128;
  t5.num_layers = 2;
  t5.relative_attention_num_buckets = 32;
  t5.relative_attention_max_distance = 128;
  t5.layer_norm_eps = 1e-6f;
  t5.text_len = 64;

  WanDiTConfig& dit = config.dit;
  dit.dim = 128;
  dit.ffn_dim = 256;
  dit.num_heads = 2;
  dit.num_layers = 2;
  dit.patch_size = {1, 2, 2};
  dit.in_channels = 16;
  dit.out_channels = 16;
  dit.text_dim = 64;
  dit.freq_dim = 256;
  dit.eps = 1e-6f;
  dit.rope_max_seq_len = 1024;

  WanVaeConfig& vae = config.vae;
  vae.base_dim = 8;
  vae.z_dim = 16;
  vae.dim_mult = {1, 2, 4, 4};
  vae.num_res_blocks = 1;
  vae.temporal_downsample = {false, true, true};
  vae.latents_mean = WanLatentsMean();
  vae.latents_std = WanLatentsStd();
  return config;
}

WanModelConfig Wan13BConfig() {
  WanModelConfig config;  // UMT5Config defaults are umT5-XXL
  config.dit.dim = 1536;
  config.dit.ffn_dim = 8960;
  config.dit.num_heads = 12;
  config.dit.num_layers = 30;
  config.vae = RealWanVae();
  return config;
}

WanModelConfig Wan13BRandomConfig() {
  WanModelConfig config = Wan13BConfig();
  config.text_encoder = TinyWanConfig().text_encoder;
  config.text_encoder.text_len = 512;  // Wan's context length: cross-attention cost as in 1.3B
  config.dit.text_dim = config.text_encoder.d_model;
  return config;
}

WanModelConfig Wan14BConfig() {
  WanModelConfig config;
  config.dit.dim = 5120;
  config.dit.ffn_dim = 13824;
  config.dit.num_heads = 40;
  config.dit.num_layers = 40;
  config.vae = RealWanVae();
  return config;
}

}  // namespace sparge::engine
