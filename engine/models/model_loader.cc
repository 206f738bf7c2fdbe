#include "engine/models/model_loader.h"

#include <c10/util/Exception.h>
#include <sys/stat.h>
#include <torch/torch.h>

#include <algorithm>
#include <exception>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/base/status_macros.h"
#include "engine/models/tokenizer.h"
#include "engine/sampling/flow_samplers.h"

namespace sparge::engine {
namespace {

using Json = nlohmann::json;

absl::StatusOr<Json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  try {
    Json json = Json::parse(in);
    if (!json.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
    }
    return json;
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
}

// Typed field access with the file and field named in every error; absent or null -> fallback.
class ConfigReader {
 public:
  ConfigReader(const Json& json, std::string path) : json_(json), path_(std::move(path)) {}

  bool Has(const char* key) const { return json_.contains(key) && !json_[key].is_null(); }

  absl::StatusOr<int> Int(const char* key, int fallback) const {
    if (!Has(key)) return fallback;
    const Json& v = json_[key];
    if (!v.is_number_integer()) return Bad(key, "an integer");
    return v.get<int>();
  }
  absl::StatusOr<float> Float(const char* key, float fallback) const {
    if (!Has(key)) return fallback;
    const Json& v = json_[key];
    if (!v.is_number()) return Bad(key, "a number");
    return v.get<float>();
  }
  absl::StatusOr<bool> Bool(const char* key, bool fallback) const {
    if (!Has(key)) return fallback;
    if (!json_[key].is_boolean()) return Bad(key, "true or false");
    return json_[key].get<bool>();
  }
  absl::StatusOr<std::string> String(const char* key, const std::string& fallback) const {
    if (!Has(key)) return fallback;
    if (!json_[key].is_string()) return Bad(key, "a string");
    return json_[key].get<std::string>();
  }
  template <typename T>
  absl::StatusOr<std::vector<T>> List(const char* key, std::vector<T> fallback) const {
    if (!Has(key)) return fallback;
    const Json& v = json_[key];
    if (!v.is_array()) return Bad(key, "a list");
    std::vector<T> out;
    for (const Json& e : v) {
      if constexpr (std::is_same_v<T, bool>) {
        if (!e.is_boolean()) return Bad(key, "a list of true/false");
      } else {
        if (!e.is_number()) return Bad(key, "a list of numbers");
      }
      out.push_back(e.get<T>());
    }
    return out;
  }
  // An error for a value the engine does not implement.
  absl::Status Unsupported(const char* key, const std::string& why) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": \"", key, "\" = ",
                                                   Has(key) ? json_[key].dump() : "(absent)",
                                                   " is not supported: ", why));
  }

 private:
  absl::Status Bad(const char* key, const char* what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": \"", key, "\" must be ", what, ", got ", json_[key].dump()));
  }
  const Json& json_;
  std::string path_;
};

std::string Join(const std::string& a, const char* b) { return absl::StrCat(a, "/", b); }

