#include "server/scheduler_policy.h"

#include <algorithm>

namespace sparge::server {
namespace {

// True when a runs before b under rule 2.
bool RunsBefore(JobPriority a_priority, uint64_t a_sequence, JobPriority b_priority,
                uint64_t b_sequence) {
  if (a_priority != b_priority) return a_priority > b_priority;
  return a_sequence < b_sequence;
}

}  // namespace

const char* ToString(SchedulerAction::Kind kind) {
  switch (kind) {
    case SchedulerAction::Kind::kIdle:
      return "idle";
    case SchedulerAction::Kind::kStart:
      return "start";
    case SchedulerAction::Kind::kStep:
      return "step";
    case SchedulerAction::Kind::kFinish:
      return "finish";
  }
  return "unknown";
}

SchedulerAction ChooseNextAction(const SchedulerSnapshot& snapshot,
                                 const SchedulerConfig& config) {
  SchedulerAction action;

  const RunningJobView* oldest_done = nullptr;
  const RunningJobView* oldest_active = nullptr;
  for (const RunningJobView& job : snapshot.running) {
    if (job.denoise_done()) {
      if (!oldest_done || job.sequence < oldest_done->sequence) oldest_done = &job;
    } else if (!oldest_active || job.sequence < oldest_active->sequence) {
      oldest_active = &job;
    }
  }
  if (oldest_done) {
    action.kind = SchedulerAction::Kind::kFinish;
    action.jobs = {oldest_done->sequence};
    return action;
  }

  if (static_cast<int>(snapshot.running.size()) < config.max_running_jobs &&
      !snapshot.queued.empty()) {
    const QueuedJobView* next = &snapshot.queued.front();
    for (const QueuedJobView& job : snapshot.queued) {
      if (RunsBefore(job.priority, job.sequence, next->priority, next->sequence)) next = &job;
    }
    action.kind = SchedulerAction::Kind::kStart;
    action.jobs = {next->sequence};
    return action;
  }

  if (oldest_active) {
    action.kind = SchedulerAction::Kind::kStep;
    for (const RunningJobView& job : snapshot.running) {
      if (!job.denoise_done() && job.batch_key == oldest_active->batch_key) {
        action.jobs.push_back(job.sequence);
      }
    }
    std::sort(action.jobs.begin(), action.jobs.end());
    return action;
  }
  return action;  // kIdle
}

int QueuePosition(const std::vector<QueuedJobView>& queued, JobPriority priority,
                  uint64_t sequence) {
  int ahead = 0;
  for (const QueuedJobView& job : queued) {
    if (job.sequence != sequence && RunsBefore(job.priority, job.sequence, priority, sequence)) {
      ++ahead;
    }
  }
  return ahead;
}

}  // namespace sparge::server
