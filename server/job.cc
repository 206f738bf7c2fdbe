#include "server/job.h"

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

namespace sparge::server {

namespace v1 = ::sparge::v1;

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

JobEventChannel::JobEventChannel() {
  Reader primary;
  primary.wants_chunks = true;
  readers_.emplace(kPrimary, std::move(primary));
}

void JobEventChannel::Push(v1::GenerateEvent event) {
  {
    absl::MutexLock observer_lock(&observer_mu_);
    {
      absl::MutexLock lock(&mu_);
      if (final_status_.has_value()) return;
    }
    // Before the readers can see the event: the observer may persist what they will ask for.
    if (observer_) observer_->OnEvent(event);
    absl::MutexLock lock(&mu_);
    switch (event.event_case()) {
      case v1::GenerateEvent::kAccepted:
        accepted_ = event;
        break;
      case v1::GenerateEvent::kProgress:
        latest_progress_ = event;
        break;
      case v1::GenerateEvent::kCompleted:
        completed_ = event;
        break;
      default:
        break;
    }
    bool needed = !event.has_chunk();
    for (const auto& [id, reader] : readers_) needed |= reader.wants_chunks;
    // A chunk nobody reads leaves an empty placeholder (skipped by readers) so that the absolute
    // indexes of the readers' cursors stay valid.
    log_.push_back(needed ? std::move(event) : v1::GenerateEvent());
    TrimLocked();
  }
  Notify();
}

void JobEventChannel::Close(absl::Status status) {
  {
    absl::MutexLock observer_lock(&observer_mu_);
    {
      absl::MutexLock lock(&mu_);
      if (final_status_.has_value()) return;
    }
    if (observer_) observer_->OnClose(status);
    absl::MutexLock lock(&mu_);
    final_status_ = std::move(status);
  }
  Notify();
}

JobEventChannel::Item JobEventChannel::PopLocked(Reader& reader) {
  Item item;
  if (!reader.replay.empty()) {
    item.event = std::move(reader.replay.front());
    reader.replay.pop_front();
    return item;
  }
  const uint64_t end = log_begin_ + log_.size();
  while (reader.cursor < end) {
    v1::GenerateEvent& e = log_[reader.cursor - log_begin_];
    ++reader.cursor;
    if (e.event_case() == v1::GenerateEvent::EVENT_NOT_SET) continue;  // placeholder
    if (e.has_chunk()) {
      if (!reader.wants_chunks) continue;
      // Only the primary reads chunks: hand the data over instead of copying it.
      item.event = std::move(e);
    } else {
      item.event = e;
    }
    TrimLocked();
    return item;
  }
  if (final_status_.has_value()) item.final_status = *final_status_;
  return item;
}

void JobEventChannel::TrimLocked() {
  uint64_t min_cursor = std::numeric_limits<uint64_t>::max();
  for (const auto& [id, reader] : readers_) min_cursor = std::min(min_cursor, reader.cursor);
  const uint64_t end = log_begin_ + log_.size();
  if (readers_.empty()) min_cursor = end;
  while (log_begin_ < min_cursor && !log_.empty()) {
    log_.pop_front();
    ++log_begin_;
  }
}

JobEventChannel::Item JobEventChannel::TryPop() {
  absl::MutexLock lock(&mu_);
  auto it = readers_.find(kPrimary);
  if (it == readers_.end()) {
    Item item;
    if (final_status_.has_value()) item.final_status = *final_status_;
    return item;
  }
  return PopLocked(it->second);
}

bool JobEventChannel::WaitReadable(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto readable = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    if (final_status_.has_value()) return true;
    auto it = readers_.find(kPrimary);
    return it != readers_.end() && it->second.cursor < log_begin_ + log_.size();
  };
  return mu_.AwaitWithTimeout(absl::Condition(&readable), timeout);
}

void JobEventChannel::SetListener(std::function<void()> listener) {
  absl::MutexLock lock(&listener_mu_);
  listeners_[kPrimary] = std::move(listener);
}

void JobEventChannel::ClearListener() {
  absl::MutexLock lock(&listener_mu_);
  listeners_.erase(kPrimary);
}

void JobEventChannel::DetachPrimary() {
  ClearListener();
  absl::MutexLock lock(&mu_);
  readers_.erase(kPrimary);
  TrimLocked();
}

int JobEventChannel::AddWatcher(std::function<void()> listener) {
  absl::MutexLock listener_lock(&listener_mu_);
  absl::MutexLock lock(&mu_);
  const int id = next_watcher_++;
  Reader reader;
  reader.cursor = log_begin_ + log_.size();
  for (const auto* e : {&accepted_, &latest_progress_, &completed_}) {
    if (e->has_value()) reader.replay.push_back(**e);
  }
  readers_.emplace(id, std::move(reader));
  if (listener) listeners_[id] = std::move(listener);
  return id;
}

JobEventChannel::Item JobEventChannel::TryPopWatcher(int watcher) {
  absl::MutexLock lock(&mu_);
  auto it = readers_.find(watcher);
  if (it == readers_.end()) return Item{std::nullopt, absl::InternalError("no such watcher")};
  return PopLocked(it->second);
}

void JobEventChannel::RemoveWatcher(int watcher) {
  absl::MutexLock listener_lock(&listener_mu_);
  listeners_.erase(watcher);
  absl::MutexLock lock(&mu_);
  readers_.erase(watcher);
  TrimLocked();
}

void JobEventChannel::SetObserver(std::shared_ptr<JobEventObserver> observer) {
  absl::MutexLock observer_lock(&observer_mu_);
  std::vector<v1::GenerateEvent> kept;
  std::optional<absl::Status> status;
  {
    absl::MutexLock lock(&mu_);
    kept.assign(log_.begin(), log_.end());
    status = final_status_;
  }
  for (const v1::GenerateEvent& e : kept) {
    if (e.event_case() != v1::GenerateEvent::EVENT_NOT_SET) observer->OnEvent(e);
  }
  if (status.has_value()) observer->OnClose(*status);
  observer_ = std::move(observer);
}

bool JobEventChannel::closed() const {
  absl::MutexLock lock(&mu_);
  return final_status_.has_value();
}

int JobEventChannel::retained_events() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(log_.size());
}

void JobEventChannel::Notify() {
  absl::MutexLock lock(&listener_mu_);
  for (auto& [id, listener] : listeners_) {
    if (listener) listener();
  }
}

}  // namespace sparge::server