// POSIX instead of std::filesystem: libtorch.so exports std::filesystem symbols of its own that
// crash when a binary's calls bind to them.
bool Exists(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0;
}
bool IsDirectory(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

absl::StatusOr<WanDiTConfig> ReadDiTConfig(const std::string& path) {
  SPARGE_ASSIGN_OR_RETURN(Json json, ReadJson(path));
  ConfigReader r(json, path);
  WanDiTConfig c;
  SPARGE_ASSIGN_OR_RETURN(std::string class_name, r.String("_class_name", ""));
  const bool original = class_name == "WanModel" || (!r.Has("num_attention_heads") && r.Has("dim"));
  if (original) {
    // Wan-Video/Wan2.1 WanModel: qk_norm, cross_attn_norm, patch_size, text_dim and window_size
    // are ignored by its config loader, so the constructor defaults always apply.
    SPARGE_ASSIGN_OR_RETURN(std::string model_type, r.String("model_type", "t2v"));
    if (model_type != "t2v") return r.Unsupported("model_type", "only text-to-video (t2v)");
    SPARGE_ASSIGN_OR_RETURN(c.dim, r.Int("dim", 2048));
    SPARGE_ASSIGN_OR_RETURN(c.ffn_dim, r.Int("ffn_dim", 8192));
    SPARGE_ASSIGN_OR_RETURN(c.freq_dim, r.Int("freq_dim", 256));
    SPARGE_ASSIGN_OR_RETURN(c.in_channels, r.Int("in_dim", 16));
    SPARGE_ASSIGN_OR_RETURN(c.out_channels, r.Int("out_dim", 16));
    SPARGE_ASSIGN_OR_RETURN(c.num_heads, r.Int("num_heads", 16));
    SPARGE_ASSIGN_OR_RETURN(c.num_layers, r.Int("num_layers", 32));
    SPARGE_ASSIGN_OR_RETURN(c.eps, r.Float("eps", 1e-6f));
    // Wan never writes text_dim (always 4096); honouring the key lets tiny test models use it.
    SPARGE_ASSIGN_OR_RETURN(c.text_dim, r.Int("text_dim", 4096));
    c.patch_size = {1, 2, 2};
    c.rope_max_seq_len = 1024;
  } else {
    SPARGE_ASSIGN_OR_RETURN(int heads, r.Int("num_attention_heads", 40));
    SPARGE_ASSIGN_OR_RETURN(int head_dim, r.Int("attention_head_dim", 128));
    c.num_heads = heads;
    c.dim = heads * head_dim;
    SPARGE_ASSIGN_OR_RETURN(std::vector<int> patch, r.List<int>("patch_size", {1, 2, 2}));
    if (patch.size() != 3) return r.Unsupported("patch_size", "needs 3 entries (t, h, w)");
    c.patch_size = {patch[0], patch[1], patch[2]};
    SPARGE_ASSIGN_OR_RETURN(c.in_channels, r.Int("in_channels", 16));
    SPARGE_ASSIGN_OR_RETURN(c.out_channels, r.Int("out_channels", 16));
    SPARGE_ASSIGN_OR_RETURN(c.text_dim, r.Int("text_dim", 4096));
    SPARGE_ASSIGN_OR_RETURN(c.freq_dim, r.Int("freq_dim", 256));
    SPARGE_ASSIGN_OR_RETURN(c.ffn_dim, r.Int("ffn_dim", 13824));
    SPARGE_ASSIGN_OR_RETURN(c.num_layers, r.Int("num_layers", 40));
    SPARGE_ASSIGN_OR_RETURN(c.eps, r.Float("eps", 1e-6f));
    SPARGE_ASSIGN_OR_RETURN(c.rope_max_seq_len, r.Int("rope_max_seq_len", 1024));
    SPARGE_ASSIGN_OR_RETURN(bool cross_norm, r.Bool("cross_attn_norm", true));
    if (!cross_norm) return r.Unsupported("cross_attn_norm", "Wan2.1 T2V uses true");
    SPARGE_ASSIGN_OR_RETURN(std::string qk_norm, r.String("qk_norm", "rms_norm_across_heads"));
    if (qk_norm != "rms_norm_across_heads") {
      return r.Unsupported("qk_norm", "only \"rms_norm_across_heads\" is implemented");
    }
    for (const char* key : {"image_dim", "added_kv_proj_dim", "pos_embed_seq_len"}) {
      if (r.Has(key)) return r.Unsupported(key, "image-to-video inputs are not implemented");
    }
  }
  if (absl::Status s = c.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.message()));
  }
  return c;
}

