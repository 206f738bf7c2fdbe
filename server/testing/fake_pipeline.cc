#include "server/testing/fake_pipeline.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

namespace sparge::server::testing {
namespace {

class FakeJob final : public engine::GenerationJob {
 public:
  FakeJob(engine::GenerationRequest request, std::shared_ptr<FakePipelineCounters> counters)
      : request_(std::move(request)), counters_(std::move(counters)) {
    ++counters_->live_jobs;
    counters_->live_state_bytes += state_bytes();
  }
  ~FakeJob() override {
    --counters_->live_jobs;
    counters_->live_state_bytes -= state_bytes();
  }

  const engine::GenerationRequest& request() const override { return request_; }
  int steps_done() const override { return steps_done_; }
  int total_steps() const override { return request_.num_steps; }
  std::string BatchKey() const override {
    return absl::StrCat(request_.width, "x", request_.height, "x", request_.num_frames,
                        request_.guidance_scale > 1 ? ":cfg" : ":nocfg");
  }
  int64_t state_bytes() const override {
    return int64_t{request_.width} * request_.height * request_.num_frames / 16;
  }
  void Advance() { ++steps_done_; }

 private:
  engine::GenerationRequest request_;
  std::shared_ptr<FakePipelineCounters> counters_;
  int steps_done_ = 0;
};

}  // namespace

float FakeSparsity(const engine::SparsityKnobs& knobs, int step_index) {
  if (step_index < knobs.dense_steps) return 0.0f;
  switch (knobs.mode) {
    case engine::AttentionMode::kDense:
      return 0.0f;
    case engine::AttentionMode::kTopK:
      return 1.0f - knobs.topk;
    case engine::AttentionMode::kTopP:
      return 0.5f * (1.0f - knobs.topp) + 0.25f;
    case engine::AttentionMode::kHybrid:
      return std::min(1.0f - knobs.topk, 0.5f * (1.0f - knobs.topp) + 0.25f);
  }
  return 0.0f;
}

FakePipeline::FakePipeline(FakePipelineOptions options,
                           std::shared_ptr<FakePipelineCounters> counters)
    : options_(std::move(options)), counters_(std::move(counters)) {
  model_.name = "fake";
  model_.num_parameters = 1234;
  model_.dim = 32;
  model_.layers = 2;
  model_.heads = 2;
  model_.head_dim = 16;
  model_.dtype = "float32";
  model_.block_q = 64;
  model_.block_k = 64;
}

absl::Status FakePipeline::Warmup() {
  ++counters_->warmups;
  return options_.warmup_status;
}

absl::StatusOr<std::unique_ptr<engine::GenerationJob>> FakePipeline::Start(
    const engine::GenerationRequest& request) {
  ++counters_->starts;
  if (absl::StrContains(request.prompt, kFailStart)) {
    return absl::InternalError("fake text encoder failed");
  }
  return std::make_unique<FakeJob>(request, counters_);
}

absl::Status FakePipeline::Step(absl::Span<engine::GenerationJob* const> jobs,
                                std::vector<engine::StepStats>* stats) {
  ++counters_->step_calls;
  int batch = static_cast<int>(jobs.size());
  int seen = counters_->max_batch.load();
  while (batch > seen && !counters_->max_batch.compare_exchange_weak(seen, batch)) {
  }
  if (options_.step_delay > absl::ZeroDuration()) absl::SleepFor(options_.step_delay);
  std::vector<std::string> prompts;
  for (engine::GenerationJob* job : jobs) {
    if (job->denoise_done()) return absl::FailedPreconditionError("step on a finished job");
    if (absl::StrContains(job->request().prompt, kFailStep) && job->steps_done() == 1) {
      return absl::InternalError("fake DiT failed");
    }
  }
  bool oom = options_.oom_batch_size > 0 && batch >= options_.oom_batch_size;
  for (engine::GenerationJob* job : jobs) {
    oom = oom || absl::StrContains(job->request().prompt, kOomStep);
  }
  if (oom) {
    ++counters_->ooms;
    reserved_bytes_ = 0;  // as the real pipeline empties the allocator's cache after an OOM
    return absl::ResourceExhaustedError(
        absl::StrCat("fake DiT: device out of memory for a batch of ", batch));
  }
  int steps_done = 0;
  for (engine::GenerationJob* job : jobs) {
    auto* fake = static_cast<FakeJob*>(job);
    engine::StepStats s;
    s.step = fake->steps_done();
    s.achieved_sparsity = FakeSparsity(fake->request().sparsity, fake->steps_done());
    s.seconds = absl::ToDoubleSeconds(options_.step_delay);
    s.attention_seconds = options_.attention_seconds;
    stats->push_back(s);
    fake->Advance();
    ++counters_->job_steps;
    prompts.push_back(fake->request().prompt);
    steps_done = fake->steps_done();
  }
  if (options_.on_step) options_.on_step(prompts, steps_done);
  return absl::OkStatus();
}

absl::StatusOr<engine::VideoFrames> FakePipeline::Decode(engine::GenerationJob& job) {
  ++counters_->decodes;
  if (!job.denoise_done()) return absl::FailedPreconditionError("decode before denoising ended");
  const engine::GenerationRequest& r = job.request();
  if (absl::StrContains(r.prompt, kFailDecode)) return absl::InternalError("fake VAE failed");
  engine::VideoFrames frames;
  frames.num_frames = r.num_frames;
  frames.height = r.height;
  frames.width = r.width;
  frames.rgb.resize(static_cast<size_t>(r.num_frames) * r.height * r.width * 3);
  for (size_t i = 0; i < frames.rgb.size(); ++i) {
    frames.rgb[i] = static_cast<uint8_t>((i * 31 + r.seed) & 0xFF);
  }
  return frames;
}

engine::DeviceMemoryStats FakePipeline::memory_stats() const {
  engine::DeviceMemoryStats stats;
  stats.allocated_bytes = counters_->live_state_bytes.load();
  reserved_bytes_ = std::max(reserved_bytes_, stats.allocated_bytes);
  stats.reserved_bytes = reserved_bytes_;
  stats.total_bytes = options_.total_memory_bytes;
  return stats;
}

PipelineFactory FakePipelineFactory(FakePipelineOptions options,
                                    std::shared_ptr<FakePipelineCounters> counters) {
  return [options = std::move(options), counters = std::move(counters)]()
             -> absl::StatusOr<std::unique_ptr<engine::Pipeline>> {
    if (!options.create_status.ok()) return options.create_status;
    return std::make_unique<FakePipeline>(options, counters);
  };
}

VideoEncodeFn FakeVideoEncoder() {
  return [](const engine::VideoFrames& frames, int fps,
            engine::VideoContainer container) -> absl::StatusOr<engine::EncodedVideo> {
    if (frames.rgb.empty()) return absl::InvalidArgumentError("no frames");
    engine::EncodedVideo video;
    const bool mp4 = container == engine::VideoContainer::kMp4;
    video.content_type = mp4 ? "video/mp4" : "application/x-tar";
    video.data = absl::StrCat("FAKE ", mp4 ? "mp4 " : "tar ", frames.width, "x", frames.height,
                              "x", frames.num_frames, "@", fps, "\n");
    const size_t body = frames.rgb.size() / 16;
    for (size_t i = 0; i < body; ++i) {
      video.data.push_back(static_cast<char>(frames.rgb[i * 16] ^ static_cast<uint8_t>(i)));
    }
    return video;
  };
}

}  // namespace sparge::server::testing
