// The executor with a FakePipeline: event order, cancellation within one step, deadlines on a
// fake clock, queue limits and positions, failures isolated to their job, batching, token
// budgets, preemption and resumption, out-of-memory retries, memory and overhead metrics, shutdown.
// Synchronization is by notifications from the fake's step hook: no sleeps.
#include "server/executor.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/testing/fake_pipeline.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using ::testing::HasSubstr;
using testing::FakeClock;
using testing::FakePipelineCounters;
using testing::FakePipelineOptions;

constexpr absl::Duration kWait = absl::Seconds(30);  // a safety net, never reached when passing

struct Drained {
  std::vector<v1::GenerateEvent> events;
  absl::Status status = absl::UnknownError("not drained");
};

Drained Drain(JobHandle& handle) {
  Drained d;
  while (true) {
    JobEventChannel::Item item = handle.events().TryPop();
    if (item.event.has_value()) {
      d.events.push_back(*item.event);
    } else if (item.final_status.has_value()) {
      d.status = *item.final_status;
      return d;
    } else if (!handle.events().WaitReadable(kWait)) {
      ADD_FAILURE() << "job " << handle.id() << " never ended";
      return d;
    }
  }
}

ResolvedRequest Request(const std::string& prompt, int steps = 4) {
  v1::GenerateRequest r;
  r.set_prompt(prompt);
  r.set_num_steps(steps);
  r.set_width(64);
  r.set_height(64);
  r.set_num_frames(5);
  absl::StatusOr<ResolvedRequest> resolved =
      ResolveRequest(r, RequestLimits(), RequestDefaults(), [] { return uint64_t{99}; });
  EXPECT_TRUE(resolved.ok()) << resolved.status();
  return *resolved;
}

class ExecutorTest : public ::testing::Test {
 protected:
  void StartExecutor(FakePipelineOptions fake = {}, int max_queue = 8, int max_running = 1) {
    ExecutorOptions options;
    options.create_pipeline = testing::FakePipelineFactory(std::move(fake), counters_);
    options.encode_video = testing::FakeVideoEncoder();
    options.clock = &clock_;
    options.metrics = &metrics_;
    options.scheduler = scheduler_;
    options.on_iteration = on_iteration_;
    options.scheduler.max_queue_length = max_queue;
    options.scheduler.max_running_jobs = max_running;
    options.output_chunk_bytes = 1024;
    absl::StatusOr<std::unique_ptr<Executor>> e = Executor::Create(std::move(options));
    ASSERT_TRUE(e.ok()) << e.status();
    executor_ = *std::move(e);
  }
  void StartReady(FakePipelineOptions fake = {}, int max_queue = 8, int max_running = 1) {
    StartExecutor(std::move(fake), max_queue, max_running);
    ASSERT_TRUE(executor_->WaitUntilReady(kWait).ok());
  }
  std::shared_ptr<JobHandle> Submit(const std::string& prompt, int steps = 4,
                                    absl::Time deadline = absl::InfiniteFuture()) {
    absl::StatusOr<std::shared_ptr<JobHandle>> h =
        executor_->Submit(Request(prompt, steps), deadline);
    EXPECT_TRUE(h.ok()) << h.status();
    return h.ok() ? *h : nullptr;
  }

  std::shared_ptr<JobHandle> Submit(ResolvedRequest request) {
    absl::StatusOr<std::shared_ptr<JobHandle>> h = executor_->Submit(std::move(request));
    EXPECT_TRUE(h.ok()) << h.status();
    return h.ok() ? *h : nullptr;
  }

  SchedulerConfig scheduler_;  // max_queue_length and max_running_jobs come from StartExecutor
  std::function<void(const IterationTiming&)> on_iteration_;
  std::shared_ptr<FakePipelineCounters> counters_ = std::make_shared<FakePipelineCounters>();
  FakeClock clock_;
  ServerMetrics metrics_;
  std::unique_ptr<Executor> executor_;
};

