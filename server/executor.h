// The executor: one thread that creates and owns the engine::Pipeline and runs every job through
// it (Start -> Step... -> Decode -> encode), choosing each next action with the pure policy of
// scheduler_policy.h (priorities, aging, deadlines, token budget, preemption). A batched step that
// runs out of device memory is retried job by job, so only a job that cannot fit alone fails, and
// later batches stay below that batch's tokens for a while.
// gRPC threads only Submit() and read each job's event channel.
// Thread-safe: every public method may be called from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/pipeline.h"
#include "engine/video/video_encoder.h"
#include "server/clock.h"
#include "server/config.h"
#include "server/engine_interface.h"
#include "server/job.h"
#include "server/metrics.h"
#include "server/request_validation.h"
#include "server/scheduler_policy.h"

namespace sparge::server {

// Timing of one executor iteration (one policy decision and its execution), for the scheduling
// overhead benchmark and sparge_scheduler_overhead_seconds. Steady-clock wall time, not the
// injected Clock; the *_cpu_* fields are the executor thread's CPU time (immune to the thread
// being descheduled on a busy host), measured only when ExecutorOptions::on_iteration is set.
struct IterationTiming {
  SchedulerAction::Kind action = SchedulerAction::Kind::kIdle;
  int batch_size = 0;            // jobs in a kStep action, else 0 or 1
  double total_seconds = 0;      // the whole iteration
  double engine_seconds = 0;     // inside Pipeline calls and the video encoder
  double total_cpu_seconds = 0;
  double engine_cpu_seconds = 0;
  double overhead_seconds() const { return total_seconds - engine_seconds; }
  double overhead_cpu_seconds() const { return total_cpu_seconds - engine_cpu_seconds; }
};

struct ExecutorOptions {
  PipelineFactory create_pipeline;  // required
  VideoEncodeFn encode_video;       // required
  const Clock* clock = Clock::Real();
  ServerMetrics* metrics = nullptr;  // optional
  SchedulerConfig scheduler;
  int64_t output_chunk_bytes = 64 * 1024;
  bool warmup = true;
  // Called once on the executor thread after loading (and warming up) the model, or failing to.
  std::function<void(const absl::Status&)> on_ready;
  // Optional: called on the executor thread after every iteration that did something.
  std::function<void(const IterationTiming&)> on_iteration;
};

// Model facts for GetServerInfo, available once loaded.
struct LoadedModelInfo {
  engine::ModelDescription description;
  std::string device_name;
};

class Executor {
 public:
  // Starts the executor thread, which loads the model; Submit() answers UNAVAILABLE until then.
  static absl::StatusOr<std::unique_ptr<Executor>> Create(ExecutorOptions options);
  ~Executor();  // Stop()

  // Queues a job. Its channel first gets `accepted`, then progress, chunks, `completed` and the
  // final OK status, or a non-OK status. UNAVAILABLE while loading or stopping,
  // RESOURCE_EXHAUSTED "queue full (max_queue_length=N)", or RESOURCE_EXHAUSTED naming
  // scheduler.max_batch_tokens when the request alone needs more DiT tokens than that cap.
  // A preempted job gets a STAGE_QUEUED progress event with its queue position, and resumes
  // later at the step it reached.
  absl::StatusOr<std::shared_ptr<JobHandle>> Submit(ResolvedRequest request,
                                                    absl::Time deadline = absl::InfiniteFuture());

  // Blocks until the model is loaded and warmed up (OK) or loading failed (its status), and
  // on_ready has returned; or until `timeout` passed (DEADLINE_EXCEEDED).
  absl::Status WaitUntilReady(absl::Duration timeout);
  bool ready() const;
  std::optional<LoadedModelInfo> model_info() const;
  int queue_depth() const;

  // Stops accepting jobs, ends queued and running jobs with UNAVAILABLE at their next step
  // boundary, destroys the pipeline and joins the thread. Idempotent.
  void Stop();

 private:
  // Executor-thread-only state of a started job (running, or preempted and queued again).
  struct RunningJob {
    std::shared_ptr<JobHandle> handle;
    std::unique_ptr<engine::GenerationJob> job;
    absl::Time started;
    int64_t tokens = 0;       // DitTokens() of the request
    uint64_t start_order = 0;
    int steps_at_start = 0;
    int preemptions = 0;
    double queue_wait_seconds = 0;
    double text_encode_seconds = 0;
    double denoise_seconds = 0;
    double sparsity_sum = 0;
    int sparsity_count = 0;
  };

