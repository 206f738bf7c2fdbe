#include "server/job_store.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "google/protobuf/util/json_util.h"
#include "server/grpc_status.h"
#include "server/log.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 1000;
constexpr int64_t kMaxMetadataBytes = 1 << 20;
constexpr char kMetadataSuffix[] = ".json";
constexpr char kTokenPrefix[] = "jobs-before:";

google::protobuf::Timestamp ToTimestamp(absl::Time t) {
  const int64_t nanos = absl::ToUnixNanos(t);
  google::protobuf::Timestamp ts;
  int64_t seconds = nanos / 1000000000;
  int64_t rest = nanos % 1000000000;
  if (rest < 0) {
    rest += 1000000000;
    --seconds;
  }
  ts.set_seconds(seconds);
  ts.set_nanos(static_cast<int32_t>(rest));
  return ts;
}

absl::Time FromTimestamp(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

bool IsFinal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED || state == v1::JOB_STATE_DEADLINE_EXCEEDED;
}

void SetError(const absl::Status& status, v1::Job* job) {
  v1::JobError* error = job->mutable_error();
  error->set_code(static_cast<int32_t>(status.code()));
  error->set_code_name(StatusCodeName(status.code()));
  error->set_message(std::string(status.message()));
}

const char* Extension(v1::OutputFormat format) {
  return format == v1::OUTPUT_FORMAT_PNG_FRAMES ? "tar" : "mp4";
}

std::string EncodePageToken(uint64_t order) {
  return absl::WebSafeBase64Escape(absl::StrCat(kTokenPrefix, order));
}

absl::StatusOr<uint64_t> DecodePageToken(absl::string_view token) {
  // Never echo the token itself: it may be long or binary.
  const absl::Status bad = absl::InvalidArgumentError(
      "page_token: must be empty or a next_page_token returned by ListJobs");
  std::string raw;
  if (!absl::WebSafeBase64Unescape(token, &raw)) return bad;
  absl::string_view rest = raw;
  uint64_t order = 0;
  if (!absl::ConsumePrefix(&rest, kTokenPrefix) || !absl::SimpleAtoi(rest, &order)) return bad;
  return order;
}

}  // namespace

JobStoreOptions JobStoreOptionsFrom(const JobStoreConfig& config, const Clock* clock) {
  JobStoreOptions options;
  options.output_dir = config.output_dir;
  options.max_results = config.max_results;
  options.result_ttl_seconds = config.result_ttl_seconds;
  options.clock = clock;
  return options;
}

absl::Status ValidateJobId(absl::string_view id, absl::string_view field) {
  bool ok = !id.empty() && id.size() <= 128 && id != "." && id != "..";
  for (char c : id) {
    ok &= absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
  }
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      field, ": must be 1-128 characters of [A-Za-z0-9._-], got \"",
      absl::CHexEscape(id.substr(0, 160)), id.size() > 160 ? "...\"" : "\""));
}

JobResultReader::~JobResultReader() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::string> JobResultReader::ReadAt(int64_t offset, int64_t max_bytes) const {
  const int64_t n = std::max<int64_t>(0, std::min(max_bytes, size_ - offset));
  std::string data(static_cast<size_t>(n), '\0');
  int64_t done = 0;
  while (done < n) {
    const ssize_t got = ::pread(fd_, data.data() + done, static_cast<size_t>(n - done),
                                static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "cannot read", "the stored result");
    }
    if (got == 0) return absl::DataLossError("the stored result is shorter than recorded");
    done += got;
  }
  return data;
}

// Follows one job's events (JobEventObserver, on the executor thread): writes the result file
// as chunks arrive and reports progress and the end to the store.
class JobStore::Recorder final : public JobEventObserver {
 public:
  // `handle` owns the channel that owns this recorder, so it outlives it.
  Recorder(JobStore* store, const JobHandle* handle, std::string temp_path)
      : store_(store), handle_(handle), temp_path_(std::move(temp_path)) {}

