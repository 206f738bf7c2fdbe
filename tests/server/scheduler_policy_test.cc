// The scheduling policy as a pure function: hand-built snapshots for each rule, then simulations
// with a fake clock and a fake runner (hundreds of steps, random arrivals, fixed seeds) checking
// batch composition, token budgets, priority/FIFO/deadline order, preemption and resumption, no
// starvation and fairness.
#include "server/scheduler_policy.h"

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sparge::server {
namespace {

using Kind = SchedulerAction::Kind;
using ::testing::ElementsAre;

const absl::Time kT0 = absl::FromUnixSeconds(1'700'000'000);

SchedulerConfig Config(int max_running) {
  SchedulerConfig c;
  c.max_running_jobs = max_running;
  return c;
}

QueuedJobView Queued(uint64_t sequence, JobPriority priority, absl::Time arrival = kT0,
                     absl::Time deadline = absl::InfiniteFuture()) {
  QueuedJobView q;
  q.sequence = sequence;
  q.priority = priority;
  q.arrival = arrival;
  q.deadline = deadline;
  return q;
}

RunningJobView Running(uint64_t sequence, std::string key, int done, int total,
                       JobPriority priority = JobPriority::kNormal, uint64_t start_order = 0) {
  RunningJobView r;
  r.sequence = sequence;
  r.batch_key = std::move(key);
  r.steps_done = done;
  r.total_steps = total;
  r.priority = priority;
  r.arrival = kT0;
  r.start_order = start_order == 0 ? sequence : start_order;
  return r;
}

TEST(SchedulerPolicyTest, IdleWhenNothingToDo) {
  EXPECT_EQ(ChooseNextAction({}, Config(1)).kind, Kind::kIdle);
}

TEST(SchedulerPolicyTest, StartsOldestJobOfHighestPriority) {
  SchedulerSnapshot s;
  s.queued = {{5, JobPriority::kNormal}, {3, JobPriority::kNormal}, {4, JobPriority::kLow}};
  SchedulerAction a = ChooseNextAction(s, Config(1));
  EXPECT_EQ(a.kind, Kind::kStart);
  EXPECT_THAT(a.jobs, ElementsAre(3));
  s.queued.push_back({9, JobPriority::kHigh});
  EXPECT_THAT(ChooseNextAction(s, Config(1)).jobs, ElementsAre(9));
}

TEST(SchedulerPolicyTest, OneAtATimeStepsTheRunningJobWhenItCannotBePreempted) {
  SchedulerSnapshot s;
  s.queued = {{2, JobPriority::kHigh}};
  s.running = {Running(1, "A", 0, 4)};  // no step since it started: not preemptible yet
  SchedulerAction a = ChooseNextAction(s, Config(1));
  EXPECT_EQ(a.kind, Kind::kStep);
  EXPECT_THAT(a.jobs, ElementsAre(1));
  // Same priority never preempts.
  s.queued = {{2, JobPriority::kNormal}};
  s.running = {Running(1, "A", 2, 4)};
  EXPECT_EQ(ChooseNextAction(s, Config(1)).kind, Kind::kStep);
}

TEST(SchedulerPolicyTest, FinishesDoneJobsFirst) {
  SchedulerSnapshot s;
  s.queued = {{4, JobPriority::kNormal}};
  s.running = {Running(2, "A", 1, 4), Running(3, "A", 4, 4), Running(1, "B", 2, 2)};
  SchedulerAction a = ChooseNextAction(s, Config(4));
  EXPECT_EQ(a.kind, Kind::kFinish);
  EXPECT_THAT(a.jobs, ElementsAre(1));
}

TEST(SchedulerPolicyTest, AdmitsNewJobsBetweenStepsUpToTheLimit) {
  SchedulerSnapshot s;
  s.queued = {{3, JobPriority::kNormal}};
  s.running = {Running(1, "A", 2, 4)};
  SchedulerAction a = ChooseNextAction(s, Config(2));
  EXPECT_EQ(a.kind, Kind::kStart);
  EXPECT_THAT(a.jobs, ElementsAre(3));
}

TEST(SchedulerPolicyTest, BatchesOnlyJobsWithTheLeadersKey) {
  SchedulerSnapshot s;
  s.running = {Running(7, "A", 0, 4), Running(2, "B", 3, 4), Running(5, "B", 0, 4),
               Running(3, "A", 1, 4)};
  SchedulerAction a = ChooseNextAction(s, Config(4));
  EXPECT_EQ(a.kind, Kind::kStep);
  EXPECT_THAT(a.jobs, ElementsAre(2, 5));
}

TEST(SchedulerPolicyTest, BatchesJobsAtDifferentStepsAndStepCounts) {
  // Same key: different step counts, progress (and, in the executor, seeds, guidance scales,
  // samplers and sparsity knobs, none of which enter the key) share one step.
  SchedulerSnapshot s;
  s.running = {Running(1, "A", 7, 50), Running(2, "A", 0, 4), Running(3, "A", 3, 10)};
  EXPECT_THAT(ChooseNextAction(s, Config(4)).jobs, ElementsAre(1, 2, 3));
}

TEST(SchedulerPolicyTest, HigherPriorityRunningJobLeadsTheStep) {
  SchedulerSnapshot s;
  s.running = {Running(1, "A", 1, 4, JobPriority::kLow), Running(2, "B", 0, 4, JobPriority::kHigh),
               Running(3, "A", 0, 4, JobPriority::kNormal)};
  EXPECT_THAT(ChooseNextAction(s, Config(3)).jobs, ElementsAre(2));
  s.running[1].steps_done = 4;  // #2 done: finished first, then A's jobs, #3 leading
  EXPECT_EQ(ChooseNextAction(s, Config(3)).kind, Kind::kFinish);
  s.running.erase(s.running.begin() + 1);
  EXPECT_THAT(ChooseNextAction(s, Config(3)).jobs, ElementsAre(3, 1));
}

TEST(SchedulerPolicyTest, TokenBudgetCapsTheBatch) {
  SchedulerConfig c = Config(8);
  c.max_batch_tokens = 1000;
  SchedulerSnapshot s;
  for (uint64_t i = 1; i <= 5; ++i) {
    s.running.push_back(Running(i, "A", 0, 4));
    s.running.back().tokens = 300;
  }
  // 3 x 300 = 900 fits, a fourth would be 1200.
  EXPECT_THAT(ChooseNextAction(s, c).jobs, ElementsAre(1, 2, 3));
  c.max_batch_tokens = 0;  // no cap
  EXPECT_THAT(ChooseNextAction(s, c).jobs, ElementsAre(1, 2, 3, 4, 5));
  // A leader alone over the cap still runs, alone.
  c.max_batch_tokens = 200;
  EXPECT_THAT(ChooseNextAction(s, c).jobs, ElementsAre(1));
}

TEST(SchedulerPolicyTest, AgingRaisesTheClassOfWaitingJobs) {
  SchedulerConfig c = Config(1);
  c.aging_seconds = 10;
  const JobPriority low = JobPriority::kLow;
  EXPECT_EQ(EffectivePriority(low, kT0, kT0 + absl::Seconds(9.9), c), 0);
  EXPECT_EQ(EffectivePriority(low, kT0, kT0 + absl::Seconds(10), c), 1);
  EXPECT_EQ(EffectivePriority(low, kT0, kT0 + absl::Seconds(25), c), 2);
  EXPECT_EQ(EffectivePriority(low, kT0, kT0 - absl::Seconds(5), c), 0);  // clock before arrival
  EXPECT_EQ(EffectivePriority(JobPriority::kHigh, kT0, kT0 + absl::Seconds(25), c), 4);
  c.aging_seconds = 0;
  EXPECT_EQ(EffectivePriority(low, kT0, kT0 + absl::Hours(100), c), 0);

  c.aging_seconds = 10;
  SchedulerSnapshot s;
  s.queued = {Queued(1, JobPriority::kLow, kT0), Queued(2, JobPriority::kHigh, kT0 + absl::Seconds(5))};
  s.now = kT0 + absl::Seconds(14);  // low: 1, high: 2
  EXPECT_THAT(ChooseNextAction(s, c).jobs, ElementsAre(2));
  s.now = kT0 + absl::Seconds(30);  // low: 3, high: 4
  EXPECT_THAT(ChooseNextAction(s, c).jobs, ElementsAre(2));
  // A high job that arrived more than 2 x aging_seconds after the low one ranks below it.
  s.queued[1].arrival = kT0 + absl::Seconds(21);
  EXPECT_THAT(ChooseNextAction(s, c).jobs, ElementsAre(1));  // low: 3, high: 2 + 0 = 2
}

TEST(SchedulerPolicyTest, DeadlinesOrderJobsWithinAClass) {
  SchedulerConfig c = Config(1);
  SchedulerSnapshot s;
  s.queued = {Queued(1, JobPriority::kNormal), Queued(2, JobPriority::kNormal, kT0, kT0 + absl::Seconds(50)),
              Queued(3, JobPriority::kNormal, kT0, kT0 + absl::Seconds(20)),
              Queued(4, JobPriority::kHigh), Queued(5, JobPriority::kLow, kT0, kT0 + absl::Seconds(1))};
  EXPECT_THAT(QueueOrder(s.queued, kT0, c), ElementsAre(4, 3, 2, 1, 5));
  EXPECT_EQ(QueuePosition(s.queued, s.queued[0], kT0, c), 3);
  EXPECT_EQ(QueuePosition(s.queued, s.queued[2], kT0, c), 1);
  c.deadline_aware = false;
  EXPECT_THAT(QueueOrder(s.queued, kT0, c), ElementsAre(4, 1, 2, 3, 5));
}

TEST(SchedulerPolicyTest, QueuePositionCountsJobsThatRunFirst) {
  const SchedulerConfig c = Config(1);
  std::vector<QueuedJobView> q = {{1, JobPriority::kNormal},
                                  {2, JobPriority::kHigh},
                                  {3, JobPriority::kNormal},
                                  {4, JobPriority::kLow}};
  EXPECT_EQ(QueuePosition(q, q[1], kT0, c), 0);
  EXPECT_EQ(QueuePosition(q, q[0], kT0, c), 1);
  EXPECT_EQ(QueuePosition(q, q[2], kT0, c), 2);
  EXPECT_EQ(QueuePosition(q, q[3], kT0, c), 3);
  // A new arrival (not yet in the list).
  EXPECT_EQ(QueuePosition(q, {5, JobPriority::kNormal}, kT0, c), 3);
  EXPECT_EQ(QueuePosition(q, {5, JobPriority::kHigh}, kT0, c), 1);
}

TEST(SchedulerPolicyTest, HeaderExample) {
  SchedulerSnapshot s;
  s.queued = {{3, JobPriority::kNormal}, {4, JobPriority::kHigh}};
  s.running = {Running(1, "A", 2, 4), Running(2, "A", 1, 4)};
  SchedulerAction a = ChooseNextAction(s, Config(2));
  EXPECT_EQ(a.kind, Kind::kPreempt);
  EXPECT_THAT(a.jobs, ElementsAre(2));
  s.running.pop_back();
  s.queued.push_back({2, JobPriority::kNormal});
  a = ChooseNextAction(s, Config(2));
  EXPECT_EQ(a.kind, Kind::kStart);
  EXPECT_THAT(a.jobs, ElementsAre(4));
  EXPECT_THAT(QueueOrder(s.queued, kT0, Config(2)), ElementsAre(4, 2, 3));
}

TEST(SchedulerPolicyTest, PreemptsTheLowestPriorityMostRecentlyStartedEligibleJob) {
  SchedulerSnapshot s;
  s.queued = {{9, JobPriority::kHigh}};
  s.running = {Running(1, "A", 3, 8, JobPriority::kLow, /*start_order=*/1),
               Running(2, "A", 3, 8, JobPriority::kLow, /*start_order=*/3),
               Running(3, "A", 3, 8, JobPriority::kNormal, /*start_order=*/4)};
  SchedulerAction a = ChooseNextAction(s, Config(3));
  EXPECT_EQ(a.kind, Kind::kPreempt);
  EXPECT_THAT(a.jobs, ElementsAre(2));

  // Not one that is done denoising (it is finished instead, which frees the slot).
  s.running[1].steps_done = 8;
  EXPECT_EQ(ChooseNextAction(s, Config(3)).kind, Kind::kFinish);
  s.running[1].steps_done = 3;
  // Not one that has not stepped since it (re)started.
  s.running[1].steps_at_start = 3;
  EXPECT_THAT(ChooseNextAction(s, Config(3)).jobs, ElementsAre(1));
  // Not one already preempted kMaxPreemptionsPerJob times.
  s.running[0].preemptions = kMaxPreemptionsPerJob;
  a = ChooseNextAction(s, Config(3));
  EXPECT_EQ(a.kind, Kind::kPreempt);
  EXPECT_THAT(a.jobs, ElementsAre(3));  // the normal one is still below high
  s.running[2].preemptions = kMaxPreemptionsPerJob;
  EXPECT_EQ(ChooseNextAction(s, Config(3)).kind, Kind::kStep);

  // Switched off.
  s.running[0].preemptions = 0;
  SchedulerConfig off = Config(3);
  off.preemption = false;
  EXPECT_EQ(ChooseNextAction(s, Config(3)).kind, Kind::kPreempt);
  EXPECT_EQ(ChooseNextAction(s, off).kind, Kind::kStep);
}

TEST(SchedulerPolicyTest, RunningJobsAgeToo) {
  SchedulerConfig c = Config(1);
  c.aging_seconds = 10;
  SchedulerSnapshot s;
  // A low job accepted 10 s before a normal one is never above it: both age alike.
  s.queued = {Queued(2, JobPriority::kLow, kT0)};
  s.running = {Running(1, "A", 2, 9, JobPriority::kNormal)};
  s.running[0].arrival = kT0 + absl::Seconds(10);
  for (int t : {0, 15, 20, 35, 1000}) {
    s.now = kT0 + absl::Seconds(t);
    EXPECT_EQ(ChooseNextAction(s, c).kind, Kind::kStep) << t;
  }
  // One accepted more than aging_seconds before the normal job overtakes it once it has aged.
  s.running[0].arrival = kT0 + absl::Seconds(15);
  s.now = kT0 + absl::Seconds(14);
  EXPECT_EQ(ChooseNextAction(s, c).kind, Kind::kStep);  // low 1, normal 1
  s.now = kT0 + absl::Seconds(20);
  EXPECT_EQ(ChooseNextAction(s, c).kind, Kind::kPreempt);  // low 2, normal 1
  // Equal priorities never preempt each other, however long the queue waits.
  s.queued = {Queued(2, JobPriority::kNormal, kT0 + absl::Seconds(16))};
  s.now = kT0 + absl::Seconds(10000);
  EXPECT_EQ(ChooseNextAction(s, c).kind, Kind::kStep);
}

TEST(SchedulerPolicyTest, DitTokensCountLatentPatchesAndGuidance) {
  engine::ModelDescription wan;  // strides 8 (spatial), 4 (temporal), patch 2
  engine::GenerationRequest r;
  r.width = 832;
  r.height = 480;
  r.num_frames = 81;
  r.guidance_scale = 1.0f;
  EXPECT_EQ(DitTokens(r, wan), 21 * 30 * 52);
  r.guidance_scale = 5.0f;
  EXPECT_EQ(DitTokens(r, wan), 2 * 21 * 30 * 52);
  r.width = r.height = 64;
  r.num_frames = 5;
  EXPECT_EQ(DitTokens(r, wan), 2 * 2 * 4 * 4);
}

// ---- Simulation -------------------------------------------------------------------------

// A fake runner: applies the policy's actions to a model of the executor on a fake clock, and
// checks every decision against an independent statement of the rules.
class Simulator {
 public:
  struct Job {
    JobPriority priority;
    std::string key;
    int64_t tokens;
    int total_steps;
    absl::Time arrival;
    absl::Time deadline = absl::InfiniteFuture();
    // Outcome.
    int steps_run = 0;
    int preemptions = 0;
    bool started = false;
    bool finished = false;
    absl::Time first_start;
    absl::Time finish;
  };

  explicit Simulator(SchedulerConfig config) : config_(config) {}

  uint64_t Arrive(JobPriority priority, std::string key, int64_t tokens, int steps,
                  absl::Time deadline = absl::InfiniteFuture()) {
    const uint64_t id = next_++;
    Job job{priority, std::move(key), tokens, steps, now_, deadline};
    jobs_[id] = job;
    QueuedJobView q = Queued(id, priority, now_, deadline);
    q.tokens = tokens;
    snapshot_.queued.push_back(q);
    return id;
  }

  // One decision and its (simulated) execution; false when idle.
  bool Act() {
    snapshot_.now = now_;
    const SchedulerAction a = ChooseNextAction(snapshot_, config_);
    ++actions_;
    switch (a.kind) {
      case Kind::kIdle:
        EXPECT_TRUE(snapshot_.queued.empty());
        EXPECT_TRUE(snapshot_.running.empty());
        now_ += absl::Seconds(1);
        return false;
      case Kind::kStart:
        CheckStart(a);
        Start(a.jobs.at(0));
        now_ += absl::Milliseconds(200);
        break;
      case Kind::kPreempt:
        CheckPreempt(a);
        Preempt(a.jobs.at(0));
        break;
      case Kind::kStep:
        CheckStep(a);
        for (uint64_t id : a.jobs) {
          ++RunningOf(id)->steps_done;
          ++jobs_[id].steps_run;
        }
        ++steps_;
        batch_sizes_.push_back(static_cast<int>(a.jobs.size()));
        now_ += absl::Milliseconds(500 + 100 * static_cast<int>(a.jobs.size()));
        break;
      case Kind::kFinish: {
        const uint64_t id = a.jobs.at(0);
        RunningJobView* r = RunningOf(id);
        EXPECT_TRUE(r->denoise_done());
        for (const RunningJobView& other : snapshot_.running) {
          if (other.denoise_done()) EXPECT_LE(id, other.sequence);
        }
        Job& job = jobs_[id];
        EXPECT_EQ(job.steps_run, job.total_steps) << "job " << id;  // every step, once
        job.finished = true;
        job.finish = now_;
        snapshot_.running.erase(snapshot_.running.begin() + (r - snapshot_.running.data()));
        now_ += absl::Milliseconds(300);
        break;
      }
    }
    return true;
  }

  void AdvanceIdle(absl::Duration d) { now_ += d; }
  absl::Time now() const { return now_; }
  const std::map<uint64_t, Job>& jobs() const { return jobs_; }
  const std::vector<uint64_t>& fresh_starts() const { return fresh_starts_; }
  int preemptions() const { return preemptions_; }
  int steps() const { return steps_; }
  const std::vector<int>& batch_sizes() const { return batch_sizes_; }
  bool busy() const { return !snapshot_.queued.empty() || !snapshot_.running.empty(); }

 private:
  struct Rank {
    int priority;
    bool no_deadline;
    absl::Time deadline;
    uint64_t sequence;
  };
  // The ordering stated in the header, written out again.
  int Class(JobPriority priority, absl::Time arrival) const {
    const int aged =
        config_.aging_seconds > 0 && now_ > arrival
            ? static_cast<int>(absl::ToDoubleSeconds(now_ - arrival) / config_.aging_seconds)
            : 0;
    return static_cast<int>(priority) + aged;
  }
  Rank QueuedRank(const QueuedJobView& q) const {
    const bool has_deadline = config_.deadline_aware && q.deadline != absl::InfiniteFuture();
    return {Class(q.priority, q.arrival), !has_deadline,
            has_deadline ? q.deadline : absl::InfiniteFuture(), q.sequence};
  }
  int RunningClass(const RunningJobView& r) const { return Class(r.priority, r.arrival); }
  static bool Before(const Rank& a, const Rank& b) {
    if (a.priority != b.priority) return a.priority > b.priority;
    if (a.no_deadline != b.no_deadline) return b.no_deadline;
    if (a.deadline != b.deadline) return a.deadline < b.deadline;
    return a.sequence < b.sequence;
  }

  RunningJobView* RunningOf(uint64_t id) {
    for (RunningJobView& r : snapshot_.running) {
      if (r.sequence == id) return &r;
    }
    ADD_FAILURE() << "job " << id << " is not running";
    return nullptr;
  }

  void CheckStart(const SchedulerAction& a) {
    EXPECT_LT(static_cast<int>(snapshot_.running.size()), config_.max_running_jobs);
    for (const RunningJobView& r : snapshot_.running) EXPECT_FALSE(r.denoise_done());
    const QueuedJobView* chosen = nullptr;
    for (const QueuedJobView& q : snapshot_.queued) {
      if (q.sequence == a.jobs.at(0)) chosen = &q;
    }
    ASSERT_NE(chosen, nullptr);
    for (const QueuedJobView& q : snapshot_.queued) {
      // Priority (aged), then deadline, then FIFO: nothing queued may come before the choice.
      EXPECT_FALSE(Before(QueuedRank(q), QueuedRank(*chosen)))
          << "started " << chosen->sequence << " before " << q.sequence;
    }
  }

  void CheckPreempt(const SchedulerAction& a) {
    ASSERT_TRUE(config_.preemption);
    EXPECT_EQ(static_cast<int>(snapshot_.running.size()), config_.max_running_jobs);
    int best = -1;
    for (const QueuedJobView& q : snapshot_.queued) best = std::max(best, QueuedRank(q).priority);
    const RunningJobView* victim = RunningOf(a.jobs.at(0));
    ASSERT_NE(victim, nullptr);
    EXPECT_LT(RunningClass(*victim), best);  // strictly higher waits
    EXPECT_FALSE(victim->denoise_done());
    EXPECT_GE(victim->steps_done - victim->steps_at_start, kMinStepsBeforePreemption);
    EXPECT_LT(victim->preemptions, kMaxPreemptionsPerJob);
    for (const RunningJobView& r : snapshot_.running) {
      const bool eligible = !r.denoise_done() &&
                            r.steps_done - r.steps_at_start >= kMinStepsBeforePreemption &&
                            r.preemptions < kMaxPreemptionsPerJob && RunningClass(r) < best;
      if (!eligible || r.sequence == victim->sequence) continue;
      // The victim is the lowest class, and the most recently started within it.
      EXPECT_TRUE(RunningClass(*victim) < RunningClass(r) ||
                  (RunningClass(*victim) == RunningClass(r) &&
                   victim->start_order > r.start_order));
    }
  }

  void CheckStep(const SchedulerAction& a) {
    ASSERT_FALSE(a.jobs.empty());
    const RunningJobView* leader = RunningOf(a.jobs[0]);
    ASSERT_NE(leader, nullptr);
    int64_t tokens = 0;
    for (uint64_t id : a.jobs) {
      const RunningJobView* r = RunningOf(id);
      ASSERT_NE(r, nullptr);
      EXPECT_FALSE(r->denoise_done());
      EXPECT_EQ(r->batch_key, leader->batch_key);  // never mixes shapes
      tokens += r->tokens;
    }
    std::vector<uint64_t> sorted = a.jobs;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(std::unique(sorted.begin(), sorted.end()), sorted.end());
    if (config_.max_batch_tokens > 0 && a.jobs.size() > 1) {
      EXPECT_LE(tokens, config_.max_batch_tokens);
    }
    // Nothing with the key that would still fit was left out.
    for (const RunningJobView& r : snapshot_.running) {
      if (r.denoise_done() || r.batch_key != leader->batch_key) continue;
      if (std::find(a.jobs.begin(), a.jobs.end(), r.sequence) != a.jobs.end()) continue;
      EXPECT_TRUE(config_.max_batch_tokens > 0 && tokens + r.tokens > config_.max_batch_tokens)
          << "job " << r.sequence << " could have joined";
    }
    // The leader is of the highest class running.
    for (const RunningJobView& r : snapshot_.running) {
      if (!r.denoise_done()) EXPECT_LE(RunningClass(r), RunningClass(*leader));
    }
  }

  void Start(uint64_t id) {
    auto it = std::find_if(snapshot_.queued.begin(), snapshot_.queued.end(),
                           [&](const QueuedJobView& q) { return q.sequence == id; });
    snapshot_.queued.erase(it);
    Job& job = jobs_[id];
    RunningJobView r;
    r.sequence = id;
    r.batch_key = job.key;
    r.total_steps = job.total_steps;
    r.steps_done = job.steps_run;  // a resumed job continues where it stopped
    r.steps_at_start = job.steps_run;
    r.priority = job.priority;
    r.arrival = job.arrival;
    r.tokens = job.tokens;
    r.deadline = job.deadline;
    r.start_order = ++start_order_;
    r.preemptions = job.preemptions;
    snapshot_.running.push_back(r);
    if (!job.started) {
      job.started = true;
      job.first_start = now_;
      fresh_starts_.push_back(id);
    }
  }

  void Preempt(uint64_t id) {
    RunningJobView* r = RunningOf(id);
    Job& job = jobs_[id];
    EXPECT_EQ(r->steps_done, job.steps_run);
    ++job.preemptions;
    ++preemptions_;
    QueuedJobView q = Queued(id, job.priority, job.arrival, job.deadline);
    q.tokens = job.tokens;
    snapshot_.running.erase(snapshot_.running.begin() + (r - snapshot_.running.data()));
    snapshot_.queued.push_back(q);
  }

  SchedulerConfig config_;
  SchedulerSnapshot snapshot_;
  std::map<uint64_t, Job> jobs_;
  absl::Time now_ = kT0;
  uint64_t next_ = 1;
  uint64_t start_order_ = 0;
  int actions_ = 0;
  int steps_ = 0;
  int preemptions_ = 0;
  std::vector<uint64_t> fresh_starts_;
  std::vector<int> batch_sizes_;
};

struct Shape {
  const char* key;
  int64_t tokens;
};
constexpr Shape kShapes[] = {{"64x64x5:cfg", 64}, {"128x64x9:cfg", 192}, {"64x64x5:nocfg", 32}};

// Random arrivals of every kind (priorities, shapes, step counts, some deadlines) for a few
// configurations; every decision is checked by the Simulator, then the outcome here.
TEST(SchedulerPolicySimulationTest, RandomArrivalsKeepEveryRule) {
  struct Case {
    int max_running;
    int64_t max_batch_tokens;
    double aging_seconds;
    bool preemption;
    bool deadline_aware;
  };
  for (const Case& k : {Case{1, 0, 60, true, true}, Case{4, 0, 60, true, true},
                        Case{4, 256, 30, true, true}, Case{8, 400, 0, false, false},
                        Case{3, 200, 20, true, false}}) {
    SCOPED_TRACE(testing::Message() << "max_running=" << k.max_running << " budget="
                                    << k.max_batch_tokens << " aging=" << k.aging_seconds
                                    << " preemption=" << k.preemption);
    SchedulerConfig config = Config(k.max_running);
    config.max_batch_tokens = k.max_batch_tokens;
    config.aging_seconds = k.aging_seconds;
    config.preemption = k.preemption;
    config.deadline_aware = k.deadline_aware;
    Simulator sim(config);
    std::mt19937 rng(20260 + k.max_running * 7 + static_cast<int>(k.max_batch_tokens));
    constexpr int kJobs = 150;
    int arrived = 0;
    int actions = 0;
    while ((arrived < kJobs || sim.busy()) && actions < 20000) {
      // Bursty arrivals: sometimes several between two decisions.
      while (arrived < kJobs && rng() % 4 == 0) {
        const int p = static_cast<int>(rng() % 10);
        const JobPriority priority =
            p < 3 ? JobPriority::kLow : (p < 8 ? JobPriority::kNormal : JobPriority::kHigh);
        const Shape& shape = kShapes[rng() % 3];
        const int steps = 1 + static_cast<int>(rng() % 12);
        const absl::Time deadline = rng() % 4 == 0
                                        ? sim.now() + absl::Seconds(5 + rng() % 120)
                                        : absl::InfiniteFuture();
        sim.Arrive(priority, shape.key, shape.tokens, steps, deadline);
        ++arrived;
      }
      if (!sim.Act()) sim.AdvanceIdle(absl::Seconds(1));
      ++actions;
      if (::testing::Test::HasFailure()) return;
    }
    ASSERT_LT(actions, 20000) << "did not drain";
    EXPECT_GT(sim.steps(), 300);

    // Every job finished with all its steps (checked at each finish).
    int finished = 0;
    for (const auto& [id, job] : sim.jobs()) finished += job.finished;
    EXPECT_EQ(finished, kJobs);

    // FIFO within a class: jobs of one priority without deadlines first start in arrival order
    // (a preempted job's resumption is not a first start).
    std::map<JobPriority, uint64_t> last;
    for (uint64_t id : sim.fresh_starts()) {
      const Simulator::Job& job = sim.jobs().at(id);
      if (job.deadline != absl::InfiniteFuture() && k.deadline_aware) continue;
      EXPECT_GT(id, last[job.priority]) << "FIFO broken in class " << static_cast<int>(job.priority);
      last[job.priority] = id;
    }
    if (k.preemption && k.max_running > 1) EXPECT_GT(sim.preemptions(), 0);
    if (!k.preemption) EXPECT_EQ(sim.preemptions(), 0);
    if (k.max_running > 1) {
      EXPECT_GT(*std::max_element(sim.batch_sizes().begin(), sim.batch_sizes().end()), 1);
    }
  }
}

// Saturating high-priority load: a low job, with aging, still starts within 2 x aging_seconds
// plus the time to drain what was queued ahead of it; without aging it waits for the whole burst.
TEST(SchedulerPolicySimulationTest, AgingPreventsStarvation) {
  for (double aging : {30.0, 0.0}) {
    SchedulerConfig config = Config(1);
    config.aging_seconds = aging;
    Simulator sim(config);
    // Highs queued ahead, then the low job, then a steady stream of highs faster than service.
    for (int i = 0; i < 3; ++i) sim.Arrive(JobPriority::kHigh, "A", 64, 4);
    const uint64_t low = sim.Arrive(JobPriority::kLow, "A", 64, 4);
    const absl::Time low_arrival = sim.now();
    int highs = 0;
    for (int action = 0; action < 3000 && sim.busy(); ++action) {
      if (action % 3 == 0 && highs < 400) {
        sim.Arrive(JobPriority::kHigh, "A", 64, 4);
        ++highs;
      }
      sim.Act();
      if (::testing::Test::HasFailure()) return;
    }
    const Simulator::Job& job = sim.jobs().at(low);
    ASSERT_TRUE(job.started);
    const double waited = absl::ToDoubleSeconds(job.first_start - low_arrival);
    // Highs in the queue with the low job after 2 x aging: at most those that arrived within
    // that window (one per 3 actions of >= 0.2 s), each needing ~4 x 0.6 + 0.5 s of service.
    if (aging > 0) {
      const double window = 2 * aging;
      const double ahead = 3 + window / (3 * 0.2);
      EXPECT_LE(waited, window + ahead * 3.0) << "aging " << aging;
      // And it was not simply the end of the burst that let it run.
      int highs_after = 0;
      for (const auto& [id, j] : sim.jobs()) {
        if (id > low && j.priority == JobPriority::kHigh && j.first_start > job.first_start) {
          ++highs_after;
        }
      }
      EXPECT_GT(highs_after, 100);
    } else {
      for (const auto& [id, j] : sim.jobs()) {
        if (j.priority == JobPriority::kHigh) EXPECT_LT(j.first_start, job.first_start);
      }
    }
  }
}

// Fairness among equals: identical jobs of one class under max_running_jobs = 2 finish in arrival
// order, and each one's wait grows with its place in line, never jumping ahead.
TEST(SchedulerPolicySimulationTest, EqualJobsAreServedInArrivalOrder) {
  SchedulerConfig config = Config(2);
  Simulator sim(config);
  for (int i = 0; i < 40; ++i) sim.Arrive(JobPriority::kNormal, "A", 64, 6);
  while (sim.busy()) {
    sim.Act();
    if (::testing::Test::HasFailure()) return;
  }
  absl::Time previous = absl::InfinitePast();
  for (const auto& [id, job] : sim.jobs()) {
    EXPECT_TRUE(job.finished);
    EXPECT_GE(job.finish, previous) << id;
    previous = job.finish;
  }
  EXPECT_EQ(sim.preemptions(), 0);
  // Both slots share every step: one batch of 2 per step.
  for (size_t i = 0; i + 1 < sim.batch_sizes().size(); ++i) EXPECT_EQ(sim.batch_sizes()[i], 2);
}

// Preemption end to end: a high job arriving while lows fill every slot starts after one
// preemption, and the preempted low job later resumes and completes all its steps.
TEST(SchedulerPolicySimulationTest, PreemptedJobsResumeAndFinish) {
  SchedulerConfig config = Config(2);
  Simulator sim(config);
  const uint64_t a = sim.Arrive(JobPriority::kLow, "A", 64, 10);
  const uint64_t b = sim.Arrive(JobPriority::kLow, "A", 64, 10);
  for (int i = 0; i < 6; ++i) sim.Act();  // both started and stepping
  const uint64_t h = sim.Arrive(JobPriority::kHigh, "B", 64, 3);
  while (sim.busy()) {
    sim.Act();
    if (::testing::Test::HasFailure()) return;
  }
  EXPECT_EQ(sim.preemptions(), 1);
  EXPECT_EQ(sim.jobs().at(b).preemptions, 1);  // the most recently started of the two lows
  EXPECT_EQ(sim.jobs().at(a).preemptions, 0);
  EXPECT_LT(sim.jobs().at(h).finish, sim.jobs().at(b).finish);
  for (uint64_t id : {a, b, h}) EXPECT_TRUE(sim.jobs().at(id).finished);
}

}  // namespace
}  // namespace sparge::server
