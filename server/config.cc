#include "server/config.h"

#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"
#include "server/internal/range_checks.h"
#include "server/internal/yaml_config.h"
#include "yaml-cpp/yaml.h"

namespace sparge::server {
namespace {

using internal::CheckFloatInRange;
using internal::CheckFourKPlusOne;
using internal::CheckIntInRange;
using internal::CheckMultipleInRange;
using ParseContext = internal::YamlParseContext;
using Section = internal::YamlSection;

absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

void ReadConfig(const YAML::Node& root, ParseContext* ctx, ServerConfig* c) {
  Section top(root, "", ctx);
  top.Read("listen_address", &c->listen_address);
  top.Read("port", &c->port);
  top.Read("metrics_address", &c->metrics_address);
  top.Read("metrics_port", &c->metrics_port);
  top.Read("device", &c->model.device);
  top.Read("output_chunk_bytes", &c->output_chunk_bytes);
  top.Read("warmup", &c->warmup);
  top.Read("shutdown_grace_seconds", &c->shutdown_grace_seconds);

  Section model = top.Sub("model");
  model.Read("name", &c->model.model);
  model.Read("dtype", &c->model.dtype);
  model.Read("weight_seed", &c->model.weight_seed);
  model.Read("block_q", &c->model.block_q);
  model.Read("block_k", &c->model.block_k);
  model.Read("threads", &c->model.num_threads);
  model.Read("transformer", &c->model.transformer);
  model.Finish();

  Section scheduler = top.Sub("scheduler");
  scheduler.Read("max_queue_length", &c->scheduler.max_queue_length);
  scheduler.Read("max_running_jobs", &c->scheduler.max_running_jobs);
  scheduler.Read("max_batch_tokens", &c->scheduler.max_batch_tokens);
  scheduler.Read("preemption", &c->scheduler.preemption);
  scheduler.Read("aging_seconds", &c->scheduler.aging_seconds);
  scheduler.Read("deadline_aware", &c->scheduler.deadline_aware);
  scheduler.Finish();

  Section jobs = top.Sub("jobs");
  jobs.Read("output_dir", &c->jobs.output_dir);
  jobs.Read("max_results", &c->jobs.max_results);
  jobs.Read("result_ttl_seconds", &c->jobs.result_ttl_seconds);
  jobs.Finish();

  RequestLimits& l = c->limits;
  Section limits = top.Sub("limits");
  limits.Read("min_width", &l.min_width);
  limits.Read("max_width", &l.max_width);
  limits.Read("min_height", &l.min_height);
  limits.Read("max_height", &l.max_height);
  limits.Read("size_multiple", &l.size_multiple);
  limits.Read("min_frames", &l.min_frames);
  limits.Read("max_frames", &l.max_frames);
  limits.Read("max_steps", &l.max_steps);
  limits.Read("max_prompt_bytes", &l.max_prompt_bytes);
  limits.Read("max_guidance_scale", &l.max_guidance_scale);
  limits.Read("max_shift", &l.max_shift);
  limits.Read("max_fps", &l.max_fps);
  limits.Finish();

  RequestDefaults& d = c->defaults;
  Section defaults = top.Sub("defaults");
  defaults.Read("negative_prompt", &d.negative_prompt);
  defaults.Read("width", &d.width);
  defaults.Read("height", &d.height);
  defaults.Read("num_frames", &d.num_frames);
  defaults.Read("fps", &d.fps);
  defaults.Read("num_steps", &d.num_steps);
  defaults.Read("guidance_scale", &d.guidance_scale);
  defaults.ReadEnum("sampler", &d.sampler, ParseSampler);
  defaults.Read("shift", &d.shift);
  defaults.ReadEnum("output_format", &d.output_format, ParseOutputFormat);
  Section sparsity = defaults.Sub("sparsity");
  sparsity.ReadEnum("mode", &d.sparsity.mode, ParseAttentionMode);
  sparsity.Read("topk", &d.sparsity.topk);
  sparsity.Read("topp", &d.sparsity.topp);
  sparsity.Read("dense_steps", &d.sparsity.dense_steps);
  sparsity.Finish();
  defaults.Finish();

  top.Finish();
}

absl::Status ValidatePipelineConfig(const engine::PipelineConfig& m) {
  if (m.model.empty()) return absl::InvalidArgumentError("model.name: must be non-empty");
  if (m.dtype != "float32" && m.dtype != "bfloat16" && m.dtype != "float16") {
    return internal::OutOfRange("model.dtype", "one of float32, bfloat16, float16", m.dtype);
  }
  int cuda_index = 0;
  const bool device_ok =
      m.device == "cpu" || m.device == "cuda" ||
      (absl::StartsWith(m.device, "cuda:") &&
       absl::SimpleAtoi(absl::string_view(m.device).substr(5), &cuda_index) && cuda_index >= 0);
  if (!device_ok) return internal::OutOfRange("device", "cpu, cuda or cuda:N", m.device);
  for (auto [name, value] : {std::pair<const char*, int>{"model.block_q", m.block_q},
                             std::pair<const char*, int>{"model.block_k", m.block_k}}) {
    absl::Status s = CheckMultipleInRange(name, value, 16, 16, 1024);
    if (!s.ok()) return s;
  }
  return CheckIntInRange("model.threads", m.num_threads, 0, 1024);
}

}  // namespace

const char* ToString(OutputFormat format) {
  switch (format) {
    case OutputFormat::kMp4:
      return "mp4";
    case OutputFormat::kPngFrames:
      return "png";
  }
  return "unknown";
}

const char* AttentionModeName(engine::AttentionMode mode) {
  switch (mode) {
    case engine::AttentionMode::kDense:
      return "dense";
    case engine::AttentionMode::kTopK:
      return "topk";
    case engine::AttentionMode::kTopP:
      return "topp";
    case engine::AttentionMode::kHybrid:
      return "hybrid";
  }
  return "unknown";
}

const char* SamplerName(engine::SamplerKind sampler) {
  switch (sampler) {
    case engine::SamplerKind::kEuler:
      return "euler";
    case engine::SamplerKind::kUniPC:
      return "unipc";
  }
  return "unknown";
}

absl::StatusOr<engine::AttentionMode> ParseAttentionMode(absl::string_view name) {
  for (auto mode : {engine::AttentionMode::kDense, engine::AttentionMode::kTopK,
                    engine::AttentionMode::kTopP, engine::AttentionMode::kHybrid}) {
    if (name == AttentionModeName(mode)) return mode;
  }
  return internal::OutOfRange("mode", "one of dense, topk, topp, hybrid",
                              absl::StrCat("'", name, "'"));
}

absl::StatusOr<engine::SamplerKind> ParseSampler(absl::string_view name) {
  for (auto sampler : {engine::SamplerKind::kEuler, engine::SamplerKind::kUniPC}) {
    if (name == SamplerName(sampler)) return sampler;
  }
  return internal::OutOfRange("sampler", "one of euler, unipc", absl::StrCat("'", name, "'"));
}

absl::StatusOr<OutputFormat> ParseOutputFormat(absl::string_view name) {
  if (name == "mp4") return OutputFormat::kMp4;
  if (name == "png") return OutputFormat::kPngFrames;
  return internal::OutOfRange("output_format", "one of mp4, png", absl::StrCat("'", name, "'"));
}

absl::Status RequestLimits::Validate() const {
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("size_multiple", size_multiple, 1, 1024));
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("min_width", min_width, size_multiple, size_multiple, 16384));
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("max_width", max_width, size_multiple, min_width, 16384));
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("min_height", min_height, size_multiple, size_multiple, 16384));
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("max_height", max_height, size_multiple, min_height, 16384));
  SPARGE_RETURN_IF_ERROR(CheckFourKPlusOne("min_frames", min_frames, 1, 1001));
  SPARGE_RETURN_IF_ERROR(CheckFourKPlusOne("max_frames", max_frames, min_frames, 1001));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("max_steps", max_steps, 1, 1000));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("max_prompt_bytes", max_prompt_bytes, 1, 1 << 20));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("max_guidance_scale", max_guidance_scale, 0.0, 100.0));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("max_shift", max_shift, 0.0, 1000.0, /*lo_open=*/true));
  return CheckIntInRange("max_fps", max_fps, 1, 1000);
}

