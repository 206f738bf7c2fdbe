// Model loaders: config.json parsing (diffusers and original Wan DiT configs, unsupported values
// named), the original-Wan -> diffusers key map, and strict loading (missing, unexpected and
// mis-shaped tensors each named with both shapes). Numerical parity lives in tests/parity/.
#include "engine/models/model_loader.h"

#include <torch/torch.h>

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fstream>
#include <map>
#include <string>

#include "gtest/gtest.h"

namespace sparge::engine {
namespace {

// POSIX, not std::filesystem: libtorch.so exports std::filesystem symbols that crash when called.
int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }
void RemoveTree(const std::string& dir) { ::nftw(dir.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }
std::string MakeTempDir() {
  std::string templ = "/tmp/sparge_weights_test_XXXXXX";
  return ::mkdtemp(templ.data()) != nullptr ? templ : "";
}

class ModelLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { RemoveTree(dir_); }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
  std::string dir_;
};

WanDiT TinyDiT(uint64_t seed) {
  WanDiT dit(TinyWanConfig().dit, 64, 64);
  dit->InitializeWeights(seed);
  dit->ToInference(torch::kCPU, torch::kFloat);
  return dit;
}

std::map<std::string, torch::Tensor> StateDict(WanDiT& dit) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : dit->named_parameters()) out[item.key()] = item.value().detach();
  return out;
}

TEST_F(ModelLoaderTest, ParsesDiffusersAndOriginalDiTConfigs) {
  auto diff = ReadDiTConfig(Write("d.json", R"({"_class_name": "WanTransformer3DModel",
      "num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30,
      "patch_size": [1, 2, 2], "in_channels": 16, "out_channels": 16, "text_dim": 4096,
      "freq_dim": 256, "eps": 1e-06, "cross_attn_norm": true, "qk_norm": "rms_norm_across_heads",
      "image_dim": null, "added_kv_proj_dim": null, "rope_max_seq_len": 1024})"));
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_EQ(diff->dim, 1536);
  EXPECT_EQ(diff->num_heads, 12);
  EXPECT_EQ(diff->ffn_dim, 8960);
  EXPECT_EQ(diff->num_layers, 30);
  auto orig = ReadDiTConfig(Write("o.json", R"({"_class_name": "WanModel", "dim": 1536,
      "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v",
      "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512})"));
  ASSERT_TRUE(orig.ok()) << orig.status();
  EXPECT_EQ(orig->dim, 1536);
  EXPECT_EQ(orig->text_dim, 4096);
  auto i2v = ReadDiTConfig(Write("i.json", R"({"num_attention_heads": 2, "image_dim": 1280})"));
  ASSERT_FALSE(i2v.ok());
  EXPECT_NE(i2v.status().message().find("image_dim"), std::string::npos);
  auto bad = ReadDiTConfig(Write("b.json", R"({"num_attention_heads": "two"})"));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("num_attention_heads"), std::string::npos);
  auto sched = ReadSchedulerConfig(Write("s.json", R"({"_class_name": "UniPCMultistepScheduler",
      "prediction_type": "flow_prediction", "use_flow_sigmas": true, "flow_shift": 3.0,
      "solver_order": 2, "solver_type": "bh2", "num_train_timesteps": 1000})"));
  ASSERT_TRUE(sched.ok()) << sched.status();
  EXPECT_EQ(sched->kind, SamplerKind::kUniPC);
  EXPECT_FLOAT_EQ(sched->shift, 3.0f);
  EXPECT_FALSE(ReadUMT5Config(Write("t.json", R"({"feed_forward_proj": "relu"})")).ok());
}

