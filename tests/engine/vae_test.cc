// Tests for the Wan-VAE decoder: output shapes and range, parameter layout, causality, and the
// chunked (feature-cache) decode against a whole-sequence reference written from WAN21.md
// section 4 (the spec's "net effect" of the caches).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/models/wan_vae_decoder.h"

namespace sparge::engine {
namespace {

WanVaeConfig TinyVae() {
  WanVaeConfig c;
  c.base_dim = 8;
  c.z_dim = 16;
  c.dim_mult = {1, 2, 4, 4};
  c.num_res_blocks = 1;
  c.temporal_downsample = {false, true, true};
  c.latents_mean = {-0.7571, -0.7089, -0.9113, 0.1075,  -0.1745, 0.9653,  -0.1517, 1.5508,
                    0.4134,  -0.0715, 0.5517,  -0.3632, -0.1922, -0.9497, 0.2503,  -0.2921};
  c.latents_std = {2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160};
  return c;
}

std::unique_ptr<VaeDecoder> MakeDecoder(const WanVaeConfig& config, uint64_t seed = 42) {
  auto vae = VaeDecoder::Create(config, seed, torch::Device(torch::kCPU));
  EXPECT_TRUE(vae.ok()) << vae.status();
  return vae.ok() ? std::move(vae).value() : nullptr;
}

torch::Tensor Latents(std::vector<int64_t> shape, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn(shape);
}

TEST(VaeTest, OutputShapesFollowTheTemporalRule) {
  auto vae = MakeDecoder(TinyVae());
  ASSERT_NE(vae, nullptr);
  EXPECT_EQ(vae->temporal_upsampling(), 4);
  EXPECT_EQ(vae->spatial_upsampling(), 8);
  const std::vector<std::pair<int64_t, int64_t>> latent_to_frames = {{1, 1}, {2, 5}, {5, 17}};
  for (const auto& [t, frames] : latent_to_frames) {
    auto video = vae->Decode(Latents({1, 16, t, 4, 6}, t));
    ASSERT_TRUE(video.ok()) << video.status();
    EXPECT_EQ(video->sizes(), (std::vector<int64_t>{1, 3, frames, 32, 48}));
    EXPECT_EQ(video->scalar_type(), torch::kFloat32);
    EXPECT_GE(video->min().item<float>(), -1.0f);
    EXPECT_LE(video->max().item<float>(), 1.0f);
    // Random weights still give structured, mostly unsaturated frames.
    EXPECT_GT(video->std().item<float>(), 0.01f);
    EXPECT_LT((video->abs() >= 1.0f).to(torch::kFloat32).mean().item<float>(), 0.5f);
  }
}

TEST(VaeTest, ParameterNamesFollowDiffusers) {
  auto vae = MakeDecoder(TinyVae());
  ASSERT_NE(vae, nullptr);
  std::map<std::string, std::vector<int64_t>> shapes;
  int64_t total = 0;
  for (auto& [name, tensor] : vae->named_parameters()) {
    shapes[name] = tensor.sizes().vec();
    total += tensor.numel();
  }
  EXPECT_EQ(total, vae->num_parameters());
  // dims = 8 * [4, 4, 4, 2, 1] = [32, 32, 32, 16, 8]; up block i > 0 takes dims[i] / 2.
  const std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"post_quant_conv.weight", {16, 16, 1, 1, 1}},
      {"decoder.conv_in.weight", {32, 16, 3, 3, 3}},
      {"decoder.mid_block.resnets.0.norm1.gamma", {32, 1, 1, 1}},
      {"decoder.mid_block.resnets.1.conv2.weight", {32, 32, 3, 3, 3}},
      {"decoder.mid_block.attentions.0.norm.gamma", {32, 1, 1}},
      {"decoder.mid_block.attentions.0.to_qkv.weight", {96, 32, 1, 1}},
      {"decoder.mid_block.attentions.0.proj.weight", {32, 32, 1, 1}},
      {"decoder.up_blocks.0.resnets.1.conv1.weight", {32, 32, 3, 3, 3}},
      {"decoder.up_blocks.0.upsamplers.0.time_conv.weight", {64, 32, 3, 1, 1}},
      {"decoder.up_blocks.0.upsamplers.0.resample.1.weight", {16, 32, 3, 3}},
      {"decoder.up_blocks.1.resnets.0.conv1.weight", {32, 16, 3, 3, 3}},
      {"decoder.up_blocks.1.resnets.0.conv_shortcut.weight", {32, 16, 1, 1, 1}},
      {"decoder.up_blocks.1.upsamplers.0.time_conv.bias", {64}},
      {"decoder.up_blocks.2.resnets.0.conv1.weight", {16, 16, 3, 3, 3}},
      {"decoder.up_blocks.2.upsamplers.0.resample.1.weight", {8, 16, 3, 3}},
      {"decoder.up_blocks.3.resnets.0.norm2.gamma", {8, 1, 1, 1}},
      {"decoder.up_blocks.3.resnets.1.conv2.weight", {8, 8, 3, 3, 3}},
      {"decoder.norm_out.gamma", {8, 1, 1, 1}},
      {"decoder.conv_out.weight", {3, 8, 3, 3, 3}},
  };
  for (const auto& [name, shape] : expected) {
    ASSERT_TRUE(shapes.count(name)) << name;
    EXPECT_EQ(shapes[name], shape) << name;
  }
  EXPECT_FALSE(shapes.count("decoder.up_blocks.2.upsamplers.0.time_conv.weight"));  // 2-D only
  EXPECT_FALSE(shapes.count("decoder.up_blocks.3.upsamplers.0.resample.1.weight"));
  EXPECT_FALSE(shapes.count("decoder.up_blocks.0.resnets.0.conv_shortcut.weight"));
}