absl::StatusOr<UMT5Config> ReadUMT5Config(const std::string& path) {
  SPARGE_ASSIGN_OR_RETURN(Json json, ReadJson(path));
  ConfigReader r(json, path);
  UMT5Config c;
  SPARGE_ASSIGN_OR_RETURN(std::string model_type, r.String("model_type", "umt5"));
  if (model_type != "umt5") {
    return r.Unsupported("model_type", "the engine implements umT5 (per-layer position bias)");
  }
  SPARGE_ASSIGN_OR_RETURN(std::string ffn, r.String("feed_forward_proj", "gated-gelu"));
  if (ffn != "gated-gelu") return r.Unsupported("feed_forward_proj", "only \"gated-gelu\"");
  SPARGE_ASSIGN_OR_RETURN(c.vocab_size, r.Int("vocab_size", 250112));
  SPARGE_ASSIGN_OR_RETURN(c.d_model, r.Int("d_model", 512));
  SPARGE_ASSIGN_OR_RETURN(c.d_kv, r.Int("d_kv", 64));
  SPARGE_ASSIGN_OR_RETURN(c.num_heads, r.Int("num_heads", 6));
  SPARGE_ASSIGN_OR_RETURN(c.d_ff, r.Int("d_ff", 1024));
  SPARGE_ASSIGN_OR_RETURN(c.num_layers, r.Int("num_layers", 8));
  SPARGE_ASSIGN_OR_RETURN(c.relative_attention_num_buckets,
                          r.Int("relative_attention_num_buckets", 32));
  SPARGE_ASSIGN_OR_RETURN(c.relative_attention_max_distance,
                          r.Int("relative_attention_max_distance", 128));
  SPARGE_ASSIGN_OR_RETURN(c.layer_norm_eps, r.Float("layer_norm_epsilon", 1e-6f));
  c.text_len = 512;
  if (absl::Status s = c.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.message()));
  }
  return c;
}

absl::StatusOr<WanVaeConfig> ReadVaeConfig(const std::string& path) {
  SPARGE_ASSIGN_OR_RETURN(Json json, ReadJson(path));
  ConfigReader r(json, path);
  WanVaeConfig c;
  SPARGE_ASSIGN_OR_RETURN(c.base_dim, r.Int("base_dim", 96));
  SPARGE_ASSIGN_OR_RETURN(c.z_dim, r.Int("z_dim", 16));
  SPARGE_ASSIGN_OR_RETURN(c.dim_mult, r.List<int>("dim_mult", {1, 2, 4, 4}));
  SPARGE_ASSIGN_OR_RETURN(c.num_res_blocks, r.Int("num_res_blocks", 2));
  SPARGE_ASSIGN_OR_RETURN(c.temporal_downsample,
                          r.List<bool>("temperal_downsample", {false, true, true}));
  SPARGE_ASSIGN_OR_RETURN(c.latents_mean, r.List<float>("latents_mean", WanLatentsMean()));
  SPARGE_ASSIGN_OR_RETURN(c.latents_std, r.List<float>("latents_std", WanLatentsStd()));
  SPARGE_ASSIGN_OR_RETURN(std::vector<float> attn_scales, r.List<float>("attn_scales", {}));
  if (!attn_scales.empty()) return r.Unsupported("attn_scales", "Wan2.1's VAE uses []");
  SPARGE_ASSIGN_OR_RETURN(bool residual, r.Bool("is_residual", false));
  if (residual) return r.Unsupported("is_residual", "that is the Wan2.2 VAE");
  if (r.Has("patch_size")) return r.Unsupported("patch_size", "that is the Wan2.2 VAE");
  SPARGE_ASSIGN_OR_RETURN(int decoder_base_dim, r.Int("decoder_base_dim", c.base_dim));
  if (decoder_base_dim != c.base_dim) {
    return r.Unsupported("decoder_base_dim", "must equal base_dim");
  }
  SPARGE_ASSIGN_OR_RETURN(int out_channels, r.Int("out_channels", 3));
  if (out_channels != 3) return r.Unsupported("out_channels", "RGB output (3)");
  if (absl::Status s = c.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.message()));
  }
  return c;
}