TEST_F(ExecutorTest, EventsArriveInOrderAndTheFileIsComplete) {
  StartReady();
  EXPECT_EQ(counters_->warmups.load(), 1);
  std::shared_ptr<JobHandle> job = Submit("a fox", 4);
  Drained d = Drain(*job);
  ASSERT_TRUE(d.status.ok()) << d.status;
  ASSERT_GE(d.events.size(), 9u);

  // accepted, TEXT_ENCODE, 4 x DENOISE, VAE_DECODE, VIDEO_ENCODE, chunk..., completed.
  size_t i = 0;
  ASSERT_TRUE(d.events[i].has_accepted());
  EXPECT_EQ(d.events[i].accepted().job_id(), job->id());
  EXPECT_EQ(d.events[i].accepted().queue_position(), 0);
  EXPECT_EQ(d.events[i].accepted().resolved_request().seed(), 99u);
  ++i;
  ASSERT_TRUE(d.events[i].has_progress());
  EXPECT_EQ(d.events[i].progress().stage(), v1::STAGE_TEXT_ENCODE);
  ++i;
  const engine::SparsityKnobs knobs = job->request().engine.sparsity;
  for (int step = 1; step <= 4; ++step, ++i) {
    ASSERT_TRUE(d.events[i].has_progress()) << i;
    const v1::JobProgress& p = d.events[i].progress();
    EXPECT_EQ(p.stage(), v1::STAGE_DENOISE);
    EXPECT_EQ(p.step(), step);
    EXPECT_EQ(p.total_steps(), 4);
    EXPECT_FLOAT_EQ(p.achieved_sparsity(), testing::FakeSparsity(knobs, step - 1));
    EXPECT_GE(p.eta_seconds(), 0.0);
  }
  EXPECT_FLOAT_EQ(d.events[2].progress().achieved_sparsity(), 0.0f);  // dense_steps = 1
  EXPECT_GT(d.events[3].progress().achieved_sparsity(), 0.0f);
  EXPECT_EQ(d.events[i++].progress().stage(), v1::STAGE_VAE_DECODE);
  EXPECT_EQ(d.events[i++].progress().stage(), v1::STAGE_VIDEO_ENCODE);
  std::string file;
  for (; i < d.events.size() && d.events[i].has_chunk(); ++i) {
    EXPECT_EQ(d.events[i].chunk().offset(), static_cast<int64_t>(file.size()));
    EXPECT_LE(d.events[i].chunk().data().size(), 1024u);
    file += d.events[i].chunk().data();
  }
  ASSERT_EQ(i + 1, d.events.size());
  ASSERT_TRUE(d.events[i].has_completed());
  const v1::GenerateCompleted& c = d.events[i].completed();
  EXPECT_EQ(c.file_size_bytes(), static_cast<int64_t>(file.size()));
  EXPECT_GT(file.size(), 1024u);  // several chunks
  EXPECT_EQ(file.rfind("FAKE mp4 64x64x5@16\n", 0), 0u);
  EXPECT_EQ(c.content_type(), "video/mp4");
  EXPECT_EQ(c.job_id(), job->id());
  EXPECT_EQ(c.width(), 64);
  EXPECT_EQ(c.num_frames(), 5);
  EXPECT_EQ(c.seed(), 99u);
  const float expected_mean = (0 + 3 * testing::FakeSparsity(knobs, 1)) / 4;
  EXPECT_NEAR(c.mean_achieved_sparsity(), expected_mean, 1e-6);
  EXPECT_EQ(job->state(), JobState::kSucceeded);
  EXPECT_EQ(counters_->live_jobs.load(), 0);
}

TEST_F(ExecutorTest, CancellationStopsWithinOneStepAndFreesTheJob) {
  absl::Notification submitted;
  std::shared_ptr<JobHandle> job;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>&, int steps_done) {
    submitted.WaitForNotification();
    if (steps_done == 2) job->Cancel(CancelReason::kClient);  // as if the client hung up
  };
  StartReady(fake);
  job = Submit("cancel me", 10);
  submitted.Notify();
  Drained d = Drain(*job);
  EXPECT_EQ(d.status.code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(d.status.message(), HasSubstr("after step 2/10"));
  EXPECT_EQ(counters_->job_steps.load(), 2);  // no step after the one that saw the cancel
  EXPECT_EQ(counters_->live_jobs.load(), 0);
  EXPECT_EQ(counters_->decodes.load(), 0);
  for (const v1::GenerateEvent& e : d.events) {
    EXPECT_FALSE(e.has_chunk());
    EXPECT_FALSE(e.has_completed());
  }
  EXPECT_EQ(job->state(), JobState::kCancelled);
  EXPECT_THAT(metrics_.SerializeText(),
              HasSubstr("sparge_cancellations_total{reason=\"client\"} 1"));
  // The executor keeps serving.
  EXPECT_TRUE(Drain(*Submit("next", 2)).status.ok());
}

