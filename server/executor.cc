#include "server/executor.h"

#include <algorithm>
#include <time.h>

#include <chrono>
#include <exception>
#include <unordered_map>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/base/status_macros.h"
#include "server/log.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;

// Weight of the newest sample in the ETA throughput estimates.
constexpr double kEtaSmoothing = 0.3;

// After a batched step runs out of device memory, batches stay below its token count for this
// many successful steps, then the learned cap is lifted (the pressure may have been transient:
// fragmentation, a neighbour process).
constexpr int kOomCapSteps = 200;

// The engine reports errors as Status, but a bug that throws must fail one job, not the server.
template <typename Fn>
auto GuardEngineCall(const char* what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, " threw: ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(what, " threw a non-standard exception"));
  }
}

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

using SteadyClock = std::chrono::steady_clock;
double SecondsSince(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
}

double MegaVoxels(const engine::GenerationRequest& r) {
  return static_cast<double>(r.width) * r.height * r.num_frames / 1e6;
}

// Engine time a job still needs at the measured throughput (seconds per step and megavoxel, from
// batched steps, so batching's gain is in it; decode + encode per megavoxel).
double RemainingWorkSeconds(const engine::GenerationRequest& r, int steps_done,
                            double step_seconds_per_mvoxel, double finish_seconds_per_mvoxel) {
  const double mvoxels = MegaVoxels(r);
  return std::max(0, r.num_steps - steps_done) * step_seconds_per_mvoxel * mvoxels +
         finish_seconds_per_mvoxel * mvoxels;
}

void Smooth(double* estimate, double sample) {
  *estimate = *estimate == 0 ? sample : (1 - kEtaSmoothing) * *estimate + kEtaSmoothing * sample;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Executor>> Executor::Create(ExecutorOptions options) {
  if (!options.create_pipeline || !options.encode_video || options.clock == nullptr) {
    return absl::InvalidArgumentError(
        "Executor: create_pipeline, encode_video and clock are required");
  }
  SPARGE_RETURN_IF_ERROR(options.scheduler.Validate());
  if (options.output_chunk_bytes <= 0) {
    return absl::InvalidArgumentError("Executor: output_chunk_bytes must be positive");
  }
  std::unique_ptr<Executor> executor(new Executor(std::move(options)));
  executor->thread_ = std::thread([e = executor.get()] { e->ThreadMain(); });
  return executor;
}

Executor::Executor(ExecutorOptions options) : options_(std::move(options)) {}

Executor::~Executor() { Stop(); }

void Executor::Stop() {
  absl::MutexLock stop_lock(&stop_mu_);
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

bool Executor::ready() const {
  absl::MutexLock lock(&mu_);
  return load_status_.has_value() && load_status_->ok() && !stopping_;
}

std::optional<LoadedModelInfo> Executor::model_info() const {
  absl::MutexLock lock(&mu_);
  return model_info_;
}

int Executor::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queued_.size());
}

absl::Status Executor::WaitUntilReady(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  // Waits for on_ready too, so that what it publishes (health SERVING) is visible on return.
  auto loaded = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return ready_reported_; };
  if (!mu_.AwaitWithTimeout(absl::Condition(&loaded), timeout)) {
    return absl::DeadlineExceededError(
        absl::StrCat("model not ready after ", absl::FormatDuration(timeout)));
  }
  return *load_status_;
}

