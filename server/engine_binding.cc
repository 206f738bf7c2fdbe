#include "server/engine_binding.h"

#include "engine/pipeline.h"
#include "engine/video/video_encoder.h"

namespace sparge::server {

ServerDeps EngineServerDeps(const ServerConfig& config) {
  ServerDeps deps;
  deps.create_pipeline = [model = config.model] { return engine::Pipeline::Create(model); };
  deps.encode_video = [](const engine::VideoFrames& frames, int fps,
                         engine::VideoContainer container) {
    return engine::EncodeVideo(frames, fps, container);
  };
  return deps;
}

}  // namespace sparge::server
