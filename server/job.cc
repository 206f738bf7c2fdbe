#include "server/job.h"

#include <utility>

namespace sparge::server {

const char* ToString(JobState state) {
  switch (state) {
    case JobState::kQueued:
      return "QUEUED";
    case JobState::kRunning:
      return "RUNNING";
    case JobState::kSucceeded:
      return "SUCCEEDED";
    case JobState::kFailed:
      return "FAILED";
    case JobState::kCancelled:
      return "CANCELLED";
    case JobState::kDeadlineExceeded:
      return "DEADLINE_EXCEEDED";
  }
  return "UNKNOWN";
}

const char* ToString(CancelReason reason) {
  switch (reason) {
    case CancelReason::kNone:
      return "none";
    case CancelReason::kClient:
      return "client";
    case CancelReason::kDeadline:
      return "deadline";
    case CancelReason::kShutdown:
      return "shutdown";
  }
  return "unknown";
}

void JobEventChannel::Push(sparge::v1::GenerateEvent event) {
  {
    absl::MutexLock lock(&mu_);
    if (final_status_.has_value()) return;
    events_.push_back(std::move(event));
  }
  Notify();
}

void JobEventChannel::Close(absl::Status status) {
  {
    absl::MutexLock lock(&mu_);
    if (final_status_.has_value()) return;
    final_status_ = std::move(status);
  }
  Notify();
}

JobEventChannel::Item JobEventChannel::TryPop() {
  absl::MutexLock lock(&mu_);
  Item item;
  if (!events_.empty()) {
    item.event = std::move(events_.front());
    events_.pop_front();
  } else if (final_status_.has_value()) {
    item.final_status = *final_status_;
  }
  return item;
}

bool JobEventChannel::WaitReadable(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto readable = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return !events_.empty() || final_status_.has_value();
  };
  return mu_.AwaitWithTimeout(absl::Condition(&readable), timeout);
}

void JobEventChannel::SetListener(std::function<void()> listener) {
  absl::MutexLock lock(&listener_mu_);
  listener_ = std::move(listener);
}

void JobEventChannel::ClearListener() {
  absl::MutexLock lock(&listener_mu_);
  listener_ = nullptr;
}

void JobEventChannel::Notify() {
  absl::MutexLock lock(&listener_mu_);
  if (listener_) listener_();
}

}  // namespace sparge::server
