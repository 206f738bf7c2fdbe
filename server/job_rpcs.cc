// The job RPCs of VideoServiceImpl (declared in video_service.h): SubmitJob, GetJob, WatchJob,
// CancelJob, ListJobs and GetJobResult, over the JobStore and the jobs' event channels.
#include <atomic>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/grpc_status.h"
#include "server/job_store.h"
#include "server/video_service.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;

constexpr size_t kMaxIdempotencyKeyBytes = 128;
constexpr double kMaxTimeoutSeconds = 7 * 24 * 3600;

absl::Status ValidateIdempotencyKey(absl::string_view key) {
  bool ok = key.size() <= kMaxIdempotencyKeyBytes;
  for (char c : key) {
    ok &= absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
          c == '-' || c == ':';
  }
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "idempotency_key: must be at most 128 characters of [A-Za-z0-9._:-], got \"",
      absl::CHexEscape(key.substr(0, 160)), key.size() > 160 ? "...\"" : "\""));
}

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// The final status a finished job's watchers get: OK for SUCCEEDED, else its error.
absl::Status FinalStatus(const v1::Job& job) {
  if (job.state() == v1::JOB_STATE_SUCCEEDED) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(job.error().code()), job.error().message());
}

// WatchJob: a live job's events through a watcher of its channel, or a finished job's replay
// built from its record. Lives until gRPC calls OnDone. Lock order: the channel's listener lock,
// then mu_, then the channel's data lock.
class WatchReactor final : public grpc::ServerWriteReactor<v1::GenerateEvent> {
 public:
  WatchReactor(JobStore* jobs, const v1::WatchJobRequest& request) {
    absl::Status valid = ValidateJobId(request.job_id());
    absl::StatusOr<JobStore::Entry> entry =
        valid.ok() ? jobs->Find(request.job_id()) : absl::StatusOr<JobStore::Entry>(valid);
    if (!entry.ok()) {
      absl::MutexLock lock(&mu_);
      FinishLocked(entry.status());
      return;
    }
    if (entry->handle != nullptr) {
      handle_ = std::move(entry->handle);
      const int watcher = handle_->events().AddWatcher([this] {
        absl::MutexLock lock(&mu_);
        // The listener may run before AddWatcher has returned our id: the constructor's own
        // WriteNextLocked below picks up what arrived meanwhile.
        if (watcher_ != 0) WriteNextLocked();
      });
      absl::MutexLock lock(&mu_);
      watcher_ = watcher;
    } else {
      const v1::Job& job = entry->job;
      v1::GenerateEvent accepted;
      accepted.mutable_accepted()->set_job_id(job.job_id());
      *accepted.mutable_accepted()->mutable_resolved_request() = job.request();
      replay_.push_back(std::move(accepted));
      if (job.has_progress()) {
        v1::GenerateEvent progress;
        *progress.mutable_progress() = job.progress();
        replay_.push_back(std::move(progress));
      }
      if (job.state() == v1::JOB_STATE_SUCCEEDED) {
        v1::GenerateEvent completed;
        *completed.mutable_completed() = job.result().completed();
        replay_.push_back(std::move(completed));
      }
      replay_status_ = FinalStatus(job);
    }
    absl::MutexLock lock(&mu_);
    WriteNextLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      // The watcher went away; the job is not affected.
      FinishLocked(absl::CancelledError("the client stopped reading the stream"));
      return;
    }
    WriteNextLocked();
  }

  void OnDone() override {
    if (handle_) {
      int watcher;
      {
        absl::MutexLock lock(&mu_);
        watcher = watcher_;
      }
      handle_->events().RemoveWatcher(watcher);  // waits out a listener call in progress
    }
    delete this;
  }

 private:
  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return;
    JobEventChannel::Item item;
    if (handle_) {
      item = handle_->events().TryPopWatcher(watcher_);
    } else if (!replay_.empty()) {
      item.event = std::move(replay_.front());
      replay_.pop_front();
    } else {
      item.final_status = replay_status_;
    }
    if (item.event.has_value()) {
      current_ = *std::move(item.event);
      writing_ = true;
      StartWrite(&current_);
    } else if (item.final_status.has_value()) {
      FinishLocked(*item.final_status);
    }
  }

  void FinishLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(ToGrpcStatus(status));
  }

  std::shared_ptr<JobHandle> handle_;  // live jobs; set once in the constructor
  int watcher_ ABSL_GUARDED_BY(mu_) = 0;  // 0 until AddWatcher has returned
  std::deque<v1::GenerateEvent> replay_;  // finished jobs
  absl::Status replay_status_;
  absl::Mutex mu_;
  v1::GenerateEvent current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