// --- Whole-sequence reference -------------------------------------------------------------------

class ReferenceDecoder {
 public:
  ReferenceDecoder(const VaeDecoder& vae) : config_(vae.config()) {
    for (auto& [name, tensor] : vae.named_parameters()) p_[name] = tensor;
  }

  torch::Tensor Decode(const torch::Tensor& latents) {
    torch::NoGradGuard no_grad;
    const int64_t z = config_.z_dim;
    const torch::Tensor mean = torch::tensor(config_.latents_mean).view({1, z, 1, 1, 1});
    const torch::Tensor std = torch::tensor(config_.latents_std).view({1, z, 1, 1, 1});
    torch::Tensor x = Conv("post_quant_conv", latents * std + mean);
    x = Conv("decoder.conv_in", x);
    x = Res("decoder.mid_block.resnets.0", x);
    x = Attn("decoder.mid_block.attentions.0", x);
    x = Res("decoder.mid_block.resnets.1", x);
    for (int i = 0; i < 4; ++i) {
      const std::string up = "decoder.up_blocks." + std::to_string(i);
      for (int j = 0; j <= config_.num_res_blocks; ++j)
        x = Res(up + ".resnets." + std::to_string(j), x);
      if (p_.count(up + ".upsamplers.0.resample.1.weight")) x = Upsample(up + ".upsamplers.0", x);
    }
    return Conv("decoder.conv_out", torch::silu(Rms("decoder.norm_out", x)));  // not clamped
  }

