#include "engine/models/umt5_encoder.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <exception>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/models/model_loader.h"

namespace sparge::engine {
namespace {

namespace nn = torch::nn;

// T5's RMS norm: no mean subtraction, no bias, statistics in float32 whatever the weights' dtype.
class T5LayerNormImpl : public nn::Module {
 public:
  T5LayerNormImpl(int64_t dim, double eps) : eps_(eps) {
    weight_ = register_parameter("weight", torch::ones({dim}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor xf = x.to(torch::kFloat32);
    xf = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_);
    return weight_ * xf.to(weight_.scalar_type());
  }

 private:
  double eps_;
  torch::Tensor weight_;
};
TORCH_MODULE(T5LayerNorm);

// Self-attention without 1/sqrt(d) scaling (T5 folds it into the q initialization) and with this
// layer's own relative position bias table (umT5 does not share it across layers).
class UMT5AttentionImpl : public nn::Module {
 public:
  explicit UMT5AttentionImpl(const UMT5Config& c) : heads_(c.num_heads), d_kv_(c.d_kv) {
    const int64_t inner = int64_t{c.num_heads} * c.d_kv;
    q_ = register_module("q", nn::Linear(nn::LinearOptions(c.d_model, inner).bias(false)));
    k_ = register_module("k", nn::Linear(nn::LinearOptions(c.d_model, inner).bias(false)));
    v_ = register_module("v", nn::Linear(nn::LinearOptions(c.d_model, inner).bias(false)));
    o_ = register_module("o", nn::Linear(nn::LinearOptions(inner, c.d_model).bias(false)));
    relative_attention_bias_ = register_module(
        "relative_attention_bias",
        nn::Embedding(nn::EmbeddingOptions(c.relative_attention_num_buckets, c.num_heads)));
  }

  // x [B, L, D]; buckets int64 [L, L]; mask_bias float32 [B, 1, 1, L] (0 or lowest float).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& buckets,
                        const torch::Tensor& mask_bias) {
    const int64_t b = x.size(0);
    const int64_t l = x.size(1);
    const auto split_heads = [&](const torch::Tensor& t) {
      return t.view({b, l, heads_, d_kv_}).transpose(1, 2);
    };
    const torch::Tensor q = split_heads(q_->forward(x));
    const torch::Tensor k = split_heads(k_->forward(x));
    const torch::Tensor v = split_heads(v_->forward(x));
    // [L, L, H] -> [1, H, L, L]
    const torch::Tensor position_bias =
        relative_attention_bias_->forward(buckets).permute({2, 0, 1}).unsqueeze(0);
    torch::Tensor scores = torch::matmul(q, k.transpose(-1, -2)).to(torch::kFloat32);
    scores = scores + position_bias.to(torch::kFloat32) + mask_bias;
    const torch::Tensor attn = torch::softmax(scores, -1).to(v.scalar_type());
    const torch::Tensor out =
        torch::matmul(attn, v).transpose(1, 2).reshape({b, l, heads_ * d_kv_});
    return o_->forward(out);
  }

 private:
  int64_t heads_;
  int64_t d_kv_;
  nn::Linear q_{nullptr}, k_{nullptr}, v_{nullptr}, o_{nullptr};
  nn::Embedding relative_attention_bias_{nullptr};
};
TORCH_MODULE(UMT5Attention);

class UMT5LayerSelfAttentionImpl : public nn::Module {
 public:
  explicit UMT5LayerSelfAttentionImpl(const UMT5Config& c) {
    attention_ = register_module("SelfAttention", UMT5Attention(c));
    layer_norm_ = register_module("layer_norm", T5LayerNorm(c.d_model, c.layer_norm_eps));
  }
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& buckets,
                        const torch::Tensor& mask_bias) {
    return h + attention_->forward(layer_norm_->forward(h), buckets, mask_bias);
  }