TEST_F(ExecutorTest, AttentionSecondsCountOncePerBatchedStep) {
  FakePipelineOptions fake;
  fake.attention_seconds = 0.25;  // exact in binary, so the sum prints exactly
  StartReady(fake);
  EXPECT_THAT(metrics_.SerializeText(), HasSubstr("sparge_attention_seconds_total 0\n"));
  ASSERT_TRUE(Drain(*Submit("timed", 4)).status.ok());
  EXPECT_EQ(counters_->step_calls.load(), 4);
  EXPECT_THAT(metrics_.SerializeText(), HasSubstr("sparge_attention_seconds_total 1\n"));
}

TEST_F(ExecutorTest, DeadlineOnTheInjectedClockStopsTheJob) {
  absl::Notification submitted;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>&, int steps_done) {
    submitted.WaitForNotification();
    if (steps_done == 1) clock_.Advance(absl::Seconds(11));
  };
  StartReady(fake);
  std::shared_ptr<JobHandle> job = Submit("slow", 4, clock_.Now() + absl::Seconds(10));
  submitted.Notify();
  Drained d = Drain(*job);
  EXPECT_EQ(d.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(counters_->job_steps.load(), 1);
  EXPECT_EQ(counters_->live_jobs.load(), 0);
  EXPECT_EQ(job->state(), JobState::kDeadlineExceeded);
  EXPECT_THAT(metrics_.SerializeText(),
              HasSubstr("sparge_cancellations_total{reason=\"deadline\"} 1"));
}

TEST_F(ExecutorTest, QueueFullIsResourceExhaustedAndQueuedJobsStillRun) {
  absl::Notification first_in_step, release;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int) {
    if (prompts[0] == "first") {
      first_in_step.Notify();
      release.WaitForNotification();
    }
  };
  StartReady(fake, /*max_queue=*/1);
  std::shared_ptr<JobHandle> first = Submit("first", 1);
  first_in_step.WaitForNotification();
  std::shared_ptr<JobHandle> second = Submit("second", 1);
  EXPECT_EQ(executor_->queue_depth(), 1);
  absl::StatusOr<std::shared_ptr<JobHandle>> third = executor_->Submit(Request("third"));
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(third.status().message(), "queue full (max_queue_length=1)");
  release.Notify();
  EXPECT_TRUE(Drain(*first).status.ok());
  EXPECT_TRUE(Drain(*second).status.ok());
}

TEST_F(ExecutorTest, QueuePositionsFollowPriorityAndAreUpdated) {
  absl::Notification first_in_step, release;
  std::vector<std::string> start_order;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    if (steps_done == 1) start_order.push_back(prompts[0]);
    if (prompts[0] == "a") {
      first_in_step.Notify();
      release.WaitForNotification();
    }
  };
  StartReady(fake);
  std::shared_ptr<JobHandle> a = Submit("a", 1);
  first_in_step.WaitForNotification();
  std::shared_ptr<JobHandle> b = Submit("b", 1);
  std::shared_ptr<JobHandle> c = Submit("c", 1);
  ResolvedRequest urgent = Request("d", 1);
  urgent.priority = JobPriority::kHigh;
  absl::StatusOr<std::shared_ptr<JobHandle>> d = executor_->Submit(urgent);
  ASSERT_TRUE(d.ok());
  release.Notify();
  Drained da = Drain(*a), db = Drain(*b), dc = Drain(*c), dd = Drain(**d);
  EXPECT_THAT(start_order, ::testing::ElementsAre("a", "d", "b", "c"));
  EXPECT_EQ(db.events[0].accepted().queue_position(), 0);
  EXPECT_EQ(dc.events[0].accepted().queue_position(), 1);
  EXPECT_EQ(dd.events[0].accepted().queue_position(), 0);
  // b waited first in line behind the running a, was pushed back by d, then moved up when d
  // started.
  std::vector<int> b_positions;
  for (const v1::GenerateEvent& e : db.events) {
    if (e.has_progress() && e.progress().stage() == v1::STAGE_QUEUED) {
      b_positions.push_back(e.progress().queue_position());
    }
  }
  EXPECT_THAT(b_positions, ::testing::ElementsAre(0, 1, 0));
}