// GetJobResult: the stored file, read from disk one chunk per write.
class ResultReactor final : public grpc::ServerWriteReactor<v1::JobResultChunk> {
 public:
  ResultReactor(JobStore* jobs, int64_t chunk_bytes, const v1::GetJobResultRequest& request)
      : chunk_bytes_(chunk_bytes) {
    if (absl::Status s = ValidateJobId(request.job_id()); !s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    absl::StatusOr<std::unique_ptr<JobResultReader>> reader = jobs->OpenResult(request.job_id());
    if (!reader.ok()) {
      Finish(ToGrpcStatus(reader.status()));
      return;
    }
    reader_ = *std::move(reader);
    if (request.offset() < 0 || request.offset() > reader_->size()) {
      Finish(ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
          "offset: must be in [0, ", reader_->size(), "], got ", request.offset()))));
      return;
    }
    offset_ = request.offset();
    WriteNext();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client stopped reading"));
      return;
    }
    WriteNext();
  }

  void OnDone() override { delete this; }

 private:
  // Called from the constructor, then only from OnWriteDone: never concurrently.
  void WriteNext() {
    if (offset_ >= reader_->size()) {
      Finish(grpc::Status::OK);
      return;
    }
    absl::StatusOr<std::string> data = reader_->ReadAt(offset_, chunk_bytes_);
    if (!data.ok()) {
      Finish(ToGrpcStatus(data.status()));
      return;
    }
    chunk_.Clear();
    chunk_.set_offset(offset_);
    chunk_.set_content_type(reader_->result().content_type());
    chunk_.set_output_format(reader_->result().output_format());
    chunk_.set_total_size_bytes(reader_->size());
    offset_ += static_cast<int64_t>(data->size());
    chunk_.set_data(*std::move(data));
    StartWrite(&chunk_);
  }

  const int64_t chunk_bytes_;
  std::unique_ptr<JobResultReader> reader_;
  int64_t offset_ = 0;
  v1::JobResultChunk chunk_;
};

}  // namespace