 private:
  // Causal conv over the whole sequence: kernel_t - 1 zero frames in front, symmetric spatial pad.
  torch::Tensor Conv(const std::string& name, const torch::Tensor& x) {
    const torch::Tensor& w = p_[name + ".weight"];
    const int64_t kt = w.size(2), kh = w.size(3), kw = w.size(4);
    const torch::Tensor padded =
        torch::constant_pad_nd(x, {kw / 2, kw / 2, kh / 2, kh / 2, kt - 1, 0}, 0.0);
    return torch::conv3d(padded, w, p_[name + ".bias"]);
  }
  torch::Tensor Rms(const std::string& name, const torch::Tensor& x) {
    const double c = static_cast<double>(x.size(1));
    torch::Tensor gamma = p_[name + ".gamma"];
    if (gamma.dim() == 3) gamma = gamma.unsqueeze(-1);
    return x / x.pow(2).sum(1, true).sqrt().clamp_min(1e-12) * std::sqrt(c) * gamma;
  }
  torch::Tensor Res(const std::string& name, const torch::Tensor& x) {
    const torch::Tensor shortcut =
        p_.count(name + ".conv_shortcut.weight") ? Conv(name + ".conv_shortcut", x) : x;
    torch::Tensor h = Conv(name + ".conv1", torch::silu(Rms(name + ".norm1", x)));
    h = Conv(name + ".conv2", torch::silu(Rms(name + ".norm2", h)));
    return h + shortcut;
  }
  torch::Tensor Attn(const std::string& name, const torch::Tensor& x) {
    const int64_t c = x.size(1), t = x.size(2);
    const torch::Tensor n = Rms(name + ".norm", x);
    torch::Tensor out = torch::empty_like(x);
    for (int64_t f = 0; f < t; ++f) {
      const torch::Tensor frame = n.select(2, f);  // [B, C, H, W]
      const torch::Tensor qkv = torch::conv2d(frame, p_[name + ".to_qkv.weight"],
                                              p_[name + ".to_qkv.bias"])
                                    .flatten(2);  // [B, 3C, HW]
      const torch::Tensor q = qkv.slice(1, 0, c).transpose(1, 2);
      const torch::Tensor k = qkv.slice(1, c, 2 * c).transpose(1, 2);
      const torch::Tensor v = qkv.slice(1, 2 * c, 3 * c).transpose(1, 2);
      const torch::Tensor a =
          torch::softmax(torch::matmul(q, k.transpose(1, 2)) / std::sqrt(c), -1);
      const torch::Tensor y = torch::matmul(a, v).transpose(1, 2).reshape(frame.sizes());
      out.select(2, f).copy_(torch::conv2d(y, p_[name + ".proj.weight"], p_[name + ".proj.bias"]));
    }
    return out + x;
  }
  // upsample3d: frame 0 passes through; frames 1.. go through a causal time conv over themselves
  // only, each giving two frames. Then nearest 2x and a 3x3 conv per frame.
  torch::Tensor Upsample(const std::string& name, torch::Tensor x) {
    if (p_.count(name + ".time_conv.weight") && x.size(2) > 1) {
      const torch::Tensor rest = x.slice(2, 1);
      const torch::Tensor y = Conv(name + ".time_conv", rest);  // [B, 2C, T-1, H, W]
      const int64_t c = x.size(1);
      std::vector<torch::Tensor> frames = {x.slice(2, 0, 1)};
      for (int64_t f = 0; f < rest.size(2); ++f) {
        frames.push_back(y.slice(1, 0, c).slice(2, f, f + 1));
        frames.push_back(y.slice(1, c, 2 * c).slice(2, f, f + 1));
      }
      x = torch::cat(frames, 2);
    }
    std::vector<torch::Tensor> out;
    for (int64_t f = 0; f < x.size(2); ++f) {
      const torch::Tensor big = x.select(2, f).repeat_interleave(2, 2).repeat_interleave(2, 3);
      out.push_back(
          torch::conv2d(big, p_[name + ".resample.1.weight"], p_[name + ".resample.1.bias"], 1, 1)
              .unsqueeze(2));
    }
    return torch::cat(out, 2);
  }

  WanVaeConfig config_;
  std::map<std::string, torch::Tensor> p_;
};

TEST(VaeTest, ChunkedDecodeEqualsWholeSequenceReference) {
  auto vae = MakeDecoder(TinyVae(), 9);
  ASSERT_NE(vae, nullptr);
  const torch::Tensor latents = Latents({2, 16, 4, 4, 4}, 21);
  auto chunked = vae->Decode(latents);
  ASSERT_TRUE(chunked.ok()) << chunked.status();
  const torch::Tensor reference = ReferenceDecoder(*vae).Decode(latents);
  ASSERT_EQ(chunked->sizes(), reference.sizes());
  EXPECT_LT((*chunked - reference.clamp(-1, 1)).abs().max().item<float>(), 1e-4f);
}