TEST_F(ExecutorTest, QueuedJobsLearnTheirPositionAndAnEtaAtOnce) {
  absl::Notification a_in_second_step, release;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    clock_.Advance(absl::Seconds(1));  // every step takes 1 s on the injected clock
    if (prompts[0] == "a" && steps_done == 2) {
      a_in_second_step.Notify();
      release.WaitForNotification();
    }
  };
  StartReady(fake);
  std::shared_ptr<JobHandle> a = Submit("a", 4);
  a_in_second_step.WaitForNotification();
  // Measured: 1 s per step of a 64x64x5 job; a has 3 steps left as of its last boundary.
  std::shared_ptr<JobHandle> b = Submit("b", 4);
  std::shared_ptr<JobHandle> c = Submit("c", 2);
  release.Notify();
  Drained db = Drain(*b), dc = Drain(*c);
  ASSERT_TRUE(Drain(*a).status.ok());
  ASSERT_TRUE(db.status.ok());
  ASSERT_GE(db.events.size(), 2u);
  ASSERT_TRUE(db.events[1].has_progress());
  const v1::JobProgress& pb = db.events[1].progress();
  EXPECT_EQ(pb.stage(), v1::STAGE_QUEUED);
  EXPECT_EQ(pb.queue_position(), 0);
  EXPECT_NEAR(pb.eta_seconds(), 3 + 4, 1e-6);  // a's remaining 3 steps, then its own 4
  const v1::JobProgress& pc = dc.events[1].progress();
  EXPECT_EQ(pc.stage(), v1::STAGE_QUEUED);
  EXPECT_EQ(pc.queue_position(), 1);
  EXPECT_NEAR(pc.eta_seconds(), 3 + 4 + 2, 1e-6);
}

TEST_F(ExecutorTest, FailingJobsFailAloneWithTheirStatus) {
  StartReady();
  for (const char* marker : {testing::kFailStart, testing::kFailStep, testing::kFailDecode}) {
    std::shared_ptr<JobHandle> bad = Submit(std::string("boom ") + marker, 3);
    std::shared_ptr<JobHandle> good = Submit("fine", 2);
    Drained d = Drain(*bad);
    EXPECT_EQ(d.status.code(), absl::StatusCode::kInternal) << marker;
    EXPECT_THAT(d.status.message(), HasSubstr("fake")) << marker;
    EXPECT_EQ(bad->state(), JobState::kFailed);
    Drained g = Drain(*good);
    EXPECT_TRUE(g.status.ok()) << marker << ": " << g.status;
    EXPECT_TRUE(g.events.back().has_completed());
  }
  EXPECT_EQ(counters_->live_jobs.load(), 0);
}

TEST_F(ExecutorTest, EncoderFailureAndExceptionsFailOnlyThatJob) {
  ExecutorOptions options;
  options.create_pipeline = testing::FakePipelineFactory({}, counters_);
  options.clock = &clock_;
  options.encode_video = [](const engine::VideoFrames& f, int fps,
                            engine::VideoContainer c) -> absl::StatusOr<engine::EncodedVideo> {
    if (c == engine::VideoContainer::kPngTar) throw std::runtime_error("encoder bug");
    return testing::FakeVideoEncoder()(f, fps, c);
  };
  absl::StatusOr<std::unique_ptr<Executor>> e = Executor::Create(std::move(options));
  ASSERT_TRUE(e.ok());
  executor_ = *std::move(e);
  ASSERT_TRUE(executor_->WaitUntilReady(kWait).ok());
  ResolvedRequest png = Request("png", 1);
  png.output_format = OutputFormat::kPngFrames;
  std::shared_ptr<JobHandle> bad = *executor_->Submit(png);
  Drained d = Drain(*bad);
  EXPECT_EQ(d.status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(d.status.message(), HasSubstr("EncodeVideo threw: encoder bug"));
  EXPECT_TRUE(Drain(*Submit("mp4", 1)).status.ok());
}

TEST_F(ExecutorTest, CompatibleJobsShareSteps) {
  absl::Notification b_submitted;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int) {
    if (prompts.size() == 1 && prompts[0] == "a") b_submitted.WaitForNotification();
  };
  StartReady(fake, 8, /*max_running=*/2);
  std::shared_ptr<JobHandle> a = Submit("a", 4);
  std::shared_ptr<JobHandle> b = Submit("b", 4);
  b_submitted.Notify();
  EXPECT_TRUE(Drain(*a).status.ok());
  EXPECT_TRUE(Drain(*b).status.ok());
  EXPECT_EQ(counters_->max_batch.load(), 2);
  EXPECT_EQ(counters_->job_steps.load(), 8);
  EXPECT_LT(counters_->step_calls.load(), 8);
  EXPECT_THAT(metrics_.SerializeText(), HasSubstr("sparge_batch_size_bucket{le=\"2\"}"));
}

