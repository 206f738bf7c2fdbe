// A job as seen by the executor, the gRPC reactors and the job store: its resolved request, its
// cancellation flag and its event log (the executor pushes GenerateEvents, then closes it with
// the final status; readers follow it at their own pace). JobHandle and JobEventChannel are
// thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/request_validation.h"
#include "sparge/v1/video_service.pb.h"

namespace sparge::server {

enum class JobState { kQueued, kRunning, kSucceeded, kFailed, kCancelled, kDeadlineExceeded };
const char* ToString(JobState state);

// Why a job was stopped early (the label of sparge_cancellations_total).
enum class CancelReason { kNone = 0, kClient, kDeadline, kShutdown };
const char* ToString(CancelReason reason);

// Sees every event of a job and its close, in order, synchronously on the producer's thread and
// before any reader can see them (the job store writes the result file here, so that a reader
// seeing the final OK status can already fetch the file).
class JobEventObserver {
 public:
  virtual ~JobEventObserver() = default;
  virtual void OnEvent(const sparge::v1::GenerateEvent& event) = 0;
  virtual void OnClose(const absl::Status& status) = 0;
};

// Ordered events of one job, ending with a terminal status: one producer (the executor), any
// number of readers, each with its own cursor.
// - The primary reader exists from construction and sees every event, file chunks included (the
//   Generate call that started the job, or a test). DetachPrimary() ends it.
// - Watchers (AddWatcher) join at any time: they first get a replay of what happened so far
//   (`accepted`, the latest progress, `completed` if pushed) and then the live events, never the
//   chunks.
// Memory: an event is kept only until every reader that needs it has read it, plus the replay
// snapshot (three small events); chunks are kept only for an attached primary reader.
class JobEventChannel {
 public:
  JobEventChannel();

  // Appends an event; ignored after Close().
  void Push(sparge::v1::GenerateEvent event);
  // Marks the end of the stream; only the first call counts.
  void Close(absl::Status status);

  struct Item {
    std::optional<sparge::v1::GenerateEvent> event;  // set: the next event
    std::optional<absl::Status> final_status;        // set (and event empty): stream ended
  };

  // The primary reader. Non-blocking: the next event, else the final status once closed and
  // drained, else neither.
  Item TryPop();
  // Blocks until TryPop would return something or `timeout` passes; false on timeout.
  bool WaitReadable(absl::Duration timeout);
  // `listener` runs (on the producer's thread, with no channel lock held) after every Push and
  // Close. It may call TryPop. At most one listener.
  void SetListener(std::function<void()> listener);
  // Removes the listener; returns after any call of it in progress has returned.
  void ClearListener();
  // Ends the primary reader (ClearListener() first): what it has not read is dropped and nothing
  // more is kept for it. Idempotent.
  void DetachPrimary();

  // Adds a watcher; returns its id. `listener` (may be empty) runs like the primary's and may
  // call TryPopWatcher.
  int AddWatcher(std::function<void()> listener);
  Item TryPopWatcher(int watcher);
  // Removes a watcher; returns after any call of its listener in progress has returned. Must not
  // be called from a listener.
  void RemoveWatcher(int watcher);

  // Installs the observer (at most one) and replays to it, synchronously, the events still kept
  // (every event, when called before the primary reader has read or detached) and the close.
  void SetObserver(std::shared_ptr<JobEventObserver> observer);

  bool closed() const;
  // Events currently held (for tests of the memory bound).
  int retained_events() const;

 private:
  static constexpr int kPrimary = 0;
  struct Reader {
    uint64_t cursor = 0;  // absolute index of the next log event to read
    bool wants_chunks = false;
    std::deque<sparge::v1::GenerateEvent> replay;  // read before the log
    std::function<void()> listener;
  };

  Item PopLocked(Reader& reader) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops log events every reader has passed.
  void TrimLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Notify();

  // Serializes producers with SetObserver so that the observer sees each event exactly once, in
  // order. Acquired before mu_.
  absl::Mutex observer_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::shared_ptr<JobEventObserver> observer_ ABSL_GUARDED_BY(observer_mu_);

  mutable absl::Mutex mu_;
  std::deque<sparge::v1::GenerateEvent> log_ ABSL_GUARDED_BY(mu_);
  uint64_t log_begin_ ABSL_GUARDED_BY(mu_) = 0;  // absolute index of log_.front()
  std::map<int, Reader> readers_ ABSL_GUARDED_BY(mu_);
  int next_watcher_ ABSL_GUARDED_BY(mu_) = 1;
  // Replay snapshot for watchers that join later.
  std::optional<sparge::v1::GenerateEvent> accepted_ ABSL_GUARDED_BY(mu_);
  std::optional<sparge::v1::GenerateEvent> latest_progress_ ABSL_GUARDED_BY(mu_);
  std::optional<sparge::v1::GenerateEvent> completed_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Status> final_status_ ABSL_GUARDED_BY(mu_);

  // Separate from mu_ so that a listener can pop; held while listeners run so that
  // ClearListener() / RemoveWatcher() cannot return while one is still executing.
  absl::Mutex listener_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::map<int, std::function<void()>> listeners_ ABSL_GUARDED_BY(listener_mu_);
};

class JobHandle {
 public:
  JobHandle(std::string id, uint64_t sequence, ResolvedRequest request, absl::Time accepted,
            absl::Time deadline)
      : id_(std::move(id)),
        sequence_(sequence),
        request_(std::move(request)),
        accepted_(accepted),
        deadline_(deadline) {}

  const std::string& id() const { return id_; }
  // Submission order, unique per executor; FIFO within a priority class.
  uint64_t sequence() const { return sequence_; }
  const ResolvedRequest& request() const { return request_; }
  absl::Time accepted_time() const { return accepted_; }
  // absl::InfiniteFuture() when the call has none.
  absl::Time deadline() const { return deadline_; }
  JobEventChannel& events() { return events_; }

  // Asks the executor to stop the job at its next step boundary. Thread-safe; the first reason
  // wins.
  void Cancel(CancelReason reason) {
    int expected = static_cast<int>(CancelReason::kNone);
    cancel_reason_.compare_exchange_strong(expected, static_cast<int>(reason));
  }
  CancelReason cancel_reason() const {
    return static_cast<CancelReason>(cancel_reason_.load(std::memory_order_acquire));
  }

  // Maintained by the executor.
  void set_state(JobState state) { state_.store(state, std::memory_order_release); }
  JobState state() const { return state_.load(std::memory_order_acquire); }
  // Jobs ahead of this one in the queue, as last reported to the client.
  void set_queue_position(int position) { queue_position_.store(position); }
  int queue_position() const { return queue_position_.load(); }

 private:
  const std::string id_;
  const uint64_t sequence_;
  const ResolvedRequest request_;
  const absl::Time accepted_;
  const absl::Time deadline_;
  JobEventChannel events_;
  std::atomic<int> cancel_reason_{static_cast<int>(CancelReason::kNone)};
  std::atomic<JobState> state_{JobState::kQueued};
  std::atomic<int> queue_position_{0};
};

}  // namespace sparge::server