TEST(VaeTest, ClampsToUnitRange) {
  auto vae = MakeDecoder(TinyVae(), 9);
  ASSERT_NE(vae, nullptr);
  const torch::Tensor latents = Latents({1, 16, 2, 4, 4}, 4) * 3;
  const torch::Tensor unclamped = ReferenceDecoder(*vae).Decode(latents);
  ASSERT_GT(unclamped.abs().max().item<float>(), 1.05f) << "the clamp would not be exercised";
  auto video = vae->Decode(latents);
  ASSERT_TRUE(video.ok());
  EXPECT_EQ(video->abs().max().item<float>(), 1.0f);
  EXPECT_LT((*video - unclamped.clamp(-1, 1)).abs().max().item<float>(), 1e-4f);
}

TEST(VaeTest, LaterLatentFramesDoNotChangeEarlierOutput) {
  auto vae = MakeDecoder(TinyVae());
  ASSERT_NE(vae, nullptr);
  const torch::Tensor latents = Latents({1, 16, 3, 4, 4}, 5);
  torch::Tensor changed = latents.clone();
  changed.select(2, 2).add_(3.0);
  auto a = vae->Decode(latents);
  auto b = vae->Decode(changed);
  ASSERT_TRUE(a.ok() && b.ok());
  // Latent frame 2 produces output frames 5..8; frames 0..4 come from latent frames 0 and 1.
  EXPECT_TRUE(torch::equal(a->slice(2, 0, 5), b->slice(2, 0, 5)));
  EXPECT_GT((a->slice(2, 5) - b->slice(2, 5)).abs().max().item<float>(), 1e-3f);
}

TEST(VaeTest, BatchElementsAreIndependent) {
  auto vae = MakeDecoder(TinyVae());
  ASSERT_NE(vae, nullptr);
  const torch::Tensor latents = Latents({2, 16, 2, 4, 4}, 8);
  auto both = vae->Decode(latents);
  auto first = vae->Decode(latents.slice(0, 0, 1));
  ASSERT_TRUE(both.ok() && first.ok());
  EXPECT_TRUE(torch::allclose(both->slice(0, 0, 1), *first, 1e-5, 1e-5));
}

TEST(VaeTest, GeneralDimMultRule) {
  // diffusers' test VAE: base_dim 3, dim_mult all 1, so up blocks after the first take 3 / 2 = 1
  // channel.
  WanVaeConfig c = TinyVae();
  c.base_dim = 3;
  c.dim_mult = {1, 1, 1, 1};
  auto vae = MakeDecoder(c);
  ASSERT_NE(vae, nullptr);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (auto& [name, tensor] : vae->named_parameters()) shapes[name] = tensor.sizes().vec();
  EXPECT_EQ(shapes["decoder.up_blocks.1.resnets.0.conv1.weight"],
            (std::vector<int64_t>{3, 1, 3, 3, 3}));
  auto video = vae->Decode(Latents({1, 16, 2, 2, 2}, 1));
  ASSERT_TRUE(video.ok()) << video.status();
  EXPECT_EQ(video->sizes(), (std::vector<int64_t>{1, 3, 5, 16, 16}));
  EXPECT_LT((*video - ReferenceDecoder(*vae).Decode(Latents({1, 16, 2, 2, 2}, 1)).clamp(-1, 1))
                .abs()
                .max()
                .item<float>(),
            1e-4f);
}

TEST(VaeTest, RejectsBadConfigAndLatents) {
  WanVaeConfig no_stats = TinyVae();
  no_stats.latents_std.pop_back();
  EXPECT_EQ(VaeDecoder::Create(no_stats, 1, torch::Device(torch::kCPU)).status().code(),
            absl::StatusCode::kInvalidArgument);
  WanVaeConfig bad_temporal = TinyVae();
  bad_temporal.temporal_downsample = {true};
  EXPECT_EQ(VaeDecoder::Create(bad_temporal, 1, torch::Device(torch::kCPU)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto vae = MakeDecoder(TinyVae());
  ASSERT_NE(vae, nullptr);
  EXPECT_EQ(vae->Decode(torch::zeros({1, 8, 1, 4, 4})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vae->Decode(torch::zeros({16, 1, 4, 4})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vae->Decode(torch::zeros({1, 16, 0, 4, 4})).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sparge::engine
