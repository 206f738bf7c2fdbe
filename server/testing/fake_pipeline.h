// Test doubles for the server: FakePipeline (a deterministic engine::Pipeline with failure and
// out-of-memory injection, a memory model and a per-step hook), FakeVideoEncoder and FakeClock.
// For tests and benchmarks only.
// FakePipeline, like any Pipeline, is used from one thread; counters and FakeClock are thread-safe.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "engine/pipeline.h"
#include "server/clock.h"
#include "server/executor.h"

namespace sparge::server::testing {

// Observations shared between a FakePipeline and the test (atomics: read from the test thread).
struct FakePipelineCounters {
  std::atomic<int> live_jobs{0};    // GenerationJobs not yet destroyed (their "memory")
  std::atomic<int> starts{0};
  std::atomic<int> step_calls{0};   // Step() calls
  std::atomic<int> job_steps{0};    // job-steps run, summed over batches
  std::atomic<int> max_batch{0};
  std::atomic<int> decodes{0};
  std::atomic<int> warmups{0};
  std::atomic<int> ooms{0};                // Step() calls that returned RESOURCE_EXHAUSTED
  std::atomic<int64_t> live_state_bytes{0};  // state_bytes() of live jobs ("allocated")
};

// Attention time a FakePipeline step reports by default, seconds.
inline constexpr double kFakeAttentionSeconds = 0.001;

struct FakePipelineOptions {
  absl::Status create_status;  // non-OK: the factory fails with it
  absl::Status warmup_status;
  // Runs inside every Step() (on the executor thread) after the step's work, with the jobs'
  // prompts and their steps_done() after the step: lets tests cancel or advance a fake clock at
  // an exact point.
  std::function<void(const std::vector<std::string>& prompts, int steps_done)> on_step;
  // Wall time each Step() takes (real sleep; 0 for most tests).
  absl::Duration step_delay = absl::ZeroDuration();
  // Self-attention time each Step() reports (StepStats::attention_seconds; not slept).
  double attention_seconds = kFakeAttentionSeconds;
  // A Step() over at least this many jobs returns RESOURCE_EXHAUSTED without advancing any (as
  // a device too small for the batch would); 0 disables.
  int oom_batch_size = 0;
  // Device capacity memory_stats() reports.
  int64_t total_memory_bytes = int64_t{1} << 30;
};

// Prompts containing these markers make the corresponding stage fail with INTERNAL.
inline constexpr char kFailStart[] = "[fail-start]";
inline constexpr char kFailStep[] = "[fail-step]";
inline constexpr char kFailDecode[] = "[fail-decode]";
// Every Step() including a job whose prompt contains this returns RESOURCE_EXHAUSTED (the job
// does not fit even alone).
inline constexpr char kOomStep[] = "[oom]";

// Sparsity the fake reports for a step: 0 in dense steps, else a function of the knobs.
float FakeSparsity(const engine::SparsityKnobs& knobs, int step_index);

class FakePipeline final : public engine::Pipeline {
 public:
  FakePipeline(FakePipelineOptions options, std::shared_ptr<FakePipelineCounters> counters);

  const engine::ModelDescription& model() const override { return model_; }
  std::string device_name() const override { return "cpu (fake)"; }
  absl::Status Warmup() override;
  absl::StatusOr<std::unique_ptr<engine::GenerationJob>> Start(
      const engine::GenerationRequest& request) override;
  absl::Status Step(absl::Span<engine::GenerationJob* const> jobs,
                    std::vector<engine::StepStats>* stats) override;
  absl::StatusOr<engine::VideoFrames> Decode(engine::GenerationJob& job) override;
  // allocated = live jobs' state bytes; reserved = the most allocated since the last OOM (a
  // caching allocator that keeps freed blocks until an OOM empties it); total = the option.
  engine::DeviceMemoryStats memory_stats() const override;

 private:
  FakePipelineOptions options_;
  std::shared_ptr<FakePipelineCounters> counters_;
  engine::ModelDescription model_;
  mutable int64_t reserved_bytes_ = 0;
};

PipelineFactory FakePipelineFactory(FakePipelineOptions options,
                                    std::shared_ptr<FakePipelineCounters> counters);

// Deterministic stand-in for engine::EncodeVideo: a header line, then bytes derived from the
// frames (rgb.size() / 16 of them, so typical requests span several 64 KiB chunks).
VideoEncodeFn FakeVideoEncoder();

class FakeClock final : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'700'000'000)) : now_(start) {}
  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sparge::server::testing
