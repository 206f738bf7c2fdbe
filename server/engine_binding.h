// Connects the server to the real engine: Pipeline::Create for the configured model and the FFmpeg
// video encoder. Binaries and real-model tests put these into ServerDeps; unit tests use fakes and
// need not link the engine. Protobuf-free on purpose (see engine_interface.h). Thread-safe.
#pragma once

#include "engine/pipeline.h"
#include "server/engine_interface.h"

namespace sparge::server {

PipelineFactory EnginePipelineFactory(const engine::PipelineConfig& config);
VideoEncodeFn EngineVideoEncoder();

}  // namespace sparge::server