  void OnEvent(const v1::GenerateEvent& event) override {
    switch (event.event_case()) {
      case v1::GenerateEvent::kProgress:
        store_->OnProgress(handle_->id(), event.progress());
        break;
      case v1::GenerateEvent::kChunk:
        WriteChunk(event.chunk());
        break;
      case v1::GenerateEvent::kCompleted:
        store_->OnCompleted(handle_->id(), event.completed());
        break;
      default:
        break;
    }
  }

  void OnClose(const absl::Status& status) override {
    absl::Status stored = write_status_;
    if (status.ok() && stored.ok()) {
      if (!file_.has_value()) {
        stored = absl::InternalError("the job produced no output file");
      } else {
        const int64_t bytes = file_->size();
        stored = file_->Commit(final_path_);
        file_.reset();
        store_->OnFinished(handle_->id(), *handle_, status, stored, bytes);
        return;
      }
    }
    file_.reset();  // removes a partial file
    store_->OnFinished(handle_->id(), *handle_, status, stored, 0);
  }

 private:
  void WriteChunk(const v1::OutputChunk& chunk) {
    if (!write_status_.ok()) return;
    if (!file_.has_value()) {
      absl::StatusOr<AppendOnlyFile> file = AppendOnlyFile::Create(temp_path_);
      if (!file.ok()) {
        write_status_ = file.status();
        return;
      }
      file_ = *std::move(file);
      final_path_ = temp_path_.substr(0, temp_path_.size() - 4);  // without ".tmp"
    }
    if (chunk.offset() != file_->size()) {
      write_status_ = absl::InternalError(absl::StrCat("chunk at offset ", chunk.offset(),
                                                       ", expected ", file_->size()));
      return;
    }
    write_status_ = file_->Append(chunk.data());
  }

  JobStore* const store_;
  const JobHandle* const handle_;
  const std::string temp_path_;
  std::string final_path_;
  std::optional<AppendOnlyFile> file_;
  absl::Status write_status_;
};

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(JobStoreOptions options) {
  if (options.output_dir.empty()) {
    return absl::InvalidArgumentError("jobs.output_dir: must be non-empty");
  }
  if (options.max_results < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("jobs.max_results: must be >= 1, got ", options.max_results));
  }
  if (!(options.result_ttl_seconds > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "jobs.result_ttl_seconds: must be > 0, got ", options.result_ttl_seconds));
  }
  if (options.clock == nullptr) return absl::InvalidArgumentError("JobStore: clock is required");
  while (options.output_dir.size() > 1 && options.output_dir.back() == '/') {
    options.output_dir.pop_back();
  }
  if (absl::Status s = MakeDirectories(options.output_dir); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("jobs.output_dir: ", s.message()));
  }
  std::unique_ptr<JobStore> store(new JobStore(std::move(options)));
  absl::StatusOr<FileLock> lock = FileLock::TryAcquire(store->options_.output_dir + "/.lock");
  if (lock.ok()) {
    store->lock_ = *std::move(lock);
  } else if (lock.status().code() == absl::StatusCode::kFailedPrecondition) {
    LogWarning(absl::StrCat("jobs.output_dir ", store->options_.output_dir,
                            " is in use by another server: its unfinished jobs are left alone "
                            "and nothing is removed at startup"));
  } else {
    return lock.status();
  }
  if (absl::Status s = store->Load(); !s.ok()) return s;
  if (store->exclusive()) store->ApplyRetention();
  return store;
}

JobStore::JobStore(JobStoreOptions options) : options_(std::move(options)) {}

JobStore::~JobStore() = default;

std::string JobStore::MetadataPath(absl::string_view id) const {
  return absl::StrCat(options_.output_dir, "/", id, kMetadataSuffix);
}

std::string JobStore::ResultPath(const v1::Job& job) const {
  return absl::StrCat(options_.output_dir, "/", job.job_id(), ".",
                      Extension(job.request().output_format()));
}

