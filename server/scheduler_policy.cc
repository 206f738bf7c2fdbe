#include "server/scheduler_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace sparge::server {
namespace {

// Sort key of a job under rules 2 and 4; smaller runs first. Deadlines only order jobs within a
// class, and only with deadline_aware: a job without one sorts after every job with one.
struct RankKey {
  int priority;
  bool no_deadline;
  absl::Time deadline;
  uint64_t sequence;

  bool operator<(const RankKey& o) const {
    if (priority != o.priority) return priority > o.priority;
    if (no_deadline != o.no_deadline) return !no_deadline;
    if (deadline != o.deadline) return deadline < o.deadline;
    return sequence < o.sequence;
  }
};

RankKey Rank(int priority, absl::Time deadline, uint64_t sequence, const SchedulerConfig& config) {
  const bool use_deadline = config.deadline_aware && deadline != absl::InfiniteFuture();
  return RankKey{priority, !use_deadline, use_deadline ? deadline : absl::InfiniteFuture(),
                 sequence};
}

RankKey QueuedRank(const QueuedJobView& job, absl::Time now, const SchedulerConfig& config) {
  return Rank(EffectivePriority(job.priority, job.arrival, now, config), job.deadline,
              job.sequence, config);
}

RankKey RunningRank(const RunningJobView& job, absl::Time now, const SchedulerConfig& config) {
  return Rank(EffectivePriority(job.priority, job.arrival, now, config), job.deadline,
              job.sequence, config);
}

bool Preemptible(const RunningJobView& job) {
  return !job.denoise_done() && job.steps_done - job.steps_at_start >= kMinStepsBeforePreemption &&
         job.preemptions < kMaxPreemptionsPerJob;
}

}  // namespace

const char* ToString(SchedulerAction::Kind kind) {
  switch (kind) {
    case SchedulerAction::Kind::kIdle:
      return "idle";
    case SchedulerAction::Kind::kStart:
      return "start";
    case SchedulerAction::Kind::kPreempt:
      return "preempt";
    case SchedulerAction::Kind::kStep:
      return "step";
    case SchedulerAction::Kind::kFinish:
      return "finish";
  }
  return "unknown";
}

int EffectivePriority(JobPriority priority, absl::Time arrival, absl::Time now,
                      const SchedulerConfig& config) {
  const int base = static_cast<int>(priority);
  if (config.aging_seconds <= 0 || now == absl::InfinitePast() ||
      arrival == absl::InfinitePast() || now <= arrival) {
    return base;
  }
  const double classes = absl::ToDoubleSeconds(now - arrival) / config.aging_seconds;
  // Capped so that the sum cannot overflow; a million classes outrank any real priority anyway.
  return base + static_cast<int>(std::min(std::floor(classes), 1e6));
}

std::vector<uint64_t> QueueOrder(const std::vector<QueuedJobView>& queued, absl::Time now,
                                 const SchedulerConfig& config) {
  std::vector<std::pair<RankKey, uint64_t>> ranked;
  ranked.reserve(queued.size());
  for (const QueuedJobView& job : queued) {
    ranked.emplace_back(QueuedRank(job, now, config), job.sequence);
  }
  std::sort(ranked.begin(), ranked.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<uint64_t> order;
  order.reserve(ranked.size());
  for (const auto& [rank, sequence] : ranked) order.push_back(sequence);
  return order;
}

int QueuePosition(const std::vector<QueuedJobView>& queued, const QueuedJobView& job,
                  absl::Time now, const SchedulerConfig& config) {
  const RankKey mine = QueuedRank(job, now, config);
  int ahead = 0;
  for (const QueuedJobView& other : queued) {
    if (other.sequence != job.sequence && QueuedRank(other, now, config) < mine) ++ahead;
  }
  return ahead;
}

SchedulerAction ChooseNextAction(const SchedulerSnapshot& snapshot,
                                 const SchedulerConfig& config) {
  SchedulerAction action;

  // Rule 1.
  const RunningJobView* oldest_done = nullptr;
  for (const RunningJobView& job : snapshot.running) {
    if (job.denoise_done() && (!oldest_done || job.sequence < oldest_done->sequence)) {
      oldest_done = &job;
    }
  }
  if (oldest_done) {
    action.kind = SchedulerAction::Kind::kFinish;
    action.jobs = {oldest_done->sequence};
    return action;
  }

  const QueuedJobView* first_queued = nullptr;
  RankKey first_rank{};
  for (const QueuedJobView& job : snapshot.queued) {
    const RankKey rank = QueuedRank(job, snapshot.now, config);
    if (!first_queued || rank < first_rank) {
      first_queued = &job;
      first_rank = rank;
    }
  }

  // Rule 2.
  if (first_queued && static_cast<int>(snapshot.running.size()) < config.max_running_jobs) {
    action.kind = SchedulerAction::Kind::kStart;
    action.jobs = {first_queued->sequence};
    return action;
  }

  // Rule 3.
  if (first_queued && config.preemption) {
    const RunningJobView* victim = nullptr;
    int victim_class = 0;
    for (const RunningJobView& job : snapshot.running) {
      const int job_class = EffectivePriority(job.priority, job.arrival, snapshot.now, config);
      if (job_class >= first_rank.priority || !Preemptible(job)) continue;
      if (!victim || job_class < victim_class ||
          (job_class == victim_class && job.start_order > victim->start_order)) {
        victim = &job;
        victim_class = job_class;
      }
    }
    if (victim) {
      action.kind = SchedulerAction::Kind::kPreempt;
      action.jobs = {victim->sequence};
      return action;
    }
  }

  // Rule 4.
  std::vector<std::pair<RankKey, const RunningJobView*>> active;
  for (const RunningJobView& job : snapshot.running) {
    if (!job.denoise_done()) active.emplace_back(RunningRank(job, snapshot.now, config), &job);
  }
  if (active.empty()) return action;  // kIdle
  std::sort(active.begin(), active.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  const RunningJobView& leader = *active.front().second;
  action.kind = SchedulerAction::Kind::kStep;
  action.jobs.push_back(leader.sequence);
  int64_t tokens = leader.tokens;
  for (size_t i = 1; i < active.size(); ++i) {
    const RunningJobView& job = *active[i].second;
    if (job.batch_key != leader.batch_key) continue;
    if (config.max_batch_tokens > 0 && tokens + job.tokens > config.max_batch_tokens) continue;
    tokens += job.tokens;
    action.jobs.push_back(job.sequence);
  }
  return action;
}

int64_t DitTokens(const engine::GenerationRequest& request, const engine::ModelDescription& model) {
  const int64_t cell = std::max(1, model.vae_stride_spatial * model.patch_spatial);
  const int64_t latent_frames = (request.num_frames - 1) / std::max(1, model.vae_stride_temporal) + 1;
  const int64_t tokens = latent_frames * (request.height / cell) * (request.width / cell);
  return request.guidance_scale > 1.0f ? 2 * tokens : tokens;
}

}  // namespace sparge::server