absl::StatusOr<SchedulerConfig> ReadSchedulerConfig(const std::string& path) {
  SPARGE_ASSIGN_OR_RETURN(Json json, ReadJson(path));
  ConfigReader r(json, path);
  SchedulerConfig c;
  SPARGE_ASSIGN_OR_RETURN(int train_steps, r.Int("num_train_timesteps", 1000));
  if (train_steps != kNumTrainTimesteps) {
    return r.Unsupported("num_train_timesteps", "the samplers assume 1000");
  }
  SPARGE_ASSIGN_OR_RETURN(std::string class_name, r.String("_class_name", ""));
  if (class_name == "UniPCMultistepScheduler") {
    c.kind = SamplerKind::kUniPC;
    SPARGE_ASSIGN_OR_RETURN(std::string prediction, r.String("prediction_type", "epsilon"));
    if (prediction != "flow_prediction") return r.Unsupported("prediction_type", "flow_prediction");
    SPARGE_ASSIGN_OR_RETURN(bool flow_sigmas, r.Bool("use_flow_sigmas", false));
    if (!flow_sigmas) return r.Unsupported("use_flow_sigmas", "must be true");
    SPARGE_ASSIGN_OR_RETURN(int order, r.Int("solver_order", 2));
    if (order != 2) return r.Unsupported("solver_order", "the UniPC sampler is order 2");
    SPARGE_ASSIGN_OR_RETURN(std::string type, r.String("solver_type", "bh2"));
    if (type != "bh2") return r.Unsupported("solver_type", "only bh2");
    SPARGE_ASSIGN_OR_RETURN(c.shift, r.Float("flow_shift", 1.0f));
  } else if (class_name == "FlowMatchEulerDiscreteScheduler") {
    c.kind = SamplerKind::kEuler;
    SPARGE_ASSIGN_OR_RETURN(c.shift, r.Float("shift", 1.0f));
  } else {
    return r.Unsupported("_class_name",
                         "UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler expected");
  }
  if (!(c.shift > 0.0f)) return r.Unsupported("flow_shift", "the shift must be > 0");
  return c;
}

absl::StatusOr<ModelDirectoryConfig> ReadModelDirectoryConfig(const std::string& dir) {
  if (!IsDirectory(dir)) {
    return absl::NotFoundError(absl::StrCat("model directory \"", dir, "\" does not exist"));
  }
  const std::string& root = dir;
  ModelDirectoryConfig out;
  SPARGE_ASSIGN_OR_RETURN(out.model.dit, ReadDiTConfig(Join(root, "transformer/config.json")));
  SPARGE_ASSIGN_OR_RETURN(out.model.text_encoder,
                          ReadUMT5Config(Join(root, "text_encoder/config.json")));
  SPARGE_ASSIGN_OR_RETURN(out.model.vae, ReadVaeConfig(Join(root, "vae/config.json")));
  SPARGE_ASSIGN_OR_RETURN(out.scheduler,
                          ReadSchedulerConfig(Join(root, "scheduler/scheduler_config.json")));
  // diffusers' WanPipeline pads prompts to max_sequence_length = 512; a tokenizer config may say
  // otherwise (Hugging Face writes a huge sentinel when it has no limit: keep 512 then).
  const std::string tok_config = Join(root, "tokenizer/tokenizer_config.json");
  if (Exists(tok_config)) {
    SPARGE_ASSIGN_OR_RETURN(Json json, ReadJson(tok_config));
    if (json.contains("model_max_length") && json["model_max_length"].is_number_integer()) {
      const int64_t n = json["model_max_length"].get<int64_t>();
      if (n > 0 && n <= 4096) out.model.text_encoder.text_len = static_cast<int>(n);
    }
  }
  const WanModelConfig& m = out.model;
  if (m.dit.text_dim != m.text_encoder.d_model) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": transformer text_dim ", m.dit.text_dim, " != text_encoder d_model ",
        m.text_encoder.d_model));
  }
  // The pipeline sizes latents with Wan's 8x spatial / 4x temporal VAE strides.
  const int temporal_steps = static_cast<int>(
      std::count(m.vae.temporal_downsample.begin(), m.vae.temporal_downsample.end(), true));
  if (m.vae.dim_mult.size() != 4 || temporal_steps != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, "/vae/config.json: the pipeline needs Wan's 8x spatial and 4x temporal compression "
        "(4 dim_mult entries, 2 temporal downsamples), got ", m.vae.dim_mult.size(),
        " entries and ", temporal_steps, " temporal downsamples"));
  }
  if (m.dit.in_channels != m.vae.z_dim || m.dit.out_channels != m.vae.z_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": transformer in/out channels ", m.dit.in_channels, "/",
                     m.dit.out_channels, " != vae z_dim ", m.vae.z_dim));
  }
  return out;
}

