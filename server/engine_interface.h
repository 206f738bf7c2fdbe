// The engine as the server sees it: a factory for the Pipeline and the video encoder function.
// Deliberately free of protobuf and gRPC headers, so that the one translation unit that binds the
// real engine (engine_binding.cc, compiled with LibTorch's include path, whose bundled protobuf
// headers clash with the system ones) never sees them. Plain type aliases; thread-safe.
#pragma once

#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "engine/pipeline.h"
#include "engine/video/video_encoder.h"

namespace sparge::server {

// Runs on the executor thread, which then owns the pipeline (CUDA state is per thread).
using PipelineFactory = std::function<absl::StatusOr<std::unique_ptr<engine::Pipeline>>()>;
using VideoEncodeFn = std::function<absl::StatusOr<engine::EncodedVideo>(
    const engine::VideoFrames& frames, int fps, engine::VideoContainer container)>;

}  // namespace sparge::server