TEST_F(ExecutorTest, SameShapeJobsBatchWhateverTheirStepsSeedsGuidanceSamplersAndKnobs) {
  absl::Notification a_in_first_step, all_submitted;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    if (prompts.size() == 1 && prompts[0] == "a" && steps_done == 1) {
      a_in_first_step.Notify();
      all_submitted.WaitForNotification();
    }
  };
  StartReady(fake, 8, /*max_running=*/3);
  ResolvedRequest a = Request("a", 6);
  ResolvedRequest b = Request("b", 3);
  b.engine.seed = 7;
  b.engine.guidance_scale = 8.5f;
  b.engine.sampler = engine::SamplerKind::kUniPC;
  b.engine.sparsity = {engine::AttentionMode::kTopK, 0.3f, 0.9f, 0};
  ResolvedRequest c = Request("c", 9);
  c.engine.seed = 123;
  c.engine.guidance_scale = 2.0f;
  c.engine.shift = 3.0f;
  c.engine.sparsity = {engine::AttentionMode::kDense, 0.1f, 0.9f, 0};
  std::shared_ptr<JobHandle> ha = Submit(a);
  a_in_first_step.WaitForNotification();
  std::shared_ptr<JobHandle> hb = Submit(b), hc = Submit(c);
  all_submitted.Notify();
  for (auto* h : {&ha, &hb, &hc}) EXPECT_TRUE(Drain(**h).status.ok());
  EXPECT_EQ(counters_->max_batch.load(), 3);
  EXPECT_EQ(counters_->job_steps.load(), 6 + 3 + 9);
  // a alone once; all three until b's 3 steps are done; a and c until a's 6; c's last 4 alone.
  EXPECT_EQ(counters_->step_calls.load(), 1 + 3 + 2 + 4);
}