absl::StatusOr<std::shared_ptr<JobHandle>> Executor::Submit(ResolvedRequest request,
                                                            absl::Time deadline) {
  const absl::Time now = options_.clock->Now();
  std::shared_ptr<JobHandle> handle;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("server is shutting down");
    if (!load_status_.has_value()) {
      return absl::UnavailableError(
          "the model is still loading; retry once the health check reports SERVING");
    }
    if (!load_status_->ok()) {
      return absl::UnavailableError(
          absl::StrCat("the model failed to load: ", load_status_->message()));
    }
    const int64_t max_tokens = options_.scheduler.max_batch_tokens;
    if (max_tokens > 0 && model_info_.has_value()) {
      const engine::GenerationRequest& r = request.engine;
      const int64_t tokens = DitTokens(r, model_info_->description);
      if (tokens > max_tokens) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "request needs ", tokens, " DiT tokens per denoising step (", r.width, "x", r.height,
            "x", r.num_frames, " frames",
            r.guidance_scale > 1.0f ? ", doubled by classifier-free guidance" : "",
            "), more than this server's scheduler.max_batch_tokens=", max_tokens,
            "; lower width, height or num_frames",
            r.guidance_scale > 1.0f ? ", or set guidance_scale <= 1" : ""));
      }
    }
    const int max_queue = options_.scheduler.max_queue_length;
    if (static_cast<int>(queued_.size()) >= max_queue) {
      return absl::ResourceExhaustedError(
          absl::StrCat("queue full (max_queue_length=", max_queue, ")"));
    }
    const uint64_t sequence = next_sequence_++;
    std::vector<QueuedJobView> views;
    views.reserve(queued_.size());
    for (const QueuedJob& q : queued_) views.push_back(ViewOf(q));
    QueuedJobView mine;
    mine.sequence = sequence;
    mine.priority = request.priority;
    mine.arrival = now;
    mine.deadline = deadline;
    const int position = QueuePosition(views, mine, now, options_.scheduler);

    absl::BitGen gen;
    std::string id = absl::StrFormat("job-%d-%08x", sequence, absl::Uniform<uint32_t>(gen));
    handle = std::make_shared<JobHandle>(std::move(id), sequence, std::move(request), now,
                                         deadline);
    handle->set_queue_position(position);
    // Pushed before the job becomes visible to the executor thread, so `accepted` is first.
    v1::GenerateEvent event;
    v1::JobAccepted* accepted = event.mutable_accepted();
    accepted->set_job_id(handle->id());
    accepted->set_queue_position(position);
    *accepted->mutable_resolved_request() = handle->request().resolved;
    handle->events().Push(std::move(event));
    queued_.push_back(QueuedJob{handle});
    // A higher-priority arrival moves the jobs it overtakes back. A job that has to wait learns
    // its ETA at once.
    const bool waits = position > 0 || running_count_ >= options_.scheduler.max_running_jobs;
    ReportQueuePositionsLocked(waits ? sequence : 0);
    if (options_.metrics) options_.metrics->SetQueueDepth(static_cast<int>(queued_.size()));
  }
  return handle;
}

void Executor::ThreadMain() {
  absl::Status loaded = LoadModel();
  {
    absl::MutexLock lock(&mu_);
    load_status_ = loaded;
  }
  if (options_.metrics) options_.metrics->SetModelReady(loaded.ok());
  if (options_.on_ready) options_.on_ready(loaded);
  {
    absl::MutexLock lock(&mu_);
    ready_reported_ = true;
  }

  if (loaded.ok()) {
    while (true) {
      if (RunOnce()) continue;
      absl::MutexLock lock(&mu_);
      if (stopping_ && queued_.empty()) break;
      // Nothing runs (RunOnce only idles with no running job): sleep until work or Stop().
      auto wake = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queued_.empty();
      };
      mu_.Await(absl::Condition(&wake));
    }
  } else {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&stopping_));
  }
  running_.clear();
  preempted_.clear();
  pipeline_.reset();  // on the owning thread
  if (options_.metrics) options_.metrics->SetModelReady(false);
}

absl::Status Executor::LoadModel() {
  const absl::Time t0 = options_.clock->Now();
  absl::StatusOr<std::unique_ptr<engine::Pipeline>> pipeline =
      GuardEngineCall("Pipeline::Create", [&] { return options_.create_pipeline(); });
  if (!pipeline.ok()) return pipeline.status();
  if (*pipeline == nullptr) return absl::InternalError("the pipeline factory returned null");
  pipeline_ = *std::move(pipeline);
  {
    absl::MutexLock lock(&mu_);
    model_info_ = LoadedModelInfo{pipeline_->model(), pipeline_->device_name()};
  }
  const absl::Time t1 = options_.clock->Now();
  LogInfo(absl::StrFormat("model %s loaded on %s in %.2f s", pipeline_->model().name,
                          pipeline_->device_name(), Seconds(t1 - t0)));
  if (options_.warmup) {
    absl::Status warm = GuardEngineCall("Pipeline::Warmup", [&] { return pipeline_->Warmup(); });
    if (!warm.ok()) {
      return absl::Status(warm.code(), absl::StrCat("warm-up failed: ", warm.message()));
    }
    LogInfo(absl::StrFormat("warm-up done in %.2f s", Seconds(options_.clock->Now() - t1)));
  }
  UpdateDeviceMemory();  // the weights' footprint and the device size, before any request
  return absl::OkStatus();
}