TEST_F(ModelLoaderTest, DirectoryConfigsMustFitTogether) {
  for (const char* sub : {"/transformer", "/text_encoder", "/vae", "/scheduler", "/tokenizer"}) {
    ::mkdir((dir_ + sub).c_str(), 0755);
  }
  Write("transformer/config.json",
        R"({"num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 32, "ffn_dim": 32,
            "num_layers": 1})");
  Write("text_encoder/config.json", R"({"model_type": "umt5", "d_model": 32, "vocab_size": 512})");
  Write("scheduler/scheduler_config.json",
        R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0})");
  Write("tokenizer/tokenizer_config.json", R"({"model_max_length": 77})");
  Write("vae/config.json", R"({"base_dim": 4, "dim_mult": [1, 2, 2, 2]})");
  auto ok = ReadModelDirectoryConfig(dir_);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->model.text_encoder.text_len, 77);
  EXPECT_EQ(ok->scheduler.kind, SamplerKind::kEuler);
  EXPECT_FLOAT_EQ(ok->scheduler.shift, 7.0f);
  EXPECT_EQ(ok->model.vae.latents_mean, WanLatentsMean());

  Write("vae/config.json",
        R"({"base_dim": 4, "dim_mult": [1, 2, 2], "temperal_downsample": [false, true]})");
  auto vae = ReadModelDirectoryConfig(dir_);
  ASSERT_FALSE(vae.ok());
  EXPECT_NE(vae.status().message().find("4x temporal"), std::string::npos) << vae.status();

  Write("vae/config.json", R"({"base_dim": 4})");
  Write("text_encoder/config.json", R"({"model_type": "umt5", "d_model": 48})");
  auto text = ReadModelDirectoryConfig(dir_);
  ASSERT_FALSE(text.ok());
  EXPECT_NE(text.status().message().find("text_dim 32 != text_encoder d_model 48"),
            std::string::npos) << text.status();
}

TEST(WanKeyMapTest, MapsOriginalNamesIncludingTheNormSwap) {
  const std::map<std::string, std::string> cases = {
      {"patch_embedding.weight", "patch_embedding.weight"},
      {"text_embedding.2.bias", "condition_embedder.text_embedder.linear_2.bias"},
      {"time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight"},
      {"time_projection.1.weight", "condition_embedder.time_proj.weight"},
      {"head.modulation", "scale_shift_table"},
      {"head.head.bias", "proj_out.bias"},
      {"blocks.11.modulation", "blocks.11.scale_shift_table"},
      {"blocks.0.self_attn.o.weight", "blocks.0.attn1.to_out.0.weight"},
      {"blocks.3.cross_attn.norm_k.weight", "blocks.3.attn2.norm_k.weight"},
      {"blocks.2.norm3.bias", "blocks.2.norm2.bias"},
      {"blocks.2.ffn.0.weight", "blocks.2.ffn.net.0.proj.weight"},
      {"blocks.2.ffn.2.bias", "blocks.2.ffn.net.2.bias"},
  };
  for (const auto& [orig, diff] : cases) EXPECT_EQ(WanOriginalToDiffusersKey(orig), diff) << orig;
}

TEST_F(ModelLoaderTest, LoadsExactlyAndNamesEveryMismatch) {
  WanDiT source = TinyDiT(7);
  std::map<std::string, torch::Tensor> sd = StateDict(source);
  // bf16 on disk: the loader converts in the copy.
  std::map<std::string, torch::Tensor> bf16;
  for (const auto& [k, v] : sd) bf16[k] = v.to(torch::kBFloat16);
  ASSERT_TRUE(WriteSafetensors(dir_ + "/ok.safetensors", bf16).ok());
  WanDiT target = TinyDiT(8);
  auto ckpt = Checkpoint::Open(dir_ + "/ok.safetensors");
  ASSERT_TRUE(ckpt.ok());
  ASSERT_TRUE(LoadDiTWeights(*target, **ckpt).ok());
  for (const auto& [k, v] : StateDict(target)) {
    EXPECT_TRUE(torch::equal(v, bf16[k].to(torch::kFloat))) << k;
  }

  auto broken = sd;
  broken.erase("blocks.1.attn2.to_v.bias");
  broken["blocks.0.extra.weight"] = torch::zeros({2});
  broken["proj_out.weight"] = torch::zeros({64, 3});
  ASSERT_TRUE(WriteSafetensors(dir_ + "/bad.safetensors", broken).ok());
  auto bad = Checkpoint::Open(dir_ + "/bad.safetensors");
  ASSERT_TRUE(bad.ok());
  absl::Status s = LoadDiTWeights(*target, **bad);
  ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  const std::string m(s.message());
  EXPECT_NE(m.find("3 problem(s)"), std::string::npos) << m;
  EXPECT_NE(m.find("missing tensor \"blocks.1.attn2.to_v.bias\" (the model expects shape [128])"),
            std::string::npos) << m;
  EXPECT_NE(m.find("unexpected tensor \"blocks.0.extra.weight\" with shape [2]"), std::string::npos)
      << m;
  EXPECT_NE(m.find("\"proj_out.weight\" has shape [64, 3] in the checkpoint, the model expects "
                   "[64, 128]"),
            std::string::npos) << m;
}