std::string WanOriginalToDiffusersKey(const std::string& key) {
  static const std::vector<std::pair<std::string, std::string>>* const kTop =
      new std::vector<std::pair<std::string, std::string>>{
          {"text_embedding.0.", "condition_embedder.text_embedder.linear_1."},
          {"text_embedding.2.", "condition_embedder.text_embedder.linear_2."},
          {"time_embedding.0.", "condition_embedder.time_embedder.linear_1."},
          {"time_embedding.2.", "condition_embedder.time_embedder.linear_2."},
          {"time_projection.1.", "condition_embedder.time_proj."},
          {"head.head.", "proj_out."},
      };
  // Inside blocks.N.; the norm3 -> norm2 rename is the trap (WAN21.md 1.5).
  static const std::vector<std::pair<std::string, std::string>>* const kBlock =
      new std::vector<std::pair<std::string, std::string>>{
          {"self_attn.q.", "attn1.to_q."},   {"self_attn.k.", "attn1.to_k."},
          {"self_attn.v.", "attn1.to_v."},   {"self_attn.o.", "attn1.to_out.0."},
          {"self_attn.norm_q.", "attn1.norm_q."}, {"self_attn.norm_k.", "attn1.norm_k."},
          {"cross_attn.q.", "attn2.to_q."},  {"cross_attn.k.", "attn2.to_k."},
          {"cross_attn.v.", "attn2.to_v."},  {"cross_attn.o.", "attn2.to_out.0."},
          {"cross_attn.norm_q.", "attn2.norm_q."}, {"cross_attn.norm_k.", "attn2.norm_k."},
          {"norm3.", "norm2."},              {"ffn.0.", "ffn.net.0.proj."},
          {"ffn.2.", "ffn.net.2."},
      };
  if (key == "head.modulation") return "scale_shift_table";
  for (const auto& [from, to] : *kTop) {
    if (absl::StartsWith(key, from)) return to + key.substr(from.size());
  }
  if (absl::StartsWith(key, "blocks.")) {
    const size_t dot = key.find('.', 7);
    int index = 0;
    if (dot != std::string::npos && absl::SimpleAtoi(key.substr(7, dot - 7), &index)) {
      const std::string prefix = key.substr(0, dot + 1);
      const std::string rest = key.substr(dot + 1);
      if (rest == "modulation") return prefix + "scale_shift_table";
      for (const auto& [from, to] : *kBlock) {
        if (absl::StartsWith(rest, from)) return prefix + to + rest.substr(from.size());
      }
    }
  }
  return key;
}

