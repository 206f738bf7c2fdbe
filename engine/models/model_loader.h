// Loads Wan2.1 text-to-video weights from disk: a diffusers-layout model directory (transformer/,
// text_encoder/, tokenizer/, vae/, scheduler/), with config.json files parsed into our config
// structs, and the original Wan layout for the DiT (key map of shared/design/WAN21.md 1.5).
// Loading is strict: a missing, unexpected or mis-shaped tensor is INVALID_ARGUMENT naming the
// tensor and both shapes. Usage: auto m = LoadModelDirectory(dir, device, dtype, 64, 64);
// Thread-safety: free functions without shared state; the modules they fill belong to the caller.
#pragma once

#include <torch/types.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/models/model_config.h"
#include "engine/models/umt5_encoder.h"
#include "engine/models/deferred_init.h"
#include "engine/models/wan_dit.h"
#include "engine/models/wan_vae_decoder.h"
#include "engine/pipeline.h"
#include "engine/weights/safetensors.h"

namespace sparge::engine {


// Where LoadParameters puts a parameter: device and dtype, from its name and current tensor.
using ParameterPlacement =
    std::function<torch::TensorOptions(const std::string& name, const torch::Tensor& param)>;

// What scheduler/scheduler_config.json asks for (the pipeline's per-request sampler and shift
// come from the request; these are the checkpoint's recommendation).
struct SchedulerConfig {
  SamplerKind kind = SamplerKind::kUniPC;
  float shift = 3.0f;  // flow_shift (UniPC) or shift (FlowMatchEuler)
};

// Parsers of the components' config.json files. INVALID_ARGUMENT naming the file and field for a
// value the engine does not implement (e.g. an image-to-video DiT, a non-gated umT5 FFN).
// The DiT parser accepts diffusers' WanTransformer3DModel config and the original WanModel one.
absl::StatusOr<WanDiTConfig> ReadDiTConfig(const std::string& config_json);
// text_len is not part of the umT5 config: the caller sets it (ReadModelDirectoryConfig uses
// tokenizer/tokenizer_config.json's model_max_length, default 512 like diffusers' WanPipeline).
absl::StatusOr<UMT5Config> ReadUMT5Config(const std::string& config_json);
absl::StatusOr<WanVaeConfig> ReadVaeConfig(const std::string& config_json);
absl::StatusOr<SchedulerConfig> ReadSchedulerConfig(const std::string& config_json);

struct ModelDirectoryConfig {
  WanModelConfig model;
  SchedulerConfig scheduler;
};
absl::StatusOr<ModelDirectoryConfig> ReadModelDirectoryConfig(const std::string& dir);

// Original Wan key -> diffusers key (e.g. blocks.3.self_attn.o.weight -> blocks.3.attn1.to_out.0
// .weight; blocks.i.norm3 -> blocks.i.norm2). Keys it does not know come back unchanged.
std::string WanOriginalToDiffusersKey(const std::string& key);

// Fills `params` (name -> tensor) from checkpoint tensors after mapping each checkpoint key
// through `rename` (empty result: the key is ignored). Every parameter must be present exactly
// once with its shape; every key must map to a parameter. `component` prefixes error messages
// ("transformer", ...). Each parameter's storage is replaced (set_data) by one fresh copy of the
// checkpoint tensor made straight from the read-only mapping on the device and in the dtype
// `placement` names (default: the parameter's own), so placeholders work and nothing else is
// allocated along the way.
absl::Status LoadParameters(const std::vector<std::pair<std::string, torch::Tensor>>& params,
                            const Checkpoint& checkpoint,
                            const std::function<std::string(const std::string&)>& rename,
                            const std::string& component,
                            const ParameterPlacement& placement = nullptr);

// Per component, from a checkpoint (file, index JSON or directory; see Checkpoint::Open).
// The DiT accepts the diffusers layout and the original Wan layout (with or without a
// "model.diffusion_model." prefix), detected from the keys.
absl::Status LoadDiTWeights(WanDiTImpl& dit, const Checkpoint& checkpoint,
                            const ParameterPlacement& placement = nullptr);
absl::Status LoadTextEncoderWeights(TextEncoder& encoder, const Checkpoint& checkpoint);
// Encoder-side keys of a full AutoencoderKLWan (encoder.*, quant_conv.*) are skipped.
absl::Status LoadVaeWeights(VaeDecoder& vae, const Checkpoint& checkpoint);

// A DiT built from a transformer directory (config.json + weights, either layout), ready for
// inference on device in dtype (the modules diffusers keeps in fp32 in fp32). Built with
// deferred init: no random weights are drawn and each tensor goes mapping -> device once.
absl::StatusOr<WanDiT> LoadDiT(const std::string& transformer_dir, torch::Device device,
                               torch::ScalarType dtype, int64_t block_q, int64_t block_k);

struct LoadedWanModel {
  ModelDirectoryConfig config;
  std::unique_ptr<TextEncoder> text_encoder;
  WanDiT dit{nullptr};
  std::unique_ptr<VaeDecoder> vae;
};
// The whole model directory: tokenizer/spiece.model, text encoder and DiT in dtype, VAE in
// float32 (as Wan runs it), all on device. Every component is built with deferred init.
absl::StatusOr<LoadedWanModel> LoadModelDirectory(const std::string& dir, torch::Device device,
                                                  torch::ScalarType dtype, int64_t block_q,
                                                  int64_t block_k);

}  // namespace sparge::engine