template <typename Fn>
auto Executor::TimedEngineCall(const char* what, Fn&& fn) -> decltype(fn()) {
  const bool cpu = static_cast<bool>(options_.on_iteration);
  const double cpu0 = cpu ? ThreadCpuSeconds() : 0;
  const SteadyClock::time_point t0 = SteadyClock::now();
  auto result = GuardEngineCall(what, std::forward<Fn>(fn));
  iteration_engine_seconds_ += SecondsSince(t0);
  if (cpu) iteration_engine_cpu_seconds_ += ThreadCpuSeconds() - cpu0;
  return result;
}

QueuedJobView Executor::ViewOf(const QueuedJob& q) const {
  QueuedJobView view;
  view.sequence = q.handle->sequence();
  view.priority = q.handle->request().priority;
  view.arrival = q.handle->accepted_time();
  view.deadline = q.handle->deadline();
  return view;
}

bool Executor::RunOnce() {
  const double cpu0 = options_.on_iteration ? ThreadCpuSeconds() : 0;
  const SteadyClock::time_point t0 = SteadyClock::now();
  iteration_engine_seconds_ = 0;
  iteration_engine_cpu_seconds_ = 0;
  ReapStoppedJobs();

  SchedulerSnapshot snapshot;
  snapshot.now = options_.clock->Now();
  {
    absl::MutexLock lock(&mu_);
    snapshot.queued.reserve(queued_.size());
    for (const QueuedJob& q : queued_) snapshot.queued.push_back(ViewOf(q));
  }
  snapshot.running.reserve(running_.size());
  for (const RunningJob& r : running_) {
    RunningJobView view;
    view.sequence = r.handle->sequence();
    view.batch_key = r.job->BatchKey();
    view.steps_done = r.job->steps_done();
    view.total_steps = r.job->total_steps();
    view.priority = r.handle->request().priority;
    view.arrival = r.handle->accepted_time();
    view.tokens = r.tokens;
    view.deadline = r.handle->deadline();
    view.start_order = r.start_order;
    view.steps_at_start = r.steps_at_start;
    view.preemptions = r.preemptions;
    snapshot.running.push_back(std::move(view));
  }
  SchedulerConfig policy_config = options_.scheduler;
  if (oom_token_cap_ > 0 &&
      (policy_config.max_batch_tokens == 0 || oom_token_cap_ < policy_config.max_batch_tokens)) {
    policy_config.max_batch_tokens = oom_token_cap_;
  }
  const SchedulerAction action = ChooseNextAction(snapshot, policy_config);
  switch (action.kind) {
    case SchedulerAction::Kind::kIdle:
      return false;
    case SchedulerAction::Kind::kStart: {
      std::shared_ptr<JobHandle> handle;
      {
        absl::MutexLock lock(&mu_);
        auto it = std::find_if(queued_.begin(), queued_.end(), [&](const QueuedJob& q) {
          return q.handle->sequence() == action.jobs.front();
        });
        handle = std::move(it->handle);
        queued_.erase(it);
      }
      auto preempted = preempted_.find(handle->sequence());
      if (preempted != preempted_.end()) {
        RunningJob job = std::move(preempted->second);
        preempted_.erase(preempted);
        ResumeJob(std::move(job));
      } else {
        StartJob(std::move(handle));
      }
      break;
    }
    case SchedulerAction::Kind::kPreempt:
      PreemptJob(action.jobs.front());
      break;
    case SchedulerAction::Kind::kStep:
      StepJobs(action.jobs);
      break;
    case SchedulerAction::Kind::kFinish:
      FinishJob(action.jobs.front());
      break;
  }
  // Aging and arrivals reorder the queue even when no job left it.
  ReportQueuePositions();
  UpdateGauges();
  if (options_.metrics || options_.on_iteration) {
    IterationTiming timing;
    timing.action = action.kind;
    timing.batch_size = static_cast<int>(action.jobs.size());
    timing.total_seconds = SecondsSince(t0);
    timing.engine_seconds = iteration_engine_seconds_;
    if (options_.on_iteration) {
      timing.total_cpu_seconds = ThreadCpuSeconds() - cpu0;
      timing.engine_cpu_seconds = iteration_engine_cpu_seconds_;
    }
    if (options_.metrics) options_.metrics->ObserveSchedulerOverhead(timing.overhead_seconds());
    if (options_.on_iteration) options_.on_iteration(timing);
  }
  return true;
}