// Deferred init (the checkpoint-load path) must leave no full-size parameter storage behind: each
// parameter is a one-element placeholder with the real shape, and no random init ran into it.
TEST_F(ModelLoaderTest, DeferredInitBuildsOnlyPlaceholders) {
  const WanModelConfig config = TinyWanConfig();
  WanDiT eager(config.dit, 64, 64);
  for (const auto& item : eager->named_parameters()) {
    EXPECT_FALSE(IsParameterPlaceholder(item.value())) << item.key();
  }
  WanDiT deferred{nullptr};
  {
    ScopedDeferredParameterInit guard;
    EXPECT_TRUE(DeferredParameterInitActive());
    deferred = WanDiT(config.dit, 64, 64);
  }
  EXPECT_FALSE(DeferredParameterInitActive());
  auto eager_params = eager->named_parameters();
  auto deferred_params = deferred->named_parameters();
  ASSERT_EQ(eager_params.size(), deferred_params.size());
  for (const auto& item : deferred_params) {
    const torch::Tensor& p = item.value();
    EXPECT_EQ(p.sizes(), eager_params[item.key()].sizes()) << item.key();
    if (p.numel() > 1) EXPECT_TRUE(IsParameterPlaceholder(p)) << item.key();
  }

  auto tokenizer = Tokenizer::Embedded();
  ASSERT_TRUE(tokenizer.ok());
  auto encoder = TextEncoder::CreateForLoading(config.text_encoder, std::move(*tokenizer),
                                               torch::kCPU, torch::kFloat);
  ASSERT_TRUE(encoder.ok()) << encoder.status();
  for (const auto& [name, p] : (*encoder)->named_parameters()) {
    if (p.numel() > 1) EXPECT_TRUE(IsParameterPlaceholder(p)) << name;
  }
  auto vae = VaeDecoder::CreateForLoading(config.vae, torch::kCPU);
  ASSERT_TRUE(vae.ok()) << vae.status();
  for (const auto& [name, p] : (*vae)->named_parameters()) {
    if (p.numel() > 1) EXPECT_TRUE(IsParameterPlaceholder(p)) << name;
  }
}

// LoadDiT builds with deferred init and places each checkpoint tensor straight into its final
// dtype: values equal the checkpoint's exactly, dtypes match what ToInference gives, and no
// parameter aliases the read-only mapping.
TEST_F(ModelLoaderTest, LoadDiTPlacesCheckpointTensorsExactly) {
  const WanDiTConfig c = TinyWanConfig().dit;
  WanDiT source = TinyDiT(11);
  std::map<std::string, torch::Tensor> sd = StateDict(source);
  ::mkdir((dir_ + "/transformer").c_str(), 0755);
  ASSERT_TRUE(WriteSafetensors(dir_ + "/transformer/model.safetensors", sd).ok());
  std::ofstream(dir_ + "/transformer/config.json")
      << "{\"_class_name\": \"WanTransformer3DModel\", \"num_attention_heads\": " << c.num_heads
      << ", \"attention_head_dim\": " << c.dim / c.num_heads << ", \"ffn_dim\": " << c.ffn_dim
      << ", \"num_layers\": " << c.num_layers << ", \"patch_size\": [" << c.patch_size[0] << ", "
      << c.patch_size[1] << ", " << c.patch_size[2] << "], \"in_channels\": " << c.in_channels
      << ", \"out_channels\": " << c.out_channels << ", \"text_dim\": " << c.text_dim
      << ", \"freq_dim\": " << c.freq_dim << ", \"eps\": " << c.eps
      << ", \"rope_max_seq_len\": " << c.rope_max_seq_len << "}";
  auto loaded = LoadDiT(dir_ + "/transformer", torch::kCPU, torch::kBFloat16, 64, 64);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->dtype(), torch::kBFloat16);
  WanDiT reference = TinyDiT(11);
  reference->ToInference(torch::kCPU, torch::kBFloat16);
  auto expected_params = reference->named_parameters();
  auto ckpt = Checkpoint::Open(dir_ + "/transformer");
  ASSERT_TRUE(ckpt.ok());
  int fp32_kept = 0;
  for (const auto& item : (*loaded)->named_parameters()) {
    const torch::Tensor& p = item.value();
    const torch::Tensor& want = expected_params[item.key()];
    EXPECT_EQ(p.scalar_type(), want.scalar_type()) << item.key();
    EXPECT_FALSE(IsParameterPlaceholder(p)) << item.key();
    EXPECT_TRUE(p.is_contiguous()) << item.key();
    auto mapped = (*ckpt)->Get(item.key());
    ASSERT_TRUE(mapped.ok()) << item.key();
    EXPECT_NE(p.data_ptr(), mapped->data_ptr()) << item.key();
    EXPECT_TRUE(torch::equal(p, mapped->to(p.scalar_type()))) << item.key();
    if (p.scalar_type() == torch::kFloat) ++fp32_kept;
  }
  EXPECT_GT(fp32_kept, 0);
}