absl::Status JobStore::Load() {
  absl::StatusOr<std::vector<std::string>> names = ListDirectory(options_.output_dir);
  if (!names.ok()) return names.status();
  const absl::Time now = options_.clock->Now();
  std::vector<Record> loaded;
  int interrupted = 0;
  for (const std::string& name : *names) {
    if (absl::EndsWith(name, ".tmp")) {
      // A file being written when a previous server stopped.
      if (exclusive()) RemoveFile(absl::StrCat(options_.output_dir, "/", name)).IgnoreError();
      continue;
    }
    if (!absl::EndsWith(name, kMetadataSuffix)) continue;
    const std::string id = name.substr(0, name.size() - std::strlen(kMetadataSuffix));
    const std::string path = MetadataPath(id);
    absl::StatusOr<std::string> text = ReadSmallFile(path, kMaxMetadataBytes);
    Record record;
    if (!text.ok() || !ValidateJobId(id).ok() ||
        !google::protobuf::util::JsonStringToMessage(*text, &record.job).ok() ||
        record.job.job_id() != id) {
      LogWarning(absl::StrCat("ignoring unreadable job metadata ", path));
      continue;
    }
    v1::Job& job = record.job;
    if (!IsFinal(job.state())) {
      if (!exclusive()) continue;  // another live server's job
      job.set_state(v1::JOB_STATE_FAILED);
      SetError(absl::UnavailableError(kInterruptedMessage), &job);
      *job.mutable_end_time() = ToTimestamp(now);
      Persist(job);
      ++interrupted;
    } else if (job.state() == v1::JOB_STATE_SUCCEEDED) {
      absl::StatusOr<int64_t> size = FileSize(ResultPath(job));
      if (!size.ok() || *size != job.result().size_bytes()) {
        if (!exclusive()) continue;
        job.set_state(v1::JOB_STATE_FAILED);
        job.clear_result();
        SetError(absl::DataLossError("the stored video is missing or truncated"), &job);
        Persist(job);
      }
    }
    loaded.push_back(std::move(record));
  }
  // Listing order: acceptance time, ties by id.
  std::sort(loaded.begin(), loaded.end(), [](const Record& a, const Record& b) {
    const absl::Time ta = FromTimestamp(a.job.create_time());
    const absl::Time tb = FromTimestamp(b.job.create_time());
    return ta != tb ? ta < tb : a.job.job_id() < b.job.job_id();
  });
  absl::MutexLock lock(&mu_);
  for (Record& record : loaded) {
    record.order = next_order_++;
    const std::string id = record.job.job_id();
    by_order_[record.order] = id;
    if (!record.job.idempotency_key().empty()) by_key_[record.job.idempotency_key()] = id;
    records_.emplace(id, std::move(record));
  }
  LogInfo(absl::StrFormat("job store %s: %d job(s) loaded, %d interrupted", options_.output_dir,
                          records_.size(), interrupted));
  return absl::OkStatus();
}

void JobStore::Persist(const v1::Job& job) const {
  std::string text;
  google::protobuf::util::JsonPrintOptions json;
  json.add_whitespace = true;
  json.preserve_proto_field_names = true;
  // Protobuf 3.21 has its own Status type.
  const auto printed = google::protobuf::util::MessageToJsonString(job, &text, json);
  absl::Status s = printed.ok() ? WriteFileAtomically(MetadataPath(job.job_id()), text)
                                : absl::InternalError(printed.ToString());
  if (!s.ok()) {
    LogWarning(absl::StrCat("cannot store metadata of ", job.job_id(), ": ", s.ToString()));
  }
}