CancelReason Executor::StopReason(const JobHandle& handle, absl::Time now, bool stopping) const {
  const CancelReason requested = handle.cancel_reason();
  if (requested != CancelReason::kNone) return requested;
  if (now >= handle.deadline()) return CancelReason::kDeadline;
  if (stopping) return CancelReason::kShutdown;
  return CancelReason::kNone;
}

void Executor::EndStoppedJob(JobHandle& handle, CancelReason reason, const std::string& where) {
  if (options_.metrics) options_.metrics->CountCancellation(ToString(reason));
  switch (reason) {
    case CancelReason::kDeadline:
      EndJob(handle, absl::DeadlineExceededError(absl::StrCat("deadline exceeded ", where)),
             JobState::kDeadlineExceeded);
      break;
    case CancelReason::kShutdown:
      EndJob(handle, absl::UnavailableError(absl::StrCat("server shutting down ", where)),
             JobState::kCancelled);
      break;
    default:
      EndJob(handle, absl::CancelledError(absl::StrCat("cancelled by the client ", where)),
             JobState::kCancelled);
      break;
  }
}

void Executor::ReapStoppedJobs() {
  const absl::Time now = options_.clock->Now();
  std::vector<std::pair<std::shared_ptr<JobHandle>, CancelReason>> stopped_queued;
  bool stopping;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
    auto keep = std::stable_partition(queued_.begin(), queued_.end(), [&](const QueuedJob& q) {
      return StopReason(*q.handle, now, stopping) == CancelReason::kNone;
    });
    for (auto it = keep; it != queued_.end(); ++it) {
      stopped_queued.emplace_back(it->handle, StopReason(*it->handle, now, stopping));
    }
    queued_.erase(keep, queued_.end());
  }
  for (auto& [handle, reason] : stopped_queued) {
    std::string where = "while queued";
    auto preempted = preempted_.find(handle->sequence());
    if (preempted != preempted_.end()) {
      const engine::GenerationJob& job = *preempted->second.job;
      where = absl::StrCat("while preempted after step ", job.steps_done(), "/",
                           job.total_steps());
      preempted_.erase(preempted);  // free its state before telling the client
    }
    EndStoppedJob(*handle, reason, where);
  }

  bool any_running_stopped = false;
  for (auto it = running_.begin(); it != running_.end();) {
    const CancelReason reason = StopReason(*it->handle, now, stopping);
    if (reason == CancelReason::kNone) {
      ++it;
      continue;
    }
    const std::string where =
        absl::StrCat("after step ", it->job->steps_done(), "/", it->job->total_steps());
    it->job.reset();  // free the latents before telling the client
    EndStoppedJob(*it->handle, reason, where);
    it = running_.erase(it);
    any_running_stopped = true;
  }
  if (!stopped_queued.empty()) ReportQueuePositions();
  if (!stopped_queued.empty() || any_running_stopped) UpdateGauges();
}