  // A job waiting to start or to resume.
  struct QueuedJob {
    std::shared_ptr<JobHandle> handle;
    int steps_done = 0;  // of a preempted job, reported in its STAGE_QUEUED events
  };

  explicit Executor(ExecutorOptions options);
  void ThreadMain();
  absl::Status LoadModel();
  // One policy decision and its execution; false when there is nothing to do.
  bool RunOnce();
  void StartJob(std::shared_ptr<JobHandle> handle);
  void ResumeJob(RunningJob job);
  void PreemptJob(uint64_t sequence);
  void StepJobs(const std::vector<uint64_t>& sequences);
  // One Pipeline::Step over `batch`; on success records stats and pushes progress events.
  absl::Status RunStep(const std::vector<RunningJob*>& batch);
  void FinishJob(uint64_t sequence);
  // Runs an engine call, adding its wall time to this iteration's engine time.
  template <typename Fn>
  auto TimedEngineCall(const char* what, Fn&& fn) -> decltype(fn());
  QueuedJobView ViewOf(const QueuedJob& q) const;
  // Ends jobs that were cancelled, passed their deadline or are caught by shutdown.
  void ReapStoppedJobs();
  // Ends a job with a non-OK status (its engine state, if any, is freed by the caller).
  void EndJob(JobHandle& handle, const absl::Status& status, JobState state);
  void EndStoppedJob(JobHandle& handle, CancelReason reason, const std::string& where);
  // The reason a job must stop now, or kNone.
  CancelReason StopReason(const JobHandle& handle, absl::Time now, bool stopping) const;
  void PushProgress(JobHandle& handle, sparge::v1::Stage stage, int step, int total_steps,
                    float sparsity, double eta_seconds);
  // Tells queued jobs whose position changed (and `also`, if set) their new one and an ETA (a
  // STAGE_QUEUED progress event).
  void ReportQueuePositions() ABSL_LOCKS_EXCLUDED(mu_);
  void ReportQueuePositionsLocked(uint64_t also = 0) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double EstimateRemainingSeconds(const RunningJob& job) const;
  void UpdateGauges();
  void UpdateDeviceMemory();

  const ExecutorOptions options_;
  std::thread thread_;
  absl::Mutex stop_mu_;  // serializes Stop() callers around the join

  mutable absl::Mutex mu_;
  std::vector<QueuedJob> queued_ ABSL_GUARDED_BY(mu_);
  uint64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<absl::Status> load_status_ ABSL_GUARDED_BY(mu_);
  bool ready_reported_ ABSL_GUARDED_BY(mu_) = false;  // on_ready has returned
  // For queued jobs' ETAs (Submit runs on gRPC threads): copies of the throughput estimates below
  // and the engine work the running jobs still need, refreshed every iteration.
  double queue_step_seconds_per_mvoxel_ ABSL_GUARDED_BY(mu_) = 0;
  double queue_finish_seconds_per_mvoxel_ ABSL_GUARDED_BY(mu_) = 0;
  double running_work_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<LoadedModelInfo> model_info_ ABSL_GUARDED_BY(mu_);
  int running_count_ ABSL_GUARDED_BY(mu_) = 0;

  // Executor thread only.
  std::unique_ptr<engine::Pipeline> pipeline_;
  std::vector<RunningJob> running_;
  // Preempted jobs' engine state, by sequence; their handles are back in queued_.
  std::map<uint64_t, RunningJob> preempted_;
  uint64_t next_start_order_ = 1;
  // Token cap learned from the last batched out-of-memory (0: none), and successful steps since.
  int64_t oom_token_cap_ = 0;
  int steps_since_oom_ = 0;
  double iteration_engine_seconds_ = 0;
  double iteration_engine_cpu_seconds_ = 0;
  // Throughput estimates for ETAs, in seconds per million output voxels (width*height*frames):
  // denoising per step, and decode + encode. Seeded by warm-up, then smoothed per job.
  double step_seconds_per_mvoxel_ = 0;
  double finish_seconds_per_mvoxel_ = 0;
};

}  // namespace sparge::server