void JobStore::Track(const std::shared_ptr<JobHandle>& handle, v1::JobOrigin origin,
                     const std::string& idempotency_key) {
  Record record;
  v1::Job& job = record.job;
  job.set_job_id(handle->id());
  job.set_state(v1::JOB_STATE_QUEUED);
  job.set_origin(origin);
  job.set_idempotency_key(idempotency_key);
  *job.mutable_request() = handle->request().resolved;
  *job.mutable_create_time() = ToTimestamp(handle->accepted_time());
  v1::JobProgress* progress = job.mutable_progress();
  progress->set_stage(v1::STAGE_QUEUED);
  progress->set_total_steps(handle->request().engine.num_steps);
  progress->set_queue_position(handle->queue_position());
  record.handle = handle;
  {
    absl::MutexLock lock(&mu_);
    if (auto old = records_.find(job.job_id()); old != records_.end()) {
      // Ids carry 32 random bits, so this is a freak collision with a job of an earlier run:
      // the new job replaces it (its files are overwritten as the new job writes them).
      LogWarning(absl::StrCat("job id ", job.job_id(), " reused; the older job is forgotten"));
      by_order_.erase(old->second.order);
      records_.erase(old);
    }
    record.order = next_order_++;
    by_order_[record.order] = job.job_id();
    if (!idempotency_key.empty()) by_key_[idempotency_key] = job.job_id();
    records_.emplace(job.job_id(), record);
  }
  Persist(job);
  handle->events().SetObserver(std::make_shared<Recorder>(
      this, handle.get(), absl::StrCat(ResultPath(job), ".tmp")));
}

void JobStore::OnProgress(const std::string& id, const v1::JobProgress& progress) {
  std::optional<v1::Job> started;
  {
    absl::MutexLock lock(&mu_);
    auto it = records_.find(id);
    if (it == records_.end()) return;
    Record& r = it->second;
    *r.job.mutable_progress() = progress;
    if (progress.stage() == v1::STAGE_DENOISE) {
      r.sparsity_sum += progress.achieved_sparsity();
      ++r.sparsity_count;
      r.job.set_mean_achieved_sparsity(static_cast<float>(r.sparsity_sum / r.sparsity_count));
    }
    if (progress.stage() == v1::STAGE_QUEUED && r.job.state() == v1::JOB_STATE_RUNNING) {
      // Preempted at a step boundary: waiting again (its start time stays).
      r.job.set_state(v1::JOB_STATE_QUEUED);
    }
    if (progress.stage() != v1::STAGE_QUEUED && r.job.state() == v1::JOB_STATE_QUEUED) {
      r.job.set_state(v1::JOB_STATE_RUNNING);
      if (!r.job.has_start_time()) {
        *r.job.mutable_start_time() = ToTimestamp(options_.clock->Now());
        started = r.job;
      }
    }
  }
  // Once per job: a restart must know it was running (it is then reported interrupted).
  if (started.has_value()) Persist(*started);
}

void JobStore::OnCompleted(const std::string& id, const v1::GenerateCompleted& completed) {
  absl::MutexLock lock(&mu_);
  auto it = records_.find(id);
  if (it == records_.end()) return;
  *it->second.job.mutable_result()->mutable_completed() = completed;
}