void Executor::StartJob(std::shared_ptr<JobHandle> handle) {
  const engine::GenerationRequest& request = handle->request().engine;
  handle->set_state(JobState::kRunning);
  const absl::Time started = options_.clock->Now();
  RunningJob running;
  running.handle = handle;
  running.started = started;
  running.start_order = next_start_order_++;
  {
    absl::MutexLock lock(&mu_);
    if (model_info_.has_value()) running.tokens = DitTokens(request, model_info_->description);
  }
  running.queue_wait_seconds = Seconds(started - handle->accepted_time());
  if (options_.metrics) options_.metrics->ObserveQueueWait(running.queue_wait_seconds);

  PushProgress(*handle, v1::STAGE_TEXT_ENCODE, 0, request.num_steps, 0.0f,
               request.num_steps * step_seconds_per_mvoxel_ * MegaVoxels(request) +
                   finish_seconds_per_mvoxel_ * MegaVoxels(request));
  absl::StatusOr<std::unique_ptr<engine::GenerationJob>> job =
      TimedEngineCall("Pipeline::Start", [&] { return pipeline_->Start(request); });
  running.text_encode_seconds = Seconds(options_.clock->Now() - started);
  if (!job.ok()) {
    EndJob(*handle, job.status(), JobState::kFailed);
    return;
  }
  if (*job == nullptr) {
    EndJob(*handle, absl::InternalError("Pipeline::Start returned no job"), JobState::kFailed);
    return;
  }
  if (options_.metrics) options_.metrics->ObserveTextEncode(running.text_encode_seconds);
  running.job = *std::move(job);
  running.steps_at_start = running.job->steps_done();
  running_.push_back(std::move(running));
}

void Executor::ResumeJob(RunningJob job) {
  job.handle->set_state(JobState::kRunning);
  job.start_order = next_start_order_++;
  job.steps_at_start = job.job->steps_done();
  // The client learns it runs again, and from which step.
  PushProgress(*job.handle, v1::STAGE_DENOISE, job.job->steps_done(), job.job->total_steps(),
               0.0f, EstimateRemainingSeconds(job));
  running_.push_back(std::move(job));
}

void Executor::PreemptJob(uint64_t sequence) {
  auto it = std::find_if(running_.begin(), running_.end(),
                         [&](const RunningJob& r) { return r.handle->sequence() == sequence; });
  RunningJob job = std::move(*it);
  running_.erase(it);
  ++job.preemptions;
  const std::shared_ptr<JobHandle> handle = job.handle;
  LogInfo(absl::StrCat(handle->id(), " preempted after step ", job.job->steps_done(), "/",
                       job.job->total_steps(), " (preemption ", job.preemptions, ")"));
  if (options_.metrics) options_.metrics->CountPreemption();
  const int steps_done = job.job->steps_done();
  const double work = RemainingWorkSeconds(handle->request().engine, steps_done,
                                           step_seconds_per_mvoxel_, finish_seconds_per_mvoxel_);
  preempted_.emplace(sequence, std::move(job));
  absl::MutexLock lock(&mu_);
  handle->set_state(JobState::kQueued);
  // Its remaining work now counts as queued, ahead of or behind others by its rank.
  running_work_seconds_ = std::max(0.0, running_work_seconds_ - work);
  queued_.push_back(QueuedJob{handle, steps_done});
  ReportQueuePositionsLocked(sequence);
}

void Executor::StepJobs(const std::vector<uint64_t>& sequences) {
  std::vector<RunningJob*> batch;
  for (uint64_t sequence : sequences) {
    for (RunningJob& r : running_) {
      if (r.handle->sequence() == sequence) batch.push_back(&r);
    }
  }
  std::vector<int> steps_before;
  for (RunningJob* r : batch) steps_before.push_back(r->job->steps_done());
  absl::Status status = RunStep(batch);
  if (!status.ok() && status.code() == absl::StatusCode::kResourceExhausted && batch.size() > 1) {
    // Out of device memory for the batch (the engine has freed its cache): the jobs may still fit
    // one at a time. Only a job that does not fit alone fails.
    int64_t tokens = 0;
    for (RunningJob* r : batch) tokens += r->tokens;
    // Learn the limit, so that the next steps do not fail the same way first.
    if (tokens > 1 && (oom_token_cap_ == 0 || tokens - 1 < oom_token_cap_)) {
      oom_token_cap_ = tokens - 1;
    }
    steps_since_oom_ = 0;
    LogWarning(absl::StrCat("a batch of ", batch.size(), " jobs (", tokens,
                            " DiT tokens) ran out of memory; retrying them one by one and keeping "
                            "batches under ", oom_token_cap_, " tokens for ", kOomCapSteps,
                            " steps: ", status.message()));
    for (size_t i = 0; i < batch.size(); ++i) {
      RunningJob* r = batch[i];
      // A job the failed call advanced anyway has had its step.
      if (r->job->steps_done() != steps_before[i]) continue;
      absl::Status single = RunStep({r});
      if (!single.ok()) {
        r->job.reset();
        EndJob(*r->handle, single, JobState::kFailed);
      }
    }
  } else if (!status.ok()) {
    // The whole batch shared the failed call; each of its jobs fails, nothing else does.
    for (RunningJob* r : batch) {
      r->job.reset();
      EndJob(*r->handle, status, JobState::kFailed);
    }
  }
  if (!status.ok()) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const RunningJob& r) { return r.job == nullptr; }),
                   running_.end());
  } else if (oom_token_cap_ > 0 && ++steps_since_oom_ >= kOomCapSteps) {
    LogInfo(absl::StrCat("lifting the out-of-memory batch cap of ", oom_token_cap_, " tokens"));
    oom_token_cap_ = 0;
  }
  UpdateDeviceMemory();
}

