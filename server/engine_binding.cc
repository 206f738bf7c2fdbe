#include "server/engine_binding.h"

namespace sparge::server {

PipelineFactory EnginePipelineFactory(const engine::PipelineConfig& config) {
  return [config] { return engine::Pipeline::Create(config); };
}

VideoEncodeFn EngineVideoEncoder() {
  return [](const engine::VideoFrames& frames, int fps, engine::VideoContainer container) {
    return engine::EncodeVideo(frames, fps, container);
  };
}

}  // namespace sparge::server
