// The scheduling policy: a pure function from a snapshot of queued and running jobs to the
// executor's next action (start a job, run one batched denoising step, or finish a job). No
// threads, clocks or engine calls, so it is tested by simulation. Thread-safe (pure).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "server/config.h"
#include "server/request_validation.h"

namespace sparge::server {

struct QueuedJobView {
  uint64_t sequence = 0;  // submission order
  JobPriority priority = JobPriority::kNormal;
};

struct RunningJobView {
  uint64_t sequence = 0;
  std::string batch_key;  // engine::GenerationJob::BatchKey(): equal keys may share a Step()
  int steps_done = 0;
  int total_steps = 0;
  bool denoise_done() const { return steps_done >= total_steps; }
};

struct SchedulerSnapshot {
  std::vector<QueuedJobView> queued;    // any order
  std::vector<RunningJobView> running;  // any order
};

struct SchedulerAction {
  enum class Kind { kIdle, kStart, kStep, kFinish };
  Kind kind = Kind::kIdle;
  // kStart / kFinish: one job; kStep: the batch, in sequence order.
  std::vector<uint64_t> jobs;
};
const char* ToString(SchedulerAction::Kind kind);

// The rules, in order:
//  1. A running job whose denoising is done is finished first (decode + encode): that frees its
//     latents and its client is waiting only on that.
//  2. While fewer than max_running_jobs run, the next queued job starts: highest priority first,
//     then first come, first served. New jobs thereby join between steps.
//  3. Otherwise the oldest running job takes one denoising step, batched with every other running
//     job of the same batch key.
// Example (max_running_jobs = 2): queued {#3 normal, #4 high}, running {#1 key A 2/4 steps,
// #2 key A 0/4} -> kStep {#1, #2}; once #1 reaches 4/4 -> kFinish {#1}; then kStart {#4}.
SchedulerAction ChooseNextAction(const SchedulerSnapshot& snapshot,
                                 const SchedulerConfig& config);

// Jobs in `queued` that rule 2 would start before a job of this priority and sequence.
int QueuePosition(const std::vector<QueuedJobView>& queued, JobPriority priority,
                  uint64_t sequence);

}  // namespace sparge::server