grpc::ServerUnaryReactor* VideoServiceImpl::SubmitJob(grpc::CallbackServerContext* context,
                                                      const v1::SubmitJobRequest* request,
                                                      v1::Job* response) {
  auto reject = [&](const absl::Status& status) {
    metrics_->CountRequest(StatusCodeName(status.code()));
    return FinishUnary(context, status);
  };
  const std::string& key = request->idempotency_key();
  if (absl::Status s = ValidateIdempotencyKey(key); !s.ok()) return reject(s);
  absl::Time deadline = absl::InfiniteFuture();
  if (request->has_timeout_seconds()) {
    const double t = request->timeout_seconds();
    if (!(t > 0 && t <= kMaxTimeoutSeconds)) {
      return reject(absl::InvalidArgumentError(absl::StrCat(
          "timeout_seconds: must be in (0, ", kMaxTimeoutSeconds, "], got ", t)));
    }
    deadline = clock_->Now() + absl::Seconds(t);
  }
  absl::StatusOr<ResolvedRequest> resolved =
      ResolveRequest(request->request(), config_->limits, config_->defaults, seed_source_);
  if (!resolved.ok()) return reject(resolved.status());

  std::optional<absl::MutexLock> keyed_lock;
  if (!key.empty()) {
    keyed_lock.emplace(&keyed_submit_mu_);
    if (std::optional<std::string> existing = jobs_->FindByIdempotencyKey(key)) {
      absl::StatusOr<JobStore::Entry> entry = jobs_->Find(*existing);
      if (entry.ok()) {
        *response = std::move(entry->job);
        return FinishUnary(context, absl::OkStatus());
      }
      // Removed by retention since the lookup: submit afresh.
    }
  }
  absl::StatusOr<std::shared_ptr<JobHandle>> handle =
      executor_->Submit(*std::move(resolved), deadline);
  if (!handle.ok()) return reject(handle.status());
  jobs_->Track(*handle, v1::JOB_ORIGIN_SUBMIT_JOB, key);
  // Nobody reads this job's stream as its owner: keep no events (and no chunks) for one.
  (*handle)->events().DetachPrimary();
  absl::StatusOr<JobStore::Entry> entry = jobs_->Find((*handle)->id());
  if (!entry.ok()) return FinishUnary(context, entry.status());  // removed already: not expected
  *response = std::move(entry->job);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* VideoServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                   const v1::GetJobRequest* request,
                                                   v1::Job* response) {
  if (absl::Status s = ValidateJobId(request->job_id()); !s.ok()) return FinishUnary(context, s);
  absl::StatusOr<JobStore::Entry> entry = jobs_->Find(request->job_id());
  if (!entry.ok()) return FinishUnary(context, entry.status());
  *response = std::move(entry->job);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerWriteReactor<v1::GenerateEvent>* VideoServiceImpl::WatchJob(
    grpc::CallbackServerContext* /*context*/, const v1::WatchJobRequest* request) {
  return new WatchReactor(jobs_, *request);
}

grpc::ServerUnaryReactor* VideoServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                      const v1::CancelJobRequest* request,
                                                      v1::Job* response) {
  if (absl::Status s = ValidateJobId(request->job_id()); !s.ok()) return FinishUnary(context, s);
  absl::StatusOr<JobStore::Entry> entry = jobs_->Find(request->job_id());
  if (!entry.ok()) return FinishUnary(context, entry.status());
  if (entry->handle == nullptr) {
    *response = std::move(entry->job);  // already ended: nothing to do
    return FinishUnary(context, absl::OkStatus());
  }
  std::shared_ptr<JobHandle> handle = std::move(entry->handle);
  handle->Cancel(CancelReason::kClient);

  // Answer once the executor has ended the job (at its next step boundary). The listener holds
  // no reference to the handle (the handle owns it); the executor keeps the handle alive while
  // it closes the channel, and answering does not need it.
  struct Pending {
    JobStore* jobs;
    std::string id;
    v1::Job* response;
    grpc::ServerUnaryReactor* reactor;
    std::atomic<bool> answered{false};
    void Answer() {
      if (answered.exchange(true)) return;
      absl::StatusOr<JobStore::Entry> final_entry = jobs->Find(id);
      if (final_entry.ok()) *response = std::move(final_entry->job);
      reactor->Finish(ToGrpcStatus(final_entry.status()));
    }
  };
  auto pending = std::make_shared<Pending>();
  pending->jobs = jobs_;
  pending->id = handle->id();
  pending->response = response;
  pending->reactor = context->DefaultReactor();
  JobEventChannel& events = handle->events();
  events.AddWatcher([pending, &events] {
    if (events.closed()) pending->Answer();
  });
  if (events.closed()) pending->Answer();  // ended before the watcher was in place
  return pending->reactor;
}

grpc::ServerUnaryReactor* VideoServiceImpl::ListJobs(grpc::CallbackServerContext* context,
                                                     const v1::ListJobsRequest* request,
                                                     v1::ListJobsResponse* response) {
  absl::StatusOr<v1::ListJobsResponse> page = jobs_->List(*request);
  if (page.ok()) *response = *std::move(page);
  return FinishUnary(context, page.status());
}

grpc::ServerWriteReactor<v1::JobResultChunk>* VideoServiceImpl::GetJobResult(
    grpc::CallbackServerContext* /*context*/, const v1::GetJobResultRequest* request) {
  return new ResultReactor(jobs_, config_->output_chunk_bytes, *request);
}

}  // namespace sparge::server