void JobStore::OnFinished(const std::string& id, const JobHandle& handle,
                          const absl::Status& status, const absl::Status& store_status,
                          int64_t stored_bytes) {
  v1::Job job;
  std::vector<v1::Job> removed;
  {
    absl::MutexLock lock(&mu_);
    auto it = records_.find(id);
    if (it == records_.end()) return;
    Record& r = it->second;
    v1::Job& j = r.job;
    const absl::Time now = options_.clock->Now();
    *j.mutable_end_time() = ToTimestamp(now);
    j.mutable_progress()->set_elapsed_seconds(
        absl::ToDoubleSeconds(now - FromTimestamp(j.create_time())));
    j.mutable_progress()->set_eta_seconds(0);
    if (status.ok() && store_status.ok()) {
      j.set_state(v1::JOB_STATE_SUCCEEDED);
      v1::JobResult* result = j.mutable_result();
      result->set_content_type(result->completed().content_type());
      result->set_output_format(j.request().output_format());
      result->set_size_bytes(stored_bytes);
      j.clear_error();
    } else {
      j.clear_result();
      if (status.ok()) {
        // The client of a Generate call got its video, but nobody else can fetch it.
        j.set_state(v1::JOB_STATE_FAILED);
        SetError(absl::Status(store_status.code(),
                              absl::StrCat("the video could not be stored: ",
                                           store_status.message())),
                 &j);
        LogWarning(absl::StrCat(id, ": ", j.error().message()));
      } else if (handle.cancel_reason() == CancelReason::kShutdown ||
                 (handle.state() == JobState::kCancelled &&
                  status.code() == absl::StatusCode::kUnavailable)) {
        // (The executor stops jobs for shutdown with UNAVAILABLE without setting a reason.)
        // Same outcome as a crash: the job did not run to its end because the server stopped.
        j.set_state(v1::JOB_STATE_FAILED);
        SetError(absl::UnavailableError(kInterruptedMessage), &j);
      } else {
        switch (status.code()) {
          case absl::StatusCode::kCancelled:
            j.set_state(v1::JOB_STATE_CANCELLED);
            break;
          case absl::StatusCode::kDeadlineExceeded:
            j.set_state(v1::JOB_STATE_DEADLINE_EXCEEDED);
            break;
          default:
            j.set_state(handle.state() == JobState::kCancelled ? v1::JOB_STATE_CANCELLED
                                                               : v1::JOB_STATE_FAILED);
            break;
        }
        SetError(status, &j);
      }
    }
    // Live state (the handle) is no longer needed: readers of a finished job use the record.
    r.handle.reset();
    job = j;
    // In the same critical section, so that nobody sees this job final and the limits exceeded.
    removed = CollectExpiredLocked();
  }
  const bool kept = std::none_of(removed.begin(), removed.end(),
                                 [&](const v1::Job& r) { return r.job_id() == job.job_id(); });
  if (kept) Persist(job);
  RemoveFiles(removed);
  if (options_.on_finished) options_.on_finished(job);
}

void JobStore::ApplyRetention() {
  std::vector<v1::Job> removed;
  {
    absl::MutexLock lock(&mu_);
    removed = CollectExpiredLocked();
  }
  RemoveFiles(removed);
}

std::vector<v1::Job> JobStore::CollectExpiredLocked() {
  std::vector<v1::Job> removed;
  const absl::Time oldest_kept =
      options_.clock->Now() - absl::Seconds(options_.result_ttl_seconds);
  // Oldest end first; ties (a coarse clock) by acceptance order.
  std::vector<std::tuple<absl::Time, uint64_t, std::string>> finished;
  for (const auto& [id, r] : records_) {
    if (IsFinal(r.job.state()) && r.handle == nullptr) {
      finished.emplace_back(FromTimestamp(r.job.end_time()), r.order, id);
    }
  }
  std::sort(finished.begin(), finished.end());
  size_t excess = finished.size() > static_cast<size_t>(options_.max_results)
                      ? finished.size() - options_.max_results
                      : 0;
  for (const auto& [end, order, id] : finished) {
    if (excess == 0 && end >= oldest_kept) break;
    if (excess > 0) --excess;
    auto it = records_.find(id);
    by_order_.erase(it->second.order);
    const std::string& key = it->second.job.idempotency_key();
    auto k = by_key_.find(key);
    if (!key.empty() && k != by_key_.end() && k->second == id) by_key_.erase(k);
    removed.push_back(std::move(it->second.job));
    records_.erase(it);
  }
  return removed;
}

void JobStore::RemoveFiles(const std::vector<v1::Job>& removed) const {
  // After the records: a reader that already opened a result keeps reading it.
  for (const v1::Job& job : removed) {
    RemoveFile(ResultPath(job)).IgnoreError();
    if (absl::Status s = RemoveFile(MetadataPath(job.job_id())); !s.ok()) {
      LogWarning(absl::StrCat("retention: ", s.ToString()));
    }
  }
}