absl::Status LoadParameters(const std::vector<std::pair<std::string, torch::Tensor>>& params,
                            const Checkpoint& checkpoint,
                            const std::function<std::string(const std::string&)>& rename,
                            const std::string& component,
                            const ParameterPlacement& placement) {
  std::map<std::string, torch::Tensor> wanted(params.begin(), params.end());
  std::map<std::string, std::string> source_of;  // parameter -> checkpoint key
  std::vector<std::string> problems;
  for (const std::string& key : checkpoint.names()) {
    const std::string name = rename(key);
    if (name.empty()) continue;
    SPARGE_ASSIGN_OR_RETURN(TensorInfo info, checkpoint.Info(key));
    const std::string as = name == key ? "" : absl::StrCat(" (as \"", name, "\")");
    auto it = wanted.find(name);
    if (it == wanted.end()) {
      problems.push_back(absl::StrCat("unexpected tensor \"", key, "\"", as, " with shape ",
                                      ShapeString(info.shape), " (the model has no such parameter)"));
      continue;
    }
    if (auto dup = source_of.find(name); dup != source_of.end()) {
      problems.push_back(
          absl::StrCat("tensor \"", key, "\" and \"", dup->second, "\" both map to \"", name, "\""));
      continue;
    }
    source_of[name] = key;
    const std::vector<int64_t> expected = it->second.sizes().vec();
    if (info.shape != expected) {
      problems.push_back(absl::StrCat("tensor \"", key, "\"", as, " has shape ",
                                      ShapeString(info.shape), " in the checkpoint, the model expects ",
                                      ShapeString(expected)));
    }
    if (info.dtype != torch::kFloat && info.dtype != torch::kBFloat16 &&
        info.dtype != torch::kHalf && info.dtype != torch::kDouble) {
      problems.push_back(absl::StrCat("tensor \"", key, "\" has non-floating dtype ", info.dtype_name));
    }
  }
  for (const auto& [name, tensor] : wanted) {
    if (!source_of.count(name)) {
      problems.push_back(absl::StrCat("missing tensor \"", name, "\" (the model expects shape ",
                                      ShapeString(tensor.sizes().vec()), ")"));
    }
  }
  if (!problems.empty()) {
    constexpr size_t kShown = 8;
    std::vector<std::string> shown(problems.begin(),
                                   problems.begin() + std::min(kShown, problems.size()));
    std::string more = problems.size() > kShown
                           ? absl::StrCat("; and ", problems.size() - kShown, " more")
                           : "";
    return absl::InvalidArgumentError(absl::StrCat(component, ": ", problems.size(),
                                                   " problem(s) loading ", checkpoint.source(), ": ",
                                                   absl::StrJoin(shown, "; "), more));
  }
  try {
    torch::NoGradGuard no_grad;
    for (const auto& [name, key] : source_of) {
      SPARGE_ASSIGN_OR_RETURN(torch::Tensor value, checkpoint.Get(key));
      torch::Tensor& param = wanted.at(name);
      const torch::TensorOptions target =
          placement ? placement(name, param)
                    : torch::TensorOptions().device(param.device()).dtype(param.scalar_type());
      // One copy, mapping -> target device and dtype (copy=true: never alias the read-only
      // mapping); the parameter's previous storage (a placeholder or old weights) is released.
      param.set_data(value.to(target, /*non_blocking=*/false, /*copy=*/true)
                         .contiguous());
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(component, ": copying weights failed: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(component, ": copying weights failed: ", e.what()));
  }
  return absl::OkStatus();
}

absl::Status LoadDiTWeights(WanDiTImpl& dit, const Checkpoint& checkpoint,
                            const ParameterPlacement& placement) {
  static const std::string kPrefix = "model.diffusion_model.";
  bool original = false;
  for (const std::string& key : checkpoint.names()) {
    const std::string k = absl::StartsWith(key, kPrefix) ? key.substr(kPrefix.size()) : key;
    if (k == "head.head.weight" || k == "time_embedding.0.weight" ||
        absl::StrContains(k, ".self_attn.")) {
      original = true;
    }
  }
  std::vector<std::pair<std::string, torch::Tensor>> params;
  for (const auto& item : dit.named_parameters(/*recurse=*/true)) {
    params.emplace_back(item.key(), item.value());
  }
  auto rename = [original](const std::string& key) {
    const std::string k = absl::StartsWith(key, kPrefix) ? key.substr(kPrefix.size()) : key;
    return original ? WanOriginalToDiffusersKey(k) : k;
  };
  return LoadParameters(params, checkpoint, rename,
                        original ? "transformer (original Wan layout)" : "transformer", placement);
}

absl::Status LoadTextEncoderWeights(TextEncoder& encoder, const Checkpoint& checkpoint) {
  // transformers ties encoder.embed_tokens.weight to shared.weight and saves either name.
  const bool has_shared = checkpoint.contains("shared.weight");
  auto rename = [has_shared](const std::string& key) -> std::string {
    if (key == "encoder.embed_tokens.weight") return has_shared ? "" : "shared.weight";
    return key;
  };
  // The encoder's own device and dtype (its parameters may still be placeholders).
  const torch::TensorOptions target =
      torch::TensorOptions().device(encoder.device()).dtype(encoder.dtype());
  return LoadParameters(encoder.named_parameters(), checkpoint, rename, "text_encoder",
                        [&](const std::string&, const torch::Tensor&) { return target; });
}

absl::Status LoadVaeWeights(VaeDecoder& vae, const Checkpoint& checkpoint) {
  auto rename = [](const std::string& key) -> std::string {
    if (absl::StartsWith(key, "encoder.") || absl::StartsWith(key, "quant_conv.")) return "";
    return key;
  };
  const torch::TensorOptions target =
      torch::TensorOptions().device(vae.device()).dtype(torch::kFloat);  // Wan runs it in fp32
  return LoadParameters(vae.named_parameters(), checkpoint, rename, "vae",
                        [&](const std::string&, const torch::Tensor&) { return target; });
}

absl::StatusOr<WanDiT> LoadDiT(const std::string& transformer_dir, torch::Device device,
                               torch::ScalarType dtype, int64_t block_q, int64_t block_k) {
  SPARGE_ASSIGN_OR_RETURN(WanDiTConfig config,
                          ReadDiTConfig(Join(transformer_dir, "config.json")));
  SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint,
                          Checkpoint::Open(transformer_dir));
  try {
    WanDiT dit{nullptr};
    {
      ScopedDeferredParameterInit deferred;
      dit = WanDiT(config, block_q, block_k);
    }
    // Each tensor goes straight into its final device and dtype (the modules diffusers keeps in
    // fp32 get the checkpoint's values unrounded), as ToInference would have placed it.
    SPARGE_RETURN_IF_ERROR(LoadDiTWeights(
        *dit, *checkpoint, [&](const std::string& name, const torch::Tensor&) {
          return torch::TensorOptions().device(device).dtype(
              WanDiTImpl::KeepsFloat32(name) ? torch::kFloat : dtype);
        }));
    dit->SetInferenceDtype(dtype);
    dit->eval();
    return dit;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("building the transformer failed: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the transformer failed: ", e.what()));
  }
}