absl::Status RequestDefaults::Validate(const RequestLimits& l) const {
  if (static_cast<int64_t>(negative_prompt.size()) > l.max_prompt_bytes) {
    return internal::OutOfRange("negative_prompt",
                                absl::StrCat("at most ", l.max_prompt_bytes, " bytes"),
                                absl::StrCat(negative_prompt.size(), " bytes"));
  }
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("width", width, l.size_multiple, l.min_width, l.max_width));
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("height", height, l.size_multiple, l.min_height, l.max_height));
  SPARGE_RETURN_IF_ERROR(
      CheckFourKPlusOne("num_frames", num_frames, l.min_frames, l.max_frames));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("fps", fps, 1, l.max_fps));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("num_steps", num_steps, 1, l.max_steps));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("guidance_scale", guidance_scale, 0.0, l.max_guidance_scale));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("shift", shift, 0.0, l.max_shift, /*lo_open=*/true));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("sparsity.topk", sparsity.topk, 0.0, 1.0, /*lo_open=*/true));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("sparsity.topp", sparsity.topp, 0.0, 1.0, /*lo_open=*/true));
  return CheckIntInRange("sparsity.dense_steps", sparsity.dense_steps, 0, num_steps);
}

absl::Status SchedulerConfig::Validate() const {
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("max_queue_length", max_queue_length, 0, 100000));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("max_running_jobs", max_running_jobs, 1, 256));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("max_batch_tokens", max_batch_tokens, 0, int64_t{1} << 40));
  // A week: beyond that aging is off in all but name, and 0 says so explicitly.
  return CheckFloatInRange("aging_seconds", aging_seconds, 0.0, 604800.0);
}