v1::Job JobStore::SnapshotLocked(const Record& r) const {
  v1::Job job = r.job;
  if (r.handle == nullptr || IsFinal(job.state())) return job;
  const JobHandle& h = *r.handle;
  const absl::Time now = options_.clock->Now();
  job.mutable_progress()->set_elapsed_seconds(absl::ToDoubleSeconds(now - h.accepted_time()));
  if (h.state() == JobState::kQueued) {
    job.set_state(v1::JOB_STATE_QUEUED);
    job.mutable_progress()->set_queue_position(h.queue_position());
  } else if (h.state() == JobState::kRunning) {
    job.set_state(v1::JOB_STATE_RUNNING);
    job.mutable_progress()->set_queue_position(0);
  }
  return job;
}

absl::StatusOr<JobStore::Entry> JobStore::Find(absl::string_view job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = records_.find(job_id);
  if (it == records_.end()) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  }
  return Entry{SnapshotLocked(it->second), it->second.handle};
}

std::optional<std::string> JobStore::FindByIdempotencyKey(absl::string_view key) const {
  absl::MutexLock lock(&mu_);
  auto it = by_key_.find(key);
  if (it == by_key_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<v1::ListJobsResponse> JobStore::List(const v1::ListJobsRequest& request) const {
  if (request.page_size() < 0 || request.page_size() > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("page_size: must be in [0, ", kMaxPageSize,
                                                   "], got ", request.page_size()));
  }
  for (int state : request.states()) {
    if (!v1::JobState_IsValid(state) || state == v1::JOB_STATE_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat(
          "states: each must be a JobState from QUEUED (1) to DEADLINE_EXCEEDED (6), got ",
          state));
    }
  }
  const int page_size = request.page_size() == 0 ? kDefaultPageSize : request.page_size();
  uint64_t before = UINT64_MAX;
  if (!request.page_token().empty()) {
    absl::StatusOr<uint64_t> order = DecodePageToken(request.page_token());
    if (!order.ok()) return order.status();
    before = *order;
  }
  v1::ListJobsResponse response;
  absl::MutexLock lock(&mu_);
  for (auto it = std::make_reverse_iterator(by_order_.lower_bound(before));
       it != by_order_.rend(); ++it) {
    const Record& r = records_.find(it->second)->second;
    v1::Job job = SnapshotLocked(r);
    if (!request.states().empty() &&
        std::find(request.states().begin(), request.states().end(), job.state()) ==
            request.states().end()) {
      continue;
    }
    if (response.jobs_size() == page_size) {
      // One more match exists: the page is full and another follows.
      response.set_next_page_token(
          EncodePageToken(records_.find(response.jobs(page_size - 1).job_id())->second.order));
      break;
    }
    *response.add_jobs() = std::move(job);
  }
  return response;
}

absl::StatusOr<std::unique_ptr<JobResultReader>> JobStore::OpenResult(
    absl::string_view job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = records_.find(job_id);
  if (it == records_.end()) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  }
  const v1::Job job = SnapshotLocked(it->second);
  if (job.state() != v1::JOB_STATE_SUCCEEDED) {
    std::string why = IsFinal(job.state())
                          ? absl::StrCat(": ", job.error().message())
                          : std::string("; wait for it to finish (WatchJob)");
    return absl::FailedPreconditionError(absl::StrCat("job ", job_id, " is ",
                                                      v1::JobState_Name(job.state()),
                                                      ", it has no result", why));
  }
  const std::string path = ResultPath(job);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    // NOT_FOUND when retention removed it between the lookup and the open.
    return ErrnoStatus(errno, "cannot open the result", path);
  }
  return std::unique_ptr<JobResultReader>(
      new JobResultReader(fd, job.result().size_bytes(), job.result()));
}

int JobStore::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(records_.size());
}

}  // namespace sparge::server