absl::Status Executor::RunStep(const std::vector<RunningJob*>& batch) {
  std::vector<engine::GenerationJob*> jobs;
  jobs.reserve(batch.size());
  for (RunningJob* r : batch) jobs.push_back(r->job.get());
  std::vector<engine::StepStats> stats;
  const absl::Time t0 = options_.clock->Now();
  absl::Status status = TimedEngineCall("Pipeline::Step", [&] {
    return pipeline_->Step(absl::MakeConstSpan(jobs), &stats);
  });
  const double seconds = Seconds(options_.clock->Now() - t0);
  if (status.ok() && stats.size() != jobs.size()) {
    status = absl::InternalError(absl::StrCat("Pipeline::Step returned ", stats.size(),
                                              " stats for ", jobs.size(), " jobs"));
  }
  if (!status.ok()) return status;
  if (options_.metrics) {
    options_.metrics->ObserveDenoiseStep(seconds);
    // Attention time is the batched step's, the same in every job's stats: count it once.
    options_.metrics->AddAttentionSeconds(stats.empty() ? 0.0 : stats[0].attention_seconds);
    options_.metrics->ObserveBatchSize(static_cast<int>(batch.size()));
  }
  double batch_mvoxels = 0;
  for (RunningJob* r : batch) batch_mvoxels += MegaVoxels(r->handle->request().engine);
  if (batch_mvoxels > 0) Smooth(&step_seconds_per_mvoxel_, seconds / batch_mvoxels);

  for (size_t i = 0; i < batch.size(); ++i) {
    RunningJob& r = *batch[i];
    r.denoise_seconds += seconds;
    r.sparsity_sum += stats[i].achieved_sparsity;
    ++r.sparsity_count;
    if (options_.metrics) options_.metrics->ObserveSparsity(stats[i].achieved_sparsity);
    PushProgress(*r.handle, v1::STAGE_DENOISE, r.job->steps_done(), r.job->total_steps(),
                 stats[i].achieved_sparsity, EstimateRemainingSeconds(r));
  }
  return absl::OkStatus();
}