 private:
  UMT5Attention attention_{nullptr};
  T5LayerNorm layer_norm_{nullptr};
};
TORCH_MODULE(UMT5LayerSelfAttention);

// Gated FFN: wo(gelu_tanh(wi_0 x) * wi_1 x).
class UMT5DenseGatedActDenseImpl : public nn::Module {
 public:
  explicit UMT5DenseGatedActDenseImpl(const UMT5Config& c) {
    wi_0_ = register_module("wi_0", nn::Linear(nn::LinearOptions(c.d_model, c.d_ff).bias(false)));
    wi_1_ = register_module("wi_1", nn::Linear(nn::LinearOptions(c.d_model, c.d_ff).bias(false)));
    wo_ = register_module("wo", nn::Linear(nn::LinearOptions(c.d_ff, c.d_model).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return wo_->forward(torch::gelu(wi_0_->forward(x), "tanh") * wi_1_->forward(x));
  }

 private:
  nn::Linear wi_0_{nullptr}, wi_1_{nullptr}, wo_{nullptr};
};
TORCH_MODULE(UMT5DenseGatedActDense);

class UMT5LayerFFImpl : public nn::Module {
 public:
  explicit UMT5LayerFFImpl(const UMT5Config& c) {
    ffn_ = register_module("DenseReluDense", UMT5DenseGatedActDense(c));
    layer_norm_ = register_module("layer_norm", T5LayerNorm(c.d_model, c.layer_norm_eps));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    return h + ffn_->forward(layer_norm_->forward(h));
  }

 private:
  UMT5DenseGatedActDense ffn_{nullptr};
  T5LayerNorm layer_norm_{nullptr};
};
TORCH_MODULE(UMT5LayerFF);

// One encoder block; its two sub-layers sit in a list named "layer" as in Hugging Face.
class UMT5BlockImpl : public nn::Module {
 public:
  explicit UMT5BlockImpl(const UMT5Config& c)
      : attention_(UMT5LayerSelfAttention(c)), ffn_(UMT5LayerFF(c)) {
    nn::ModuleList layer;
    layer->push_back(attention_);
    layer->push_back(ffn_);
    register_module("layer", layer);
  }
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& buckets,
                        const torch::Tensor& mask_bias) {
    return ffn_->forward(attention_->forward(h, buckets, mask_bias));
  }

 private:
  UMT5LayerSelfAttention attention_;
  UMT5LayerFF ffn_;
};
TORCH_MODULE(UMT5Block);

class UMT5StackImpl : public nn::Module {
 public:
  explicit UMT5StackImpl(const UMT5Config& c) {
    nn::ModuleList block;
    for (int i = 0; i < c.num_layers; ++i) {
      blocks_.push_back(UMT5Block(c));
      // Deferred init (checkpoint load): free this block's default init before the next.
      ReleaseParametersForLoading(*blocks_.back());
      block->push_back(blocks_.back());
    }
    register_module("block", block);
    final_layer_norm_ =
        register_module("final_layer_norm", T5LayerNorm(c.d_model, c.layer_norm_eps));
  }
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& buckets,
                        const torch::Tensor& mask_bias) {
    for (UMT5Block& block : blocks_) h = block->forward(h, buckets, mask_bias);
    return final_layer_norm_->forward(h);
  }

 private:
  std::vector<UMT5Block> blocks_;
  T5LayerNorm final_layer_norm_{nullptr};
};
TORCH_MODULE(UMT5Stack);

class UMT5EncoderModelImpl : public nn::Module {
 public:
  explicit UMT5EncoderModelImpl(const UMT5Config& c) : config_(c) {
    nn::EmbeddingOptions embedding(c.vocab_size, c.d_model);
    if (DeferredParameterInitActive()) {
      // umT5-XXL's table is 256k x 4096: never allocate (or randomly fill) it only to drop it.
      embedding._weight(torch::empty({1}).expand({c.vocab_size, c.d_model}));
    }
    shared_ = register_module("shared", nn::Embedding(embedding));
    encoder_ = register_module("encoder", UMT5Stack(c));
    ReleaseParametersForLoading(*this);
  }
  // ids, mask int64 [B, L] on the model's device.
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& mask) {
    const int64_t l = ids.size(1);
    const torch::Tensor buckets =
        RelativePositionBuckets(l, l, config_.relative_attention_num_buckets,
                                config_.relative_attention_max_distance)
            .to(ids.device());
    // Masked keys get the lowest finite float, as Hugging Face does; every row keeps its EOS key,
    // so no softmax row is fully masked.
    const torch::Tensor mask_bias = (1 - mask.to(torch::kFloat32))
                                        .mul(std::numeric_limits<float>::lowest())
                                        .view({mask.size(0), 1, 1, l});
    const torch::Tensor h = encoder_->forward(shared_->forward(ids), buckets, mask_bias);
    // Wan keeps only each prompt's real rows and zero-pads the rest before the DiT sees them.
    return h * mask.unsqueeze(-1).to(h.scalar_type());
  }

