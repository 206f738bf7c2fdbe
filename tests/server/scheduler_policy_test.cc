// The scheduling policy as a pure function: hand-built snapshots, then a simulation of many jobs
// with a fake runner (no threads, no clock) checking the invariants.
#include "server/scheduler_policy.h"

#include <map>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sparge::server {
namespace {

using Kind = SchedulerAction::Kind;
using ::testing::ElementsAre;

SchedulerConfig Config(int max_running) {
  SchedulerConfig c;
  c.max_running_jobs = max_running;
  return c;
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

TEST(SchedulerPolicyTest, OneAtATimeStepsTheRunningJobBeforeStartingAnother) {
  SchedulerSnapshot s;
  s.queued = {{2, JobPriority::kHigh}};
  s.running = {{1, "A", 1, 4}};
  SchedulerAction a = ChooseNextAction(s, Config(1));
  EXPECT_EQ(a.kind, Kind::kStep);
  EXPECT_THAT(a.jobs, ElementsAre(1));
}

TEST(SchedulerPolicyTest, FinishesDoneJobsFirst) {
  SchedulerSnapshot s;
  s.queued = {{4, JobPriority::kNormal}};
  s.running = {{2, "A", 1, 4}, {3, "A", 4, 4}, {1, "B", 2, 2}};
  SchedulerAction a = ChooseNextAction(s, Config(4));
  EXPECT_EQ(a.kind, Kind::kFinish);
  EXPECT_THAT(a.jobs, ElementsAre(1));
}

TEST(SchedulerPolicyTest, AdmitsNewJobsBetweenStepsUpToTheLimit) {
  SchedulerSnapshot s;
  s.queued = {{3, JobPriority::kNormal}};
  s.running = {{1, "A", 2, 4}};
  SchedulerAction a = ChooseNextAction(s, Config(2));
  EXPECT_EQ(a.kind, Kind::kStart);
  EXPECT_THAT(a.jobs, ElementsAre(3));
}

TEST(SchedulerPolicyTest, BatchesOnlyJobsWithTheOldestJobsKey) {
  SchedulerSnapshot s;
  s.running = {{7, "A", 0, 4}, {2, "B", 3, 4}, {5, "B", 0, 4}, {3, "A", 1, 4}};
  SchedulerAction a = ChooseNextAction(s, Config(4));
  EXPECT_EQ(a.kind, Kind::kStep);
  EXPECT_THAT(a.jobs, ElementsAre(2, 5));
}

TEST(SchedulerPolicyTest, HeaderExample) {
  SchedulerSnapshot s;
  s.queued = {{3, JobPriority::kNormal}, {4, JobPriority::kHigh}};
  s.running = {{1, "A", 2, 4}, {2, "A", 0, 4}};
  SchedulerAction a = ChooseNextAction(s, Config(2));
  EXPECT_EQ(a.kind, Kind::kStep);
  EXPECT_THAT(a.jobs, ElementsAre(1, 2));
  s.running = {{1, "A", 4, 4}, {2, "A", 2, 4}};
  a = ChooseNextAction(s, Config(2));
  EXPECT_EQ(a.kind, Kind::kFinish);
  EXPECT_THAT(a.jobs, ElementsAre(1));
  s.running = {{2, "A", 2, 4}};
  a = ChooseNextAction(s, Config(2));
  EXPECT_EQ(a.kind, Kind::kStart);
  EXPECT_THAT(a.jobs, ElementsAre(4));
}

TEST(SchedulerPolicyTest, QueuePositionCountsJobsThatRunFirst) {
  std::vector<QueuedJobView> q = {{1, JobPriority::kNormal},
                                  {2, JobPriority::kHigh},
                                  {3, JobPriority::kNormal},
                                  {4, JobPriority::kLow}};
  EXPECT_EQ(QueuePosition(q, JobPriority::kHigh, 2), 0);
  EXPECT_EQ(QueuePosition(q, JobPriority::kNormal, 1), 1);
  EXPECT_EQ(QueuePosition(q, JobPriority::kNormal, 3), 2);
  EXPECT_EQ(QueuePosition(q, JobPriority::kLow, 4), 3);
  // A new arrival (not yet in the list).
  EXPECT_EQ(QueuePosition(q, JobPriority::kNormal, 5), 3);
  EXPECT_EQ(QueuePosition(q, JobPriority::kHigh, 5), 1);
}

// Simulates the executor applying the policy to many random jobs, checking at every action that
// no limit is broken, then that every job finished, with FIFO order within each priority.
TEST(SchedulerPolicyTest, SimulationKeepsInvariants) {
  for (int max_running : {1, 2, 4}) {
    std::mt19937 rng(1234 + max_running);
    struct Job {
      JobPriority priority;
      std::string key;
      int total;
    };
    std::map<uint64_t, Job> jobs;
    SchedulerSnapshot s;
    uint64_t next = 1;
    std::vector<uint64_t> started_order, finished;
    int actions = 0;
    for (; actions < 10000; ++actions) {
      // Arrivals between actions.
      if (next <= 60 && rng() % 3 == 0) {
        Job j{static_cast<JobPriority>(rng() % 3), (rng() % 2) ? "A" : "B",
              1 + static_cast<int>(rng() % 5)};
        jobs[next] = j;
        s.queued.push_back({next, j.priority});
        ++next;
      }
      SchedulerAction a = ChooseNextAction(s, Config(max_running));
      if (a.kind == Kind::kIdle) {
        ASSERT_TRUE(s.queued.empty());
        ASSERT_TRUE(s.running.empty());
        if (next > 60) break;
        continue;
      }
      if (a.kind == Kind::kStart) {
        ASSERT_LT(static_cast<int>(s.running.size()), max_running);
        const uint64_t id = a.jobs.at(0);
        // Nothing queued may outrank the chosen job.
        for (const QueuedJobView& q : s.queued) {
          ASSERT_FALSE(q.priority > jobs[id].priority ||
                       (q.priority == jobs[id].priority && q.sequence < id));
        }
        s.queued.erase(std::find_if(s.queued.begin(), s.queued.end(),
                                    [&](const QueuedJobView& q) { return q.sequence == id; }));
        s.running.push_back({id, jobs[id].key, 0, jobs[id].total});
        started_order.push_back(id);
      } else if (a.kind == Kind::kStep) {
        ASSERT_FALSE(a.jobs.empty());
        for (uint64_t id : a.jobs) {
          auto it = std::find_if(s.running.begin(), s.running.end(),
                                 [&](const RunningJobView& r) { return r.sequence == id; });
          ASSERT_NE(it, s.running.end());
          ASSERT_FALSE(it->denoise_done());
          ASSERT_EQ(it->batch_key, jobs[a.jobs[0]].key);  // never mixes shapes
          ++it->steps_done;
        }
      } else {
        auto it = std::find_if(s.running.begin(), s.running.end(),
                               [&](const RunningJobView& r) { return r.sequence == a.jobs[0]; });
        ASSERT_TRUE(it->denoise_done());
        finished.push_back(it->sequence);
        s.running.erase(it);
      }
    }
    ASSERT_LT(actions, 10000) << "did not drain";
    EXPECT_EQ(finished.size(), jobs.size());
  }
}

}  // namespace
}  // namespace sparge::server