TEST_F(ExecutorTest, NotReadyWhileLoadingAndLoadFailureIsReported) {
  FakePipelineOptions fake;
  fake.create_status = absl::NotFoundError("no such model");
  StartExecutor(fake);
  absl::Status ready = executor_->WaitUntilReady(kWait);
  EXPECT_EQ(ready.code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(executor_->ready());
  absl::StatusOr<std::shared_ptr<JobHandle>> h = executor_->Submit(Request("x"));
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(h.status().message(), HasSubstr("no such model"));
}

TEST_F(ExecutorTest, WarmupFailureIsALoadFailure) {
  FakePipelineOptions fake;
  fake.warmup_status = absl::ResourceExhaustedError("out of memory");
  StartExecutor(fake);
  absl::Status ready = executor_->WaitUntilReady(kWait);
  EXPECT_EQ(ready.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(ready.message(), HasSubstr("warm-up failed"));
}

TEST_F(ExecutorTest, StopEndsQueuedAndRunningJobsWithUnavailable) {
  absl::Notification in_step, release;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int) {
    if (prompts[0] == "running") {
      in_step.Notify();
      release.WaitForNotification();
    }
  };
  StartReady(fake);
  std::shared_ptr<JobHandle> running = Submit("running", 5);
  in_step.WaitForNotification();
  std::shared_ptr<JobHandle> queued = Submit("queued", 5);
  std::thread stopper([&] { executor_->Stop(); });
  // Release the step only once Stop() has begun (ready() turns false), so the step boundary
  // that follows sees it.
  for (int i = 0; i < 30000 && executor_->ready(); ++i) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_FALSE(executor_->ready());
  release.Notify();
  stopper.join();
  EXPECT_EQ(Drain(*running).status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(Drain(*queued).status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(counters_->live_jobs.load(), 0);
  EXPECT_EQ(counters_->job_steps.load(), 1);
  EXPECT_THAT(metrics_.SerializeText(),
              HasSubstr("sparge_cancellations_total{reason=\"shutdown\"} 2"));
  EXPECT_EQ(executor_->Submit(Request("late")).status().code(), absl::StatusCode::kUnavailable);
}

ResolvedRequest WithPriority(ResolvedRequest r, JobPriority priority) {
  r.priority = priority;
  return r;
}

std::string FileOf(const Drained& d) {
  std::string file;
  for (const v1::GenerateEvent& e : d.events) {
    if (e.has_chunk()) file += e.chunk().data();
  }
  return file;
}

TEST_F(ExecutorTest, PreemptedJobReturnsToTheQueueAndResumesAtItsStep) {
  absl::Notification low_at_two, high_submitted;
  std::vector<std::string> stepped;  // executor thread only until the jobs are drained
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    stepped.push_back(absl::StrCat(prompts[0], "@", steps_done));
    if (prompts[0] == "low" && steps_done == 2) {
      low_at_two.Notify();
      high_submitted.WaitForNotification();
    }
  };
  StartReady(fake, 8, /*max_running=*/1);
  std::shared_ptr<JobHandle> low = Submit(WithPriority(Request("low", 5), JobPriority::kLow));
  low_at_two.WaitForNotification();
  std::shared_ptr<JobHandle> high = Submit(WithPriority(Request("high", 2), JobPriority::kHigh));
  high_submitted.Notify();
  Drained dl = Drain(*low), dh = Drain(*high);
  ASSERT_TRUE(dh.status.ok()) << dh.status;
  ASSERT_TRUE(dl.status.ok()) << dl.status;
  EXPECT_THAT(stepped, ::testing::ElementsAre("low@1", "low@2", "high@1", "high@2", "low@3",
                                              "low@4", "low@5"));
  EXPECT_EQ(counters_->starts.load(), 2);  // resumed without a second text encoding
  EXPECT_EQ(counters_->job_steps.load(), 7);
  EXPECT_EQ(counters_->live_jobs.load(), 0);

  // The preempted job's events: denoise 1, 2; queued behind the high job (position 1, at step 2),
  // then first in line once it starts; resumed at step 2;
  // denoise 3..5; then its file like any other.
  std::vector<std::string> trace;
  for (const v1::GenerateEvent& e : dl.events) {
    if (!e.has_progress()) continue;
    const v1::JobProgress& p = e.progress();
    if (p.stage() == v1::STAGE_QUEUED) {
      trace.push_back(absl::StrCat("queued#", p.queue_position(), "@", p.step()));
    } else if (p.stage() == v1::STAGE_DENOISE) {
      trace.push_back(absl::StrCat("denoise@", p.step()));
    }
  }
  EXPECT_THAT(trace, ::testing::ElementsAre("denoise@1", "denoise@2", "queued#1@2", "queued#0@2",
                                            "denoise@2", "denoise@3", "denoise@4", "denoise@5"));
  EXPECT_EQ(FileOf(dl), FileOf(dh));  // same seed and size: the same (fake) video
  EXPECT_TRUE(dl.events.back().has_completed());
  EXPECT_THAT(metrics_.SerializeText(), HasSubstr("sparge_preemptions_total 1\n"));
}

TEST_F(ExecutorTest, NoPreemptionWhenSwitchedOff) {
  absl::Notification low_at_two, high_submitted;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    if (prompts[0] == "low" && steps_done == 2) {
      low_at_two.Notify();
      high_submitted.WaitForNotification();
    }
  };
  scheduler_.preemption = false;
  StartReady(fake, 8, 1);
  std::shared_ptr<JobHandle> low = Submit(WithPriority(Request("low", 4), JobPriority::kLow));
  low_at_two.WaitForNotification();
  std::shared_ptr<JobHandle> high = Submit(WithPriority(Request("high", 2), JobPriority::kHigh));
  high_submitted.Notify();
  EXPECT_TRUE(Drain(*low).status.ok());
  EXPECT_TRUE(Drain(*high).status.ok());
  EXPECT_THAT(metrics_.SerializeText(), HasSubstr("sparge_preemptions_total 0\n"));
}

TEST_F(ExecutorTest, CancellingAPreemptedJobFreesItsState) {
  absl::Notification low_at_one, high_submitted;
  std::shared_ptr<JobHandle> low;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    if (prompts[0] == "low" && steps_done == 1) {
      low_at_one.Notify();
      high_submitted.WaitForNotification();
    }
    // While the high job runs, the preempted low job sits in the queue with its state.
    if (prompts[0] == "high" && steps_done == 1) low->Cancel(CancelReason::kClient);
  };
  StartReady(fake, 8, 1);
  low = Submit(WithPriority(Request("low", 4), JobPriority::kLow));
  low_at_one.WaitForNotification();
  std::shared_ptr<JobHandle> high = Submit(WithPriority(Request("high", 3), JobPriority::kHigh));
  high_submitted.Notify();
  Drained dl = Drain(*low);
  EXPECT_EQ(dl.status.code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(dl.status.message(), HasSubstr("while preempted after step 1/4"));
  EXPECT_TRUE(Drain(*high).status.ok());
  EXPECT_EQ(counters_->live_jobs.load(), 0);
  EXPECT_EQ(low->state(), JobState::kCancelled);
}

TEST_F(ExecutorTest, RequestsOverTheTokenBudgetAreRejectedUpFront) {
  scheduler_.max_batch_tokens = 50;
  StartReady({}, 8, 2);
  // 64x64x5 on the fake (Wan strides): 2 latent frames x 4 x 4 = 32 tokens, 64 with guidance.
  absl::StatusOr<std::shared_ptr<JobHandle>> big = executor_->Submit(Request("cfg", 2));
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(big.status().message(), HasSubstr("needs 64 DiT tokens"));
  EXPECT_THAT(big.status().message(), HasSubstr("scheduler.max_batch_tokens=50"));
  EXPECT_THAT(big.status().message(), HasSubstr("guidance_scale <= 1"));
  ResolvedRequest small = Request("nocfg", 2);
  small.engine.guidance_scale = 1.0f;
  EXPECT_TRUE(Drain(*Submit(small)).status.ok());
}

TEST_F(ExecutorTest, TokenBudgetCapsTheBatch) {
  absl::Notification a_in_first_step, all_submitted;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    if (prompts.size() == 1 && prompts[0] == "a" && steps_done == 1) {
      a_in_first_step.Notify();
      all_submitted.WaitForNotification();
    }
  };
  scheduler_.max_batch_tokens = 128;  // two 64-token jobs
  StartReady(fake, 8, /*max_running=*/3);
  std::shared_ptr<JobHandle> a = Submit("a", 3);
  a_in_first_step.WaitForNotification();  // b and c join a's second step
  std::shared_ptr<JobHandle> b = Submit("b", 3), c = Submit("c", 3);
  all_submitted.Notify();
  for (auto* h : {&a, &b, &c}) EXPECT_TRUE(Drain(**h).status.ok());
  EXPECT_EQ(counters_->max_batch.load(), 2);
  EXPECT_EQ(counters_->job_steps.load(), 9);
}

