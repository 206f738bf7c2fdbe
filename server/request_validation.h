// Turns a wire GenerateRequest into a fully resolved engine request: unset fields take the
// configured defaults, every field is range-checked, and errors are INVALID_ARGUMENT naming the
// field, its allowed range and the value ("width: must be a multiple of 16 in [64, 1280], got 17").
// Pure function of its inputs (the seed source is injected); thread-safe.
#pragma once

#include <cstdint>
#include <functional>

#include "absl/status/statusor.h"
#include "engine/pipeline.h"
#include "server/config.h"
#include "sparge/v1/video_service.pb.h"

namespace sparge::server {

// Scheduling class of a job (GenerateRequest.priority); higher runs first.
enum class JobPriority { kLow = 0, kNormal = 1, kHigh = 2 };

struct ResolvedRequest {
  engine::GenerationRequest engine;  // what the pipeline runs
  int fps = 16;
  OutputFormat output_format = OutputFormat::kMp4;
  JobPriority priority = JobPriority::kNormal;
  bool seed_was_random = false;
  // The request as it will run, every field set (echoed in JobAccepted.resolved_request).
  sparge::v1::GenerateRequest resolved;
};

// Draws the seed of requests that leave it unset.
using SeedSource = std::function<uint64_t()>;
// A SeedSource backed by absl::BitGen (thread-safe: each call uses its own generator state).
SeedSource RandomSeedSource();

absl::StatusOr<ResolvedRequest> ResolveRequest(const sparge::v1::GenerateRequest& request,
                                               const RequestLimits& limits,
                                               const RequestDefaults& defaults,
                                               const SeedSource& seed_source);

// Fills a wire GenerateRequest with the defaults (for ServerInfo.defaults); prompt left empty.
sparge::v1::GenerateRequest DefaultsAsProto(const RequestDefaults& defaults);

// Enum conversions between the wire API and the engine.
sparge::v1::AttentionMode ToProto(engine::AttentionMode mode);
sparge::v1::Sampler ToProto(engine::SamplerKind sampler);
sparge::v1::OutputFormat ToProto(OutputFormat format);

}  // namespace sparge::server