absl::Status JobStoreConfig::Validate() const {
  if (output_dir.empty()) return absl::InvalidArgumentError("output_dir: must be non-empty");
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("max_results", max_results, 1, 100000));
  return CheckFloatInRange("result_ttl_seconds", result_ttl_seconds, 0.0, 1e12,
                           /*lo_open=*/true);
}

absl::Status ServerConfig::Validate() const {
  if (listen_address.empty()) {
    return absl::InvalidArgumentError("listen_address: must be non-empty");
  }
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("port", port, 0, 65535));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("metrics_port", metrics_port, 0, 65535));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("output_chunk_bytes", output_chunk_bytes, 1024, 4 << 20));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("shutdown_grace_seconds", shutdown_grace_seconds, 0.0, 3600.0));
  SPARGE_RETURN_IF_ERROR(ValidatePipelineConfig(model));
  SPARGE_RETURN_IF_ERROR(Prefixed("limits.", limits.Validate()));
  SPARGE_RETURN_IF_ERROR(Prefixed("defaults.", defaults.Validate(limits)));
  SPARGE_RETURN_IF_ERROR(Prefixed("scheduler.", scheduler.Validate()));
  return Prefixed("jobs.", jobs.Validate());
}

absl::StatusOr<ServerConfig> ParseServerConfig(absl::string_view yaml_text,
                                               absl::string_view source_name) {
  ServerConfig config;
  SPARGE_RETURN_IF_ERROR(internal::ParseYamlConfig(
      yaml_text, source_name,
      [&config](const YAML::Node& root, ParseContext* ctx) { ReadConfig(root, ctx, &config); },
      [&config] { return config.Validate(); }));
  return config;
}

absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read config file ", path));
  std::stringstream text;
  text << in.rdbuf();
  return ParseServerConfig(text.str(), path);
}

}  // namespace sparge::server