absl::StatusOr<LoadedWanModel> LoadModelDirectory(const std::string& dir, torch::Device device,
                                                  torch::ScalarType dtype, int64_t block_q,
                                                  int64_t block_k) {
  LoadedWanModel out;
  SPARGE_ASSIGN_OR_RETURN(out.config, ReadModelDirectoryConfig(dir));
  const std::string& root = dir;
  SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                          Tokenizer::FromFile(Join(root, "tokenizer/spiece.model")));
  {
    SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint,
                            Checkpoint::Open(Join(root, "text_encoder")));
    SPARGE_ASSIGN_OR_RETURN(out.text_encoder,
                            TextEncoder::CreateForLoading(out.config.model.text_encoder,
                                                          std::move(tokenizer), device, dtype));
    SPARGE_RETURN_IF_ERROR(LoadTextEncoderWeights(*out.text_encoder, *checkpoint));
  }
  SPARGE_ASSIGN_OR_RETURN(out.dit,
                          LoadDiT(Join(root, "transformer"), device, dtype, block_q, block_k));
  {
    SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint,
                            Checkpoint::Open(Join(root, "vae")));
    SPARGE_ASSIGN_OR_RETURN(out.vae, VaeDecoder::CreateForLoading(out.config.model.vae, device));
    SPARGE_RETURN_IF_ERROR(LoadVaeWeights(*out.vae, *checkpoint));
  }
  return out;
}

}  // namespace sparge::engine
