// A job as seen by both the executor and the gRPC reactor: its resolved request, its cancellation
// flag and its event channel (executor pushes GenerateEvents, then closes with the final status;
// the reactor pops and writes them). JobHandle and JobEventChannel are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
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

// Ordered events of one job, ending with a terminal status. One producer (the executor), one
// consumer (a reactor or a test).
class JobEventChannel {
 public:
  // Appends an event; ignored after Close().
  void Push(sparge::v1::GenerateEvent event);
  // Marks the end of the stream; only the first call counts.
  void Close(absl::Status status);

  struct Item {
    std::optional<sparge::v1::GenerateEvent> event;  // set: the next event
    std::optional<absl::Status> final_status;        // set (and event empty): stream ended
  };
  // Non-blocking: the next event, else the final status once closed and drained, else neither.
  Item TryPop();
  // Blocks until TryPop would return something or `timeout` passes; false on timeout.
  bool WaitReadable(absl::Duration timeout);

  // `listener` runs (on the producer's thread, with no channel lock held) after every Push and
  // Close. It may call TryPop. At most one listener.
  void SetListener(std::function<void()> listener);
  // Removes the listener; returns after any call of it in progress has returned.
  void ClearListener();

 private:
  void Notify();

  absl::Mutex mu_;
  std::deque<sparge::v1::GenerateEvent> events_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Status> final_status_ ABSL_GUARDED_BY(mu_);
  // Separate from mu_ so that a listener can TryPop; held while the listener runs so that
  // ClearListener() cannot return while it is still executing.
  absl::Mutex listener_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::function<void()> listener_ ABSL_GUARDED_BY(listener_mu_);
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
