// The scheduling policy: a pure function from a snapshot of queued and running jobs (and the time)
// to the executor's next action: start or resume a job, preempt one, run one batched denoising
// step, or finish a job. No threads, clocks or engine calls, so it is tested by simulation.
// Thread-safe (pure).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "engine/pipeline.h"
#include "server/config.h"
#include "server/request_validation.h"

namespace sparge::server {

// A job that has denoised fewer than this many steps since it last (re)started is not preempted:
// each start pays text encoding (or at least a cache reload), so every start must buy progress.
inline constexpr int kMinStepsBeforePreemption = 1;
// A job preempted this many times is not preempted again, so it finishes in bounded time.
inline constexpr int kMaxPreemptionsPerJob = 2;

struct QueuedJobView {
  uint64_t sequence = 0;  // submission order; a preempted job keeps its own
  JobPriority priority = JobPriority::kNormal;
  // When the job was accepted (a preempted job keeps it); aging counts from here.
  // InfinitePast: no aging.
  absl::Time arrival = absl::InfinitePast();
  absl::Time deadline = absl::InfiniteFuture();  // InfiniteFuture: none
  int64_t tokens = 0;                            // DitTokens() of the request
};

struct RunningJobView {
  uint64_t sequence = 0;
  std::string batch_key;  // engine::GenerationJob::BatchKey(): equal keys may share a Step()
  int steps_done = 0;
  int total_steps = 0;
  JobPriority priority = JobPriority::kNormal;
  absl::Time arrival = absl::InfinitePast();  // as in QueuedJobView
  int64_t tokens = 0;  // DitTokens(); 0 counts as fitting any budget
  absl::Time deadline = absl::InfiniteFuture();
  uint64_t start_order = 0;  // increases with every (re)start: larger = more recently started
  int steps_at_start = 0;    // steps_done when it last (re)started
  int preemptions = 0;       // times it has been preempted so far
  bool denoise_done() const { return steps_done >= total_steps; }
};

struct SchedulerSnapshot {
  std::vector<QueuedJobView> queued;    // any order
  std::vector<RunningJobView> running;  // any order
  absl::Time now = absl::InfinitePast();  // for aging; InfinitePast disables it
};

struct SchedulerAction {
  enum class Kind { kIdle, kStart, kPreempt, kStep, kFinish };
  Kind kind = Kind::kIdle;
  // kStart / kPreempt / kFinish: one job; kStep: the batch, leader first, then in rank order.
  std::vector<uint64_t> jobs;
};
const char* ToString(SchedulerAction::Kind kind);

// Every job has an effective class: its priority plus one per full aging_seconds since it was
// accepted (EffectivePriority), for queued and running jobs alike. All jobs age at the same rate,
// so aging never reorders two jobs of one priority, a low job overtakes high jobs accepted more
// than 2 x aging_seconds after it (no starvation), and a preempted job can never preempt back
// the job that displaced it. Job order: effective class descending; within a class, with
// deadline_aware, jobs with a deadline earliest-deadline-first, then the rest; then sequence
// (FIFO).
// The rules, in order:
//  1. Finish: a running job whose denoising is done is finished (decode + encode), oldest first:
//     that frees its latents and its client waits only on that.
//  2. Start: while fewer than max_running_jobs run, the first queued job in job order starts (a
//     preempted one resumes at the step it reached).
//  3. Preempt (with `preemption`): every slot is taken and the first queued job's class is
//     strictly above some running job's: the lowest-class, most recently started such job goes
//     back to the queue, keeping its state. Never a job that is done denoising, one that has
//     denoised fewer than kMinStepsBeforePreemption steps since it (re)started, or one already
//     preempted kMaxPreemptionsPerJob times. The next decision then starts the waiting job.
//  4. Step: the first running job in job order leads one denoising step; every other running job
//     with its batch key joins, in job order, while the batch's summed tokens stay within
//     max_batch_tokens (0: no cap). A leader alone over the cap still runs alone (admission
//     keeps such jobs out).
// Example (max_running_jobs = 2): queued {#3 normal, #4 high}, running {#1 key A 2/4 steps,
// #2 key A 1/4, both normal, #2 started last} -> kPreempt {#2}; then kStart {#4} (#2 is queued
// again, before #3); then steps batch #1 with #4 when their keys match.
SchedulerAction ChooseNextAction(const SchedulerSnapshot& snapshot,
                                 const SchedulerConfig& config);

// A job's class after aging: its priority plus one per full aging_seconds since `arrival`.
int EffectivePriority(JobPriority priority, absl::Time arrival, absl::Time now,
                      const SchedulerConfig& config);

// Queued sequences in the order rule 2 would start them.
std::vector<uint64_t> QueueOrder(const std::vector<QueuedJobView>& queued, absl::Time now,
                                 const SchedulerConfig& config);

// Jobs in `queued` that rule 2 would start before `job` (which need not be in the list).
int QueuePosition(const std::vector<QueuedJobView>& queued, const QueuedJobView& job,
                  absl::Time now, const SchedulerConfig& config);

// DiT tokens one denoising step of the request puts through the model: latent frames x latent
// height / patch x latent width / patch, twice with classifier-free guidance (guidance_scale > 1
// runs a conditional and an unconditional pass). E.g. 832x480x81 frames on Wan2.1: 21 x 30 x 52 =
// 32760 tokens, 65520 with guidance.
int64_t DitTokens(const engine::GenerationRequest& request, const engine::ModelDescription& model);

}  // namespace sparge::server
