// The job registry and its persistence: every job the service starts is Track()ed here; the
// store follows its events, writes the finished video to <output_dir>/<job_id>.<mp4|tar> and a
// metadata file <job_id>.json (the sparge.v1.Job as JSON), both atomically, and answers GetJob,
// ListJobs and GetJobResult from memory and disk. Retention: at most max_results finished jobs,
// none older than result_ttl_seconds (oldest first; on every finish and at startup). On Open,
// jobs the metadata says were QUEUED/RUNNING become FAILED "interrupted".
// Usage: auto store = JobStore::Open(options); store->Track(handle, origin, key); store->Find(id).
// Thread-safe. The store must outlive the executor's use of tracked jobs (stop the executor first).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/clock.h"
#include "server/config.h"
#include "server/job.h"
#include "server/job_files.h"
#include "sparge/v1/video_service.pb.h"

namespace sparge::server {

struct JobStoreOptions {
  std::string output_dir = "sparge-jobs";  // created if missing
  int max_results = 100;                   // finished jobs kept (metadata and result files)
  double result_ttl_seconds = 86400;       // finished jobs older than this (by end time) go
  const Clock* clock = Clock::Real();
  // Optional: called with the final Job each time one ends (on the thread that ended it).
  std::function<void(const sparge::v1::Job&)> on_finished;
};
JobStoreOptions JobStoreOptionsFrom(const JobStoreConfig& config, const Clock* clock);

// INVALID_ARGUMENT "<field>: must be 1-128 characters of [A-Za-z0-9._-], got ..." unless `id`
// could be a job id (also what makes ids safe as file names).
absl::Status ValidateJobId(absl::string_view id, absl::string_view field = "job_id");

// Message of the error of jobs that were queued or running when the server stopped.
inline constexpr char kInterruptedMessage[] =
    "interrupted: the server stopped before the job finished; submit it again";

// A stored result opened for reading; the file stays readable even if retention removes it
// meanwhile. One reader per stream (not thread-safe).
class JobResultReader {
 public:
  ~JobResultReader();
  JobResultReader(const JobResultReader&) = delete;
  JobResultReader& operator=(const JobResultReader&) = delete;

  int64_t size() const { return size_; }
  const sparge::v1::JobResult& result() const { return result_; }
  // Up to max_bytes from `offset` (fewer only at the end of the file).
  absl::StatusOr<std::string> ReadAt(int64_t offset, int64_t max_bytes) const;

 private:
  friend class JobStore;
  JobResultReader(int fd, int64_t size, sparge::v1::JobResult result)
      : fd_(fd), size_(size), result_(std::move(result)) {}
  int fd_;
  int64_t size_;
  sparge::v1::JobResult result_;
};

class JobStore {
 public:
  // Creates the directory, takes its lock, loads the jobs found there, marks unfinished ones
  // FAILED "interrupted" and applies retention. If another live server holds the directory's
  // lock, the jobs are shared read-only: finished ones are loaded, unfinished ones (the other
  // server's live jobs) are neither loaded nor touched, and nothing is removed at startup.
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(JobStoreOptions options);
  ~JobStore();

  // Starts recording a job that Executor::Submit just returned, before anyone reads its events
  // (so the store sees all of them): writes its metadata (QUEUED), then, as the executor pushes
  // events, its state, progress and result file. The final metadata and the file are in place
  // before the job's readers see its final status.
  void Track(const std::shared_ptr<JobHandle>& handle, sparge::v1::JobOrigin origin,
             const std::string& idempotency_key);

  struct Entry {
    sparge::v1::Job job;                 // as of now
    std::shared_ptr<JobHandle> handle;   // while the job is live; null once it has ended
  };
  // NOT_FOUND "job <id> not found" for unknown (or removed) ids.
  absl::StatusOr<Entry> Find(absl::string_view job_id) const;
  // The job submitted with this idempotency key, if still known.
  std::optional<std::string> FindByIdempotencyKey(absl::string_view key) const;

  // ListJobs: newest first, filtered by state, paged (INVALID_ARGUMENT for a bad page_size or
  // page_token).
  absl::StatusOr<sparge::v1::ListJobsResponse> List(
      const sparge::v1::ListJobsRequest& request) const;

  // The stored video of a SUCCEEDED job. FAILED_PRECONDITION "job <id> is <STATE>, ..." for other
  // states, NOT_FOUND for unknown ids or a result removed meanwhile.
  absl::StatusOr<std::unique_ptr<JobResultReader>> OpenResult(absl::string_view job_id) const;

  const std::string& output_dir() const { return options_.output_dir; }
  // Whether this store holds the directory's lock (see Open).
  bool exclusive() const { return lock_.has_value(); }
  // Jobs known (live and finished).
  int size() const;

 private:
  class Recorder;
  struct Record {
    sparge::v1::Job job;
    std::shared_ptr<JobHandle> handle;  // live jobs only
    uint64_t order = 0;                 // listing order: larger is newer
    double sparsity_sum = 0;
    int sparsity_count = 0;
  };

  explicit JobStore(JobStoreOptions options);
  absl::Status Load();
  std::string MetadataPath(absl::string_view id) const;
  std::string ResultPath(const sparge::v1::Job& job) const;
  // Writes the metadata file of `job`; failures are logged (the job itself goes on).
  void Persist(const sparge::v1::Job& job) const;
  // Removes the oldest finished jobs beyond the limits, records and files.
  void ApplyRetention() ABSL_LOCKS_EXCLUDED(mu_);
  // The records part of ApplyRetention; returns the removed jobs, whose files RemoveFiles deletes.
  std::vector<sparge::v1::Job> CollectExpiredLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveFiles(const std::vector<sparge::v1::Job>& removed) const;
  sparge::v1::Job SnapshotLocked(const Record& record) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Called by a job's Recorder on the executor thread.
  void OnProgress(const std::string& id, const sparge::v1::JobProgress& progress);
  void OnCompleted(const std::string& id, const sparge::v1::GenerateCompleted& completed);
  void OnFinished(const std::string& id, const JobHandle& handle, const absl::Status& status,
                  const absl::Status& store_status, int64_t stored_bytes);

  const JobStoreOptions options_;
  std::optional<FileLock> lock_;

  mutable absl::Mutex mu_;
  std::map<std::string, Record, std::less<>> records_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::string> by_order_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string, std::less<>> by_key_ ABSL_GUARDED_BY(mu_);
  uint64_t next_order_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace sparge::server