 private:
  UMT5Config config_;
  nn::Embedding shared_{nullptr};
  UMT5Stack encoder_{nullptr};
};
TORCH_MODULE(UMT5EncoderModel);

// T5's initialization (Hugging Face T5PreTrainedModel._init_weights, factor 1): it keeps
// activations O(1) through the unscaled attention, so random-weight outputs are non-degenerate.
double InitStd(const std::string& name, const UMT5Config& c) {
  if (absl::StartsWith(name, "shared.")) return 1.0;
  if (absl::StrContains(name, "SelfAttention.q.")) {
    return 1.0 / std::sqrt(static_cast<double>(c.d_model) * c.d_kv);
  }
  if (absl::StrContains(name, "SelfAttention.o.")) {
    return 1.0 / std::sqrt(static_cast<double>(c.num_heads) * c.d_kv);
  }
  if (absl::StrContains(name, "DenseReluDense.wo."))
    return 1.0 / std::sqrt(static_cast<double>(c.d_ff));
  return 1.0 /
         std::sqrt(static_cast<double>(c.d_model));  // k, v, wi_0, wi_1, relative_attention_bias
}

absl::Status CheckConfig(const UMT5Config& c) {
  if (c.vocab_size <= 1) return absl::InvalidArgumentError("text_encoder.vocab_size must be > 1");
  if (c.d_model <= 0 || c.d_kv <= 0 || c.num_heads <= 0 || c.d_ff <= 0 || c.num_layers <= 0) {
    return absl::InvalidArgumentError(
        "text_encoder d_model, d_kv, num_heads, d_ff and num_layers must be positive");
  }
  // Bidirectional buckets: half per direction, a quarter exact; the log-spaced part needs room.
  if (c.relative_attention_num_buckets < 4 || c.relative_attention_num_buckets % 2 != 0) {
    return absl::InvalidArgumentError(
        "text_encoder.relative_attention_num_buckets must be even and >= 4");
  }
  if (c.relative_attention_max_distance <= c.relative_attention_num_buckets / 4) {
    return absl::InvalidArgumentError(
        "text_encoder.relative_attention_max_distance must exceed num_buckets / 4");
  }
  if (!(c.layer_norm_eps > 0.0f)) {
    return absl::InvalidArgumentError("text_encoder.layer_norm_eps must be positive");
  }
  if (c.text_len <= 0) return absl::InvalidArgumentError("text_encoder.text_len must be positive");
  return absl::OkStatus();
}

}  // namespace

struct TextEncoder::Model {
  UMT5EncoderModel module{nullptr};
};

torch::Tensor RelativePositionBuckets(int64_t query_len, int64_t key_len, int num_buckets,
                                      int max_distance) {
  const torch::Tensor context = torch::arange(query_len, torch::kInt64).unsqueeze(1);
  const torch::Tensor memory = torch::arange(key_len, torch::kInt64).unsqueeze(0);
  const torch::Tensor relative = memory - context;
  const int64_t half = num_buckets / 2;
  const int64_t max_exact = half / 2;
  const torch::Tensor distance = relative.abs();
  // clamp_min keeps log() finite at distance 0; those entries take the exact branch anyway.
  torch::Tensor large =
      max_exact + (torch::log(distance.clamp_min(1).to(torch::kFloat32) / max_exact) /
                   std::log(static_cast<double>(max_distance) / max_exact) * (half - max_exact))
                      .to(torch::kInt64);
  large = large.clamp_max(half - 1);
  return (relative > 0).to(torch::kInt64) * half +
         torch::where(distance < max_exact, distance, large);
}

TextEncoder::TextEncoder(const UMT5Config& config, std::unique_ptr<Tokenizer> tokenizer,
                         std::unique_ptr<Model> model, torch::Device device,
                         torch::ScalarType dtype)
    : config_(config),
      tokenizer_(std::move(tokenizer)),
      model_(std::move(model)),
      device_(device),
      dtype_(dtype) {}

TextEncoder::~TextEncoder() = default;

absl::StatusOr<std::unique_ptr<TextEncoder>> TextEncoder::Create(
    const UMT5Config& config, std::unique_ptr<Tokenizer> tokenizer, uint64_t weight_seed,
    torch::Device device, torch::ScalarType dtype) {
  return Build(config, std::move(tokenizer), weight_seed, device, dtype);
}