// The text encoder and VAE loaders fill placeholders with the checkpoint's tensors exactly.
TEST_F(ModelLoaderTest, TextEncoderAndVaeLoadIntoPlaceholders) {
  const WanModelConfig config = TinyWanConfig();
  auto tok_a = Tokenizer::Embedded();
  auto tok_b = Tokenizer::Embedded();
  ASSERT_TRUE(tok_a.ok() && tok_b.ok());
  auto seeded = TextEncoder::Create(config.text_encoder, std::move(*tok_a), 5, torch::kCPU,
                                    torch::kFloat);
  ASSERT_TRUE(seeded.ok()) << seeded.status();
  std::map<std::string, torch::Tensor> sd;
  for (const auto& [name, p] : (*seeded)->named_parameters()) sd[name] = p.detach();
  ASSERT_TRUE(WriteSafetensors(dir_ + "/te.safetensors", sd).ok());
  auto encoder = TextEncoder::CreateForLoading(config.text_encoder, std::move(*tok_b),
                                               torch::kCPU, torch::kBFloat16);
  ASSERT_TRUE(encoder.ok()) << encoder.status();
  auto te_ckpt = Checkpoint::Open(dir_ + "/te.safetensors");
  ASSERT_TRUE(te_ckpt.ok());
  ASSERT_TRUE(LoadTextEncoderWeights(**encoder, **te_ckpt).ok());
  for (const auto& [name, p] : (*encoder)->named_parameters()) {
    EXPECT_EQ(p.scalar_type(), torch::kBFloat16) << name;
    EXPECT_TRUE(torch::equal(p, sd.at(name).to(torch::kBFloat16))) << name;
  }
  auto encoded = (*encoder)->Encode({"a cat"});
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_TRUE(torch::isfinite(encoded->to(torch::kFloat)).all().item<bool>());

  auto seeded_vae = VaeDecoder::Create(config.vae, 9, torch::kCPU);
  ASSERT_TRUE(seeded_vae.ok());
  std::map<std::string, torch::Tensor> vae_sd;
  for (const auto& [name, p] : (*seeded_vae)->named_parameters()) vae_sd[name] = p.detach();
  ASSERT_TRUE(WriteSafetensors(dir_ + "/vae.safetensors", vae_sd).ok());
  auto vae = VaeDecoder::CreateForLoading(config.vae, torch::kCPU);
  ASSERT_TRUE(vae.ok());
  auto vae_ckpt = Checkpoint::Open(dir_ + "/vae.safetensors");
  ASSERT_TRUE(vae_ckpt.ok());
  ASSERT_TRUE(LoadVaeWeights(**vae, **vae_ckpt).ok());
  for (const auto& [name, p] : (*vae)->named_parameters()) {
    EXPECT_EQ(p.scalar_type(), torch::kFloat) << name;
    EXPECT_TRUE(torch::equal(p, vae_sd.at(name))) << name;
  }
}

TEST_F(ModelLoaderTest, PipelineRejectsAnIncompleteModelDirectory) {
  PipelineConfig config;
  config.model = dir_ + "/absent";
  auto missing = Pipeline::Create(config);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("diffusers-layout"), std::string::npos);
  ::mkdir((dir_ + "/model").c_str(), 0755);
  ::mkdir((dir_ + "/model/transformer").c_str(), 0755);
  config.model = dir_ + "/model";
  auto empty = Pipeline::Create(config);
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("transformer/config.json"), std::string::npos)
      << empty.status();
}

}  // namespace
}  // namespace sparge::engine