TEST_F(ExecutorTest, BatchOutOfMemoryIsRetriedJobByJob) {
  absl::Notification a_in_first_step, all_submitted;
  FakePipelineOptions fake;
  fake.oom_batch_size = 2;  // the device fits one job per step
  fake.on_step = [&](const std::vector<std::string>& prompts, int steps_done) {
    if (prompts.size() == 1 && prompts[0] == "a" && steps_done == 1) {
      a_in_first_step.Notify();
      all_submitted.WaitForNotification();
    }
  };
  StartReady(fake, 8, /*max_running=*/3);
  std::shared_ptr<JobHandle> a = Submit("a", 3);
  a_in_first_step.WaitForNotification();  // b and c join a's second step
  std::shared_ptr<JobHandle> b = Submit("b", 3), c = Submit("c", 3);
  all_submitted.Notify();
  Drained da = Drain(*a), db = Drain(*b), dc = Drain(*c);
  for (const Drained* d : {&da, &db, &dc}) {
    ASSERT_TRUE(d->status.ok()) << d->status;
    EXPECT_TRUE(d->events.back().has_completed());
    int denoise = 0;
    for (const v1::GenerateEvent& e : d->events) {
      denoise += e.has_progress() && e.progress().stage() == v1::STAGE_DENOISE;
    }
    EXPECT_EQ(denoise, 3);  // every step once, none lost or repeated by the retries
  }
  EXPECT_EQ(FileOf(da), FileOf(db));
  EXPECT_EQ(FileOf(db), FileOf(dc));
  // a alone; then 3 jobs (192 tokens) fail, and the executor keeps batches under 192: 2 jobs fail,
  // then under 128: one at a time, no more failures.
  EXPECT_EQ(counters_->ooms.load(), 2);
  EXPECT_EQ(counters_->job_steps.load(), 9);
  EXPECT_EQ(counters_->live_jobs.load(), 0);
}