absl::StatusOr<std::unique_ptr<TextEncoder>> TextEncoder::CreateForLoading(
    const UMT5Config& config, std::unique_ptr<Tokenizer> tokenizer, torch::Device device,
    torch::ScalarType dtype) {
  return Build(config, std::move(tokenizer), std::nullopt, device, dtype);
}

absl::StatusOr<std::unique_ptr<TextEncoder>> TextEncoder::Build(
    const UMT5Config& config, std::unique_ptr<Tokenizer> tokenizer,
    std::optional<uint64_t> weight_seed, torch::Device device, torch::ScalarType dtype) {
  if (absl::Status s = CheckConfig(config); !s.ok()) return s;
  if (tokenizer == nullptr) return absl::InvalidArgumentError("text encoder needs a tokenizer");
  if (tokenizer->vocab_size() > config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer has ", tokenizer->vocab_size(),
                                                   " pieces but text_encoder.vocab_size is ",
                                                   config.vocab_size));
  }
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "text encoder dtype must be float32, bfloat16 or float16, got ", c10::toString(dtype)));
  }
  try {
    torch::NoGradGuard no_grad;
    auto model = std::make_unique<Model>();
    if (!weight_seed.has_value()) {
      ScopedDeferredParameterInit deferred;
      model->module = UMT5EncoderModel(config);
      model->module->eval();
      return std::unique_ptr<TextEncoder>(
          new TextEncoder(config, std::move(tokenizer), std::move(model), device, dtype));
    }
    model->module = UMT5EncoderModel(config);
    model->module->eval();
    // Weights are drawn on the CPU in float32 in registration order, so the same seed gives the
    // same model on every device and dtype.
    torch::Generator generator = at::make_generator<at::CPUGeneratorImpl>(*weight_seed);
    for (auto& item : model->module->named_parameters()) {
      torch::Tensor& p = item.value();
      if (absl::StrContains(item.key(), "layer_norm")) {
        p.fill_(1.0);
      } else {
        p.copy_(torch::randn(p.sizes(), generator, torch::kFloat32) * InitStd(item.key(), config));
      }
    }
    model->module->to(device, dtype);
    return std::unique_ptr<TextEncoder>(
        new TextEncoder(config, std::move(tokenizer), std::move(model), device, dtype));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the text encoder failed: ", e.what()));
  }
}

absl::StatusOr<torch::Tensor> TextEncoder::Encode(const std::vector<std::string>& prompts) {
  if (prompts.empty()) return absl::InvalidArgumentError("Encode needs at least one prompt");
  const int64_t b = static_cast<int64_t>(prompts.size());
  const int64_t l = config_.text_len;
  torch::Tensor ids = torch::empty({b, l}, torch::kInt64);
  torch::Tensor mask = torch::empty({b, l}, torch::kInt64);
  auto ids_acc = ids.accessor<int64_t, 2>();
  auto mask_acc = mask.accessor<int64_t, 2>();
  for (int64_t i = 0; i < b; ++i) {
    const Tokenizer::Encoded enc = tokenizer_->Encode(prompts[i], config_.text_len);
    for (int64_t j = 0; j < l; ++j) {
      ids_acc[i][j] = enc.ids[j];
      mask_acc[i][j] = enc.mask[j];
    }
  }
  return EncodeTokens(ids, mask);
}

absl::StatusOr<torch::Tensor> TextEncoder::EncodeTokens(const torch::Tensor& ids,
                                                        const torch::Tensor& mask) {
  if (ids.dim() != 2 || !mask.sizes().equals(ids.sizes()) || ids.size(0) == 0 || ids.size(1) == 0) {
    return absl::InvalidArgumentError("ids and mask must be non-empty [B, L] tensors of one shape");
  }
  try {
    torch::NoGradGuard no_grad;
    const torch::Tensor ids_dev = ids.to(device_, torch::kInt64);
    if (ids_dev.min().item<int64_t>() < 0 || ids_dev.max().item<int64_t>() >= config_.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ids must lie in [0, ", config_.vocab_size, ")"));
    }
    return model_->module->forward(ids_dev, mask.to(device_, torch::kInt64));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("text encoder failed: ", e.what()));
  }
}

int64_t TextEncoder::num_parameters() const {
  int64_t n = 0;
  for (const torch::Tensor& p : model_->module->parameters()) n += p.numel();
  return n;
}

std::vector<std::pair<std::string, torch::Tensor>> TextEncoder::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : model_->module->named_parameters()) {
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

}  // namespace sparge::engine
