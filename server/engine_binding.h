// Connects the server to the real engine: Pipeline::Create for the configured model and the FFmpeg
// video encoder. Binaries and real-model tests use EngineServerDeps(config); unit tests use fakes
// instead and need not link the engine. Thread-safe (returns plain function objects).
#pragma once

#include "server/config.h"
#include "server/video_service.h"

namespace sparge::server {

ServerDeps EngineServerDeps(const ServerConfig& config);

}  // namespace sparge::server