void Executor::FinishJob(uint64_t sequence) {
  auto it = std::find_if(running_.begin(), running_.end(),
                         [&](const RunningJob& r) { return r.handle->sequence() == sequence; });
  RunningJob r = std::move(*it);
  running_.erase(it);
  JobHandle& handle = *r.handle;
  const ResolvedRequest& request = handle.request();
  const int steps = r.job->total_steps();
  const float mean_sparsity =
      r.sparsity_count > 0 ? static_cast<float>(r.sparsity_sum / r.sparsity_count) : 0.0f;
  const double mvoxels = MegaVoxels(request.engine);

  PushProgress(handle, v1::STAGE_VAE_DECODE, steps, steps, mean_sparsity,
               finish_seconds_per_mvoxel_ * mvoxels);
  const absl::Time t0 = options_.clock->Now();
  absl::StatusOr<engine::VideoFrames> decoded =
      TimedEngineCall("Pipeline::Decode", [&] { return pipeline_->Decode(*r.job); });
  r.job.reset();  // latents are no longer needed
  const absl::Time t1 = options_.clock->Now();
  if (!decoded.ok()) {
    EndJob(handle, decoded.status(), JobState::kFailed);
    return;
  }
  const CancelReason stop = StopReason(handle, t1, /*stopping=*/false);
  if (stop != CancelReason::kNone) {
    EndStoppedJob(handle, stop, "after decoding");
    return;
  }

  PushProgress(handle, v1::STAGE_VIDEO_ENCODE, steps, steps, mean_sparsity,
               0.5 * finish_seconds_per_mvoxel_ * mvoxels);
  const engine::VideoContainer container = request.output_format == OutputFormat::kPngFrames
                                               ? engine::VideoContainer::kPngTar
                                               : engine::VideoContainer::kMp4;
  absl::StatusOr<engine::EncodedVideo> video;
  {
    const engine::VideoFrames frames = *std::move(decoded);  // freed at the end of this scope
    video = TimedEngineCall(
        "EncodeVideo", [&] { return options_.encode_video(frames, request.fps, container); });
  }
  const absl::Time t2 = options_.clock->Now();
  if (video.ok() && video->data.empty()) {
    video = absl::InternalError("the video encoder produced an empty file");
  }
  if (!video.ok()) {
    EndJob(handle, video.status(), JobState::kFailed);
    return;
  }

  const std::string& data = video->data;
  const int64_t size = static_cast<int64_t>(data.size());
  for (int64_t offset = 0; offset < size; offset += options_.output_chunk_bytes) {
    v1::GenerateEvent event;
    v1::OutputChunk* chunk = event.mutable_chunk();
    chunk->set_offset(offset);
    chunk->set_data(data.substr(offset, options_.output_chunk_bytes));
    handle.events().Push(std::move(event));
  }

  const double decode_seconds = Seconds(t1 - t0);
  const double encode_seconds = Seconds(t2 - t1);
  const double total_seconds = Seconds(t2 - handle.accepted_time());
  if (mvoxels > 0) Smooth(&finish_seconds_per_mvoxel_, (decode_seconds + encode_seconds) / mvoxels);

  v1::GenerateEvent event;
  v1::GenerateCompleted* done = event.mutable_completed();
  done->set_job_id(handle.id());
  done->set_content_type(video->content_type);
  done->set_file_size_bytes(size);
  done->set_width(request.engine.width);
  done->set_height(request.engine.height);
  done->set_num_frames(request.engine.num_frames);
  done->set_fps(request.fps);
  done->set_seed(request.engine.seed);
  done->set_mean_achieved_sparsity(mean_sparsity);
  done->set_queue_wait_seconds(r.queue_wait_seconds);
  done->set_text_encode_seconds(r.text_encode_seconds);
  done->set_denoise_seconds(r.denoise_seconds);
  done->set_vae_decode_seconds(decode_seconds);
  done->set_video_encode_seconds(encode_seconds);
  done->set_total_seconds(total_seconds);
  handle.events().Push(std::move(event));
  handle.set_state(JobState::kSucceeded);
  handle.events().Close(absl::OkStatus());

  if (options_.metrics) {
    options_.metrics->ObserveVaeDecode(decode_seconds);
    options_.metrics->ObserveVideoEncode(encode_seconds);
    options_.metrics->ObserveRequestDuration(total_seconds);
    options_.metrics->AddOutputBytes(size);
  }
}

void Executor::EndJob(JobHandle& handle, const absl::Status& status, JobState state) {
  handle.set_state(state);
  if (state == JobState::kFailed) {
    LogWarning(absl::StrCat(handle.id(), " failed: ", status.ToString()));
  }
  handle.events().Close(status);
}

void Executor::PushProgress(JobHandle& handle, v1::Stage stage, int step, int total_steps,
                            float sparsity, double eta_seconds) {
  v1::GenerateEvent event;
  v1::JobProgress* progress = event.mutable_progress();
  progress->set_stage(stage);
  progress->set_step(step);
  progress->set_total_steps(total_steps);
  progress->set_achieved_sparsity(sparsity);
  progress->set_elapsed_seconds(Seconds(options_.clock->Now() - handle.accepted_time()));
  progress->set_eta_seconds(std::max(0.0, eta_seconds));
  handle.events().Push(std::move(event));
}

void Executor::ReportQueuePositions() {
  absl::MutexLock lock(&mu_);
  ReportQueuePositionsLocked();
}