TEST_F(ExecutorTest, AJobThatDoesNotFitAloneFailsAloneAndTheRestSucceed) {
  absl::Notification all_submitted;
  FakePipelineOptions fake;
  fake.on_step = [&](const std::vector<std::string>& prompts, int) {
    if (prompts[0] == "a") all_submitted.WaitForNotification();
  };
  StartReady(fake, 8, /*max_running=*/3);
  std::shared_ptr<JobHandle> a = Submit("a", 3);
  std::shared_ptr<JobHandle> big = Submit(std::string("huge ") + testing::kOomStep, 3);
  std::shared_ptr<JobHandle> c = Submit("c", 3);
  all_submitted.Notify();
  Drained dbig = Drain(*big);
  EXPECT_EQ(dbig.status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(dbig.status.message(), HasSubstr("out of memory"));
  EXPECT_EQ(big->state(), JobState::kFailed);
  Drained da = Drain(*a), dc = Drain(*c);
  ASSERT_TRUE(da.status.ok()) << da.status;
  ASSERT_TRUE(dc.status.ok()) << dc.status;
  EXPECT_EQ(FileOf(da), FileOf(dc));
  EXPECT_EQ(da.events.back().completed().file_size_bytes(),
            static_cast<int64_t>(FileOf(da).size()));
  // Later jobs still run, batched again.
  std::shared_ptr<JobHandle> d = Submit("d", 2);
  EXPECT_TRUE(Drain(*d).status.ok());
  EXPECT_EQ(counters_->live_jobs.load(), 0);
  EXPECT_EQ(counters_->decodes.load(), 3);
}

TEST_F(ExecutorTest, DeviceMemoryAndSchedulerOverheadAreExported) {
  std::vector<IterationTiming> timings;  // appended on the executor thread, read after draining
  on_iteration_ = [&](const IterationTiming& t) { timings.push_back(t); };
  StartReady();
  ASSERT_TRUE(Drain(*Submit("a", 3)).status.ok());
  executor_->Stop();  // joins the executor thread: `timings` is ours now
  const std::string text = metrics_.SerializeText();
  // The fake's memory model: 64x64x5 / 16 = 1280 bytes of job state during the steps.
  EXPECT_THAT(text, HasSubstr("sparge_device_memory_bytes{kind=\"allocated\"} 1280\n"));
  EXPECT_THAT(text, HasSubstr("sparge_device_memory_bytes{kind=\"reserved\"} 1280\n"));
  EXPECT_THAT(text, HasSubstr("sparge_device_memory_bytes{kind=\"total\"} 1073741824\n"));
  // start, 3 steps, finish.
  ASSERT_EQ(timings.size(), 5u);
  EXPECT_EQ(timings[0].action, SchedulerAction::Kind::kStart);
  EXPECT_EQ(timings[1].action, SchedulerAction::Kind::kStep);
  EXPECT_EQ(timings[1].batch_size, 1);
  EXPECT_EQ(timings[4].action, SchedulerAction::Kind::kFinish);
  for (const IterationTiming& t : timings) {
    EXPECT_GE(t.engine_seconds, 0.0);
    EXPECT_GE(t.overhead_seconds(), 0.0);
    EXPECT_LT(t.overhead_seconds(), 1.0);
  }
  EXPECT_THAT(text, HasSubstr("sparge_scheduler_overhead_seconds_count 5\n"));
}

}  // namespace
}  // namespace sparge::server
