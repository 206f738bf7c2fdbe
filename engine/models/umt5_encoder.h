// umT5 text encoder (shared/design/WAN21.md section 3): tokenizer + T5 v1.1-style encoder stack
// with per-layer relative position bias, parameters named like Hugging Face's UMT5EncoderModel.
// Usage: auto enc = TextEncoder::Create(cfg, std::move(tokenizer), seed, device, dtype);
//        auto ctx = (*enc)->Encode({"a red fox in the snow"});  // [1, text_len, d_model]
// Thread-safety: not thread-safe; one thread (the pipeline's owner) uses a TextEncoder.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/models/model_config.h"
#include "engine/models/tokenizer.h"

namespace sparge::engine {

// T5 relative-position buckets for bidirectional attention: an int64 [query_len, key_len] tensor
// whose (q, k) entry buckets the offset k - q (keys after the query use the upper half of the
// buckets; offsets below num_buckets/4 get their own bucket, larger ones share log-spaced buckets
// up to max_distance). Same float32 arithmetic as Hugging Face's _relative_position_bucket.
torch::Tensor RelativePositionBuckets(int64_t query_len, int64_t key_len, int num_buckets,
                                      int max_distance);

class TextEncoder {
 public:
  // Builds the encoder with deterministic weights drawn from weight_seed (T5's initialization
  // scales), on `device` in `dtype` (float32, bfloat16 or float16; norms and softmax always run in
  // float32). INVALID_ARGUMENT if the config is unusable or the tokenizer has more pieces than
  // config.vocab_size.
  static absl::StatusOr<std::unique_ptr<TextEncoder>> Create(const UMT5Config& config,
                                                             std::unique_ptr<Tokenizer> tokenizer,
                                                             uint64_t weight_seed,
                                                             torch::Device device,
                                                             torch::ScalarType dtype);
  // The same encoder for a checkpoint load: no random init, and every parameter a placeholder
  // (see ScopedDeferredParameterInit) until LoadTextEncoderWeights places the checkpoint's
  // tensors on `device` in `dtype`. Unusable before that load.
  static absl::StatusOr<std::unique_ptr<TextEncoder>> CreateForLoading(
      const UMT5Config& config, std::unique_ptr<Tokenizer> tokenizer, torch::Device device,
      torch::ScalarType dtype);
  ~TextEncoder();
  TextEncoder(const TextEncoder&) = delete;
  TextEncoder& operator=(const TextEncoder&) = delete;

  // [B, text_len, d_model] on the device, in dtype. Rows past each prompt's EOS are exactly zero
  // (as Wan feeds its DiT). INVALID_ARGUMENT for an empty batch.
  absl::StatusOr<torch::Tensor> Encode(const std::vector<std::string>& prompts);

  // The encoder on already tokenized input: ids and mask int64 [B, L] (mask 1 = real token).
  absl::StatusOr<torch::Tensor> EncodeTokens(const torch::Tensor& ids, const torch::Tensor& mask);

  int64_t num_parameters() const;
  // Parameters under their Hugging Face UMT5EncoderModel names (shared.weight,
  // encoder.block.N.layer.0.SelfAttention.q.weight, ...), e.g. for loading a checkpoint.
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;

  const UMT5Config& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  torch::Device device() const { return device_; }
  torch::ScalarType dtype() const { return dtype_; }

 private:
  struct Model;
  // No seed: deferred init, parameters left as placeholders on the CPU.
  static absl::StatusOr<std::unique_ptr<TextEncoder>> Build(const UMT5Config& config,
                                                            std::unique_ptr<Tokenizer> tokenizer,
                                                            std::optional<uint64_t> weight_seed,
                                                            torch::Device device,
                                                            torch::ScalarType dtype);
  TextEncoder(const UMT5Config& config, std::unique_ptr<Tokenizer> tokenizer,
              std::unique_ptr<Model> model, torch::Device device, torch::ScalarType dtype);

  UMT5Config config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Model> model_;
  torch::Device device_;
  torch::ScalarType dtype_;
};

}  // namespace sparge::engine