void Executor::ReportQueuePositionsLocked(uint64_t also) {
  // Pushed under mu_ so that updates computed by Submit (gRPC thread) and by the executor thread
  // reach each channel in the order they were computed.
  if (queued_.empty()) return;
  const absl::Time now = options_.clock->Now();
  std::vector<QueuedJobView> views;
  views.reserve(queued_.size());
  std::unordered_map<uint64_t, QueuedJob*> by_sequence;
  by_sequence.reserve(queued_.size());
  for (QueuedJob& q : queued_) {
    views.push_back(ViewOf(q));
    by_sequence[q.handle->sequence()] = &q;
  }
  const std::vector<uint64_t> order = QueueOrder(views, now, options_.scheduler);
  // Each job waits for the running jobs' remaining work and that of every job ahead of it.
  double work_ahead = running_work_seconds_;
  for (size_t position = 0; position < order.size(); ++position) {
    QueuedJob& q = *by_sequence[order[position]];
    const engine::GenerationRequest& request = q.handle->request().engine;
    const double own = RemainingWorkSeconds(request, q.steps_done, queue_step_seconds_per_mvoxel_,
                                            queue_finish_seconds_per_mvoxel_);
    const double eta = work_ahead + own;
    work_ahead += own;
    const int p = static_cast<int>(position);
    if (p == q.handle->queue_position() && q.handle->sequence() != also) continue;
    q.handle->set_queue_position(p);
    v1::GenerateEvent event;
    v1::JobProgress* progress = event.mutable_progress();
    progress->set_stage(v1::STAGE_QUEUED);
    progress->set_step(q.steps_done);
    progress->set_total_steps(request.num_steps);
    progress->set_queue_position(p);
    progress->set_elapsed_seconds(Seconds(now - q.handle->accepted_time()));
    progress->set_eta_seconds(eta);
    q.handle->events().Push(std::move(event));
  }
}

double Executor::EstimateRemainingSeconds(const RunningJob& r) const {
  const engine::GenerationRequest& request = r.handle->request().engine;
  const int done = r.job ? r.job->steps_done() : request.num_steps;
  const double mvoxels = MegaVoxels(request);
  const double per_step =
      done > 0 ? r.denoise_seconds / done : step_seconds_per_mvoxel_ * mvoxels;
  return (request.num_steps - done) * per_step + finish_seconds_per_mvoxel_ * mvoxels;
}

void Executor::UpdateGauges() {
  int depth;
  double running_work = 0;
  for (const RunningJob& r : running_) {
    if (r.job == nullptr) continue;
    running_work += RemainingWorkSeconds(r.handle->request().engine, r.job->steps_done(),
                                         step_seconds_per_mvoxel_, finish_seconds_per_mvoxel_);
  }
  {
    absl::MutexLock lock(&mu_);
    running_count_ = static_cast<int>(running_.size());
    depth = static_cast<int>(queued_.size());
    running_work_seconds_ = running_work;
    queue_step_seconds_per_mvoxel_ = step_seconds_per_mvoxel_;
    queue_finish_seconds_per_mvoxel_ = finish_seconds_per_mvoxel_;
  }
  if (options_.metrics) {
    options_.metrics->SetQueueDepth(depth);
    options_.metrics->SetRunningJobs(static_cast<int>(running_.size()));
    int64_t state_bytes = 0;
    for (const RunningJob& r : running_) {
      if (r.job != nullptr) state_bytes += r.job->state_bytes();
    }
    // Preempted jobs keep their state on the device.
    for (const auto& [sequence, r] : preempted_) state_bytes += r.job->state_bytes();
    options_.metrics->SetJobStateBytes(state_bytes);
  }
}

void Executor::UpdateDeviceMemory() {
  if (!options_.metrics) return;
  const bool cpu = static_cast<bool>(options_.on_iteration);
  const double cpu0 = cpu ? ThreadCpuSeconds() : 0;
  const SteadyClock::time_point t0 = SteadyClock::now();
  const engine::DeviceMemoryStats memory = pipeline_->memory_stats();
  iteration_engine_seconds_ += SecondsSince(t0);
  if (cpu) iteration_engine_cpu_seconds_ += ThreadCpuSeconds() - cpu0;
  options_.metrics->SetDeviceMemory(memory.allocated_bytes, memory.reserved_bytes,
                                    memory.total_bytes);
}

}  // namespace sparge::server
