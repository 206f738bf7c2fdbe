// Server configuration: plain structs parsed once from YAML (config/server.yaml documents every
// field), each with Validate(). Use LoadServerConfig(path) at startup, then apply flag overrides
// and call ServerConfig::Validate(). Plain values: copy freely, no synchronization needed.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/pipeline.h"

namespace sparge::server {

// Output file encodings (GenerateRequest.output_format).
enum class OutputFormat { kMp4 = 0, kPngFrames = 1 };
const char* ToString(OutputFormat format);  // "mp4" | "png"

// Hard limits every request must fit. Sizes in pixels, frames in video frames.
struct RequestLimits {
  int min_width = 64;
  int max_width = 1280;
  int min_height = 64;
  int max_height = 1280;
  int size_multiple = 16;  // VAE stride 8 x DiT patch 2
  int min_frames = 1;      // frame counts must also be 4k+1
  int max_frames = 81;
  int max_steps = 100;
  int max_prompt_bytes = 2048;  // prompt and negative prompt, UTF-8 bytes
  float max_guidance_scale = 30.0f;
  float max_shift = 100.0f;
  int max_fps = 120;

  absl::Status Validate() const;
};

// Values an unset request field takes. Must themselves fit the limits.
struct RequestDefaults {
  std::string negative_prompt =
      "blurry, low quality, distorted, static, watermark, text, worst quality";
  int width = 256;
  int height = 256;
  int num_frames = 17;
  int fps = 16;
  int num_steps = 4;
  float guidance_scale = 5.0f;
  engine::SamplerKind sampler = engine::SamplerKind::kEuler;
  float shift = 5.0f;
  OutputFormat output_format = OutputFormat::kMp4;
  engine::SparsityKnobs sparsity = {engine::AttentionMode::kHybrid, 0.1f, 0.9f, 1};

  absl::Status Validate(const RequestLimits& limits) const;
};

// Admission and scheduling.
struct SchedulerConfig {
  int max_queue_length = 16;  // jobs waiting (not running); more get RESOURCE_EXHAUSTED
  int max_running_jobs = 1;   // jobs denoising concurrently, batched per step when compatible
  // Cap on DiT tokens summed over one batched step, a CFG job counting twice (its conditional and
  // unconditional passes). 0: no cap besides max_running_jobs. A request whose own tokens exceed
  // a nonzero cap is rejected at admission.
  int64_t max_batch_tokens = 0;
  // A queued job of strictly higher (aged) priority may preempt the lowest-priority running job at
  // a step boundary when no slot is free; the preempted job keeps its state and resumes later.
  bool preemption = true;
  // A queued job gains one priority class per aging_seconds waited, so low priority never
  // starves. 0 disables aging.
  double aging_seconds = 60.0;
  // Within a priority class, jobs with a deadline go earliest-deadline-first ahead of FIFO.
  bool deadline_aware = true;

  absl::Status Validate() const;
};

// Job API storage (SubmitJob/GetJob/GetJobResult): where finished outputs live and how long.
struct JobStoreConfig {
  std::string output_dir = "sparge-jobs";  // relative paths resolve against the working directory
  int max_results = 100;                   // finished results kept; the oldest are deleted first
  double result_ttl_seconds = 86400;       // finished results older than this are deleted

  absl::Status Validate() const;
};

struct ServerConfig {
  std::string listen_address = "0.0.0.0";
  int port = 50051;                        // gRPC; 0 picks a free port
  std::string metrics_address = "0.0.0.0";
  int metrics_port = 9090;                 // Prometheus /metrics over HTTP; 0 disables it
  int64_t output_chunk_bytes = 64 * 1024;  // payload of each streamed OutputChunk
  bool warmup = true;                      // run one tiny request before reporting SERVING
  double shutdown_grace_seconds = 5.0;     // in-flight streams get this long on SIGTERM
  // model.device is the YAML top-level `device`; the rest comes from the `model` section.
  engine::PipelineConfig model;
  RequestLimits limits;
  RequestDefaults defaults;
  SchedulerConfig scheduler;
  JobStoreConfig jobs;

  // Returns the first problem as INVALID_ARGUMENT "<yaml path>: must be ..., got ...".
  absl::Status Validate() const;
};

// Parses YAML text. Syntax errors, type errors and unknown keys become INVALID_ARGUMENT
// "<source_name>:<line>:<column>: <yaml path>: <problem>"; the result is also Validate()d, with
// the offending key's line when it was present in the text.
absl::StatusOr<ServerConfig> ParseServerConfig(absl::string_view yaml_text,
                                               absl::string_view source_name);
// Reads and parses a file (NOT_FOUND if it cannot be read).
absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path);

// Names used in YAML, flags and logs.
absl::StatusOr<engine::AttentionMode> ParseAttentionMode(absl::string_view name);
absl::StatusOr<engine::SamplerKind> ParseSampler(absl::string_view name);
absl::StatusOr<OutputFormat> ParseOutputFormat(absl::string_view name);
const char* AttentionModeName(engine::AttentionMode mode);  // "dense" | "topk" | "topp" | "hybrid"
const char* SamplerName(engine::SamplerKind sampler);       // "euler" | "unipc"

}  // namespace sparge::server
