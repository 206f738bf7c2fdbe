// Integration tests over real gRPC: a sparge-server child process (embedded tiny model, CPU) on a
// loopback port with a temporary config, driven by generated stubs. Concurrent streams, client
// cancellation (latency measured against the step time), deadline expiry, a full queue, bad
// inputs, and SIGTERM while busy. Each test checks the final states through the client status
// and the server's own metrics, and that the other streams still finish with valid videos.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/health_client.h"
#include "tests/integration/server_process.h"

namespace sparge::integration {
namespace {

namespace v1 = ::sparge::v1;
using ::testing::HasSubstr;

// Small and fast on CPU: 64x64, 5 frames (2 latent frames), no classifier-free guidance.
constexpr char kConfig[] = R"(
metrics_address: 127.0.0.1
output_chunk_bytes: 4096
warmup: true
shutdown_grace_seconds: 3
model:
  threads: 1
  # 64x64x5 is 32 DiT tokens: 16-token blocks give the sparse modes blocks to skip.
  block_q: 16
  block_k: 16
scheduler:
  max_queue_length: 4
  max_running_jobs: 2
limits:
  max_steps: 1000
)";

v1::GenerateRequest SmallRequest(uint64_t seed, int steps) {
  v1::GenerateRequest r;
  r.set_prompt("a red kite over a green hill");
  r.set_width(64);
  r.set_height(64);
  r.set_num_frames(5);
  r.set_num_steps(steps);
  r.set_guidance_scale(1);
  r.set_seed(seed);
  r.mutable_sparsity()->set_mode(v1::ATTENTION_MODE_TOPK);
  r.mutable_sparsity()->set_topk(0.5f);
  return r;
}

// 128x128, 17 frames: 320 tokens, about 10 ms a step here, long against a cancel's transit.
v1::GenerateRequest Shaped(v1::GenerateRequest r) {
  r.set_width(128);
  r.set_height(128);
  r.set_num_frames(17);
  return r;
}

// Long enough (1000 steps) to be cancelled, time out or outlive the shutdown grace period.
v1::GenerateRequest LongRequest(uint64_t seed) { return Shaped(SmallRequest(seed, 1000)); }

// The streamed file is a whole H.264 MP4 of the requested size (ffprobe when installed).
void ExpectValidVideo(const StreamResult& r, int width = 64, int height = 64, int frames = 5) {
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.completed.has_value());
  EXPECT_TRUE(r.offsets_contiguous);
  EXPECT_EQ(static_cast<int64_t>(r.file.size()), r.completed->file_size_bytes());
  EXPECT_EQ(r.completed->content_type(), "video/mp4");
  ASSERT_GT(r.file.size(), 8u);
  EXPECT_EQ(r.file.substr(4, 4), "ftyp");
  if (std::optional<std::string> probe = FfprobeSummary(r.file)) {
    EXPECT_EQ(*probe, absl::StrCat("h264,", width, ",", height, ",", frames));
  }
}

double CancellationCount(const ServerProcess& server, const std::string& reason) {
  absl::StatusOr<bench::MetricsSnapshot> m = server.Scrape();
  return m.ok() ? m->Get("sparge_cancellations_total", {{"reason", reason}}) : -1;
}

absl::StatusOr<v1::Job> GetJob(const std::shared_ptr<grpc::Channel>& channel,
                               const std::string& job_id) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  grpc::Status s = v1::VideoService::NewStub(channel)->GetJob(&context, request, &job);
  if (!s.ok())
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return job;
}

bool IsFinal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED || state == v1::JOB_STATE_DEADLINE_EXCEEDED;
}

// Polls GetJob until the job reaches a final state (or `timeout`: the last state seen).
absl::StatusOr<v1::Job> WaitForFinalState(const std::shared_ptr<grpc::Channel>& channel,
                                          const std::string& job_id, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  for (;;) {
    absl::StatusOr<v1::Job> job = GetJob(channel, job_id);
    if (!job.ok() || IsFinal(job->state()) || absl::Now() > give_up) return job;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

// The stored video of a job, as GetJobResult streams it (checked like a Generate stream).
StreamResult FetchJobResult(const std::shared_ptr<grpc::Channel>& channel, const v1::Job& job) {
  StreamResult result;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::GetJobResultRequest request;
  request.set_job_id(job.job_id());
  std::unique_ptr<grpc::ClientReader<v1::JobResultChunk>> reader =
      v1::VideoService::NewStub(channel)->GetJobResult(&context, request);
  v1::JobResultChunk chunk;
  while (reader->Read(&chunk)) {
    if (chunk.offset() != static_cast<int64_t>(result.file.size())) {
      result.offsets_contiguous = false;
    }
    result.file += chunk.data();
  }
  result.status = reader->Finish();
  result.completed = job.result().completed();
  return result;
}

class ServingIntegrationTest : public ::testing::Test {
 protected:
  // One server for the suite (ctest runs the binary once), started by the first test so that a
  // start failure fails every test rather than skipping them.
  void SetUp() override {
    if (server_ == nullptr && start_status_.ok()) {
      absl::StatusOr<std::unique_ptr<ServerProcess>> s =
          ServerProcess::Start(SPARGE_SERVER_PATH, kConfig, absl::Seconds(180));
      if (s.ok()) {
        server_ = s->release();
      } else {
        start_status_ = s.status();
      }
    }
    ASSERT_TRUE(start_status_.ok()) << start_status_;
  }
  void TearDown() override {
    if (HasFailure() && server_ != nullptr) {
      std::fprintf(stderr, "---- server log ----\n%s\n", server_->log().c_str());
    }
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  // Mean wall time of one denoising step call so far (from the server's histogram).
  static double MeanStepSeconds() {
    absl::StatusOr<bench::MetricsSnapshot> m = server_->Scrape();
    if (!m.ok()) return 0;
    const double n = m->Get("sparge_denoise_step_seconds_count");
    return n > 0 ? m->Get("sparge_denoise_step_seconds_sum") / n : 0;
  }

  static ServerProcess* server_;
  static absl::Status start_status_;
};

ServerProcess* ServingIntegrationTest::server_ = nullptr;
absl::Status ServingIntegrationTest::start_status_;

TEST_F(ServingIntegrationTest, ConcurrentStreamsSucceedWithDeterministicOutputs) {
  // One at a time (batch size 1): the same seed gives the same bytes, run after run.
  std::shared_ptr<grpc::Channel> channel = server_->NewChannel();
  std::map<uint64_t, StreamResult> solo;
  for (uint64_t seed : {11, 12}) {
    solo[seed] = RunGenerate(channel, SmallRequest(seed, 3), absl::Seconds(60));
    ExpectValidVideo(solo[seed]);
    const StreamResult again = RunGenerate(channel, SmallRequest(seed, 3), absl::Seconds(60));
    ExpectValidVideo(again);
    EXPECT_TRUE(again.file == solo[seed].file) << "seed " << seed << ": different bytes";
  }
  EXPECT_FALSE(solo[11].file == solo[12].file) << "different seeds gave the same video";
  EXPECT_GT(solo[11].completed->mean_achieved_sparsity(), 0.0f) << "topk 0.5 skipped nothing";

  // Four at once (batched two by two): all succeed, each the same video as its solo run. Not
  // byte-identical: a batched DiT call rounds differently from a single one (float32 CPU GEMMs
  // pick kernels by batch size), so frames may differ by a few levels in a few pixels.
  const std::vector<uint64_t> seeds = {11, 12, 11, 12};
  std::vector<StreamResult> results(seeds.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < seeds.size(); ++i) {
    threads.emplace_back([&, i] {
      results[i] =
          RunGenerate(server_->NewChannel(), SmallRequest(seeds[i], 3), absl::Seconds(120));
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < seeds.size(); ++i) {
    ExpectValidVideo(results[i]);
    if (!results[i].completed.has_value()) continue;  // reported above
    EXPECT_EQ(results[i].completed->seed(), seeds[i]);
    EXPECT_EQ(results[i].completed->mean_achieved_sparsity(),
              solo[seeds[i]].completed->mean_achieved_sparsity());
    if (std::optional<FrameDiff> d = CompareFrames(results[i].file, solo[seeds[i]].file)) {
      EXPECT_LT(d->mean_abs, 0.5) << "seed " << seeds[i] << " batched differs from solo";
      EXPECT_LE(d->max_abs, 32) << "seed " << seeds[i] << " batched differs from solo";
    }
  }
  // Against the other seed the frames differ a lot (so the comparison above can fail).
  if (std::optional<FrameDiff> d = CompareFrames(solo[11].file, solo[12].file)) {
    EXPECT_GT(d->mean_abs, 2.0);
  }
}

TEST_F(ServingIntegrationTest, ClientCancelStopsTheJobWithinOneStep) {
  const double cancels_before = CancellationCount(*server_, "client");
  const double step_seconds_hint = MeanStepSeconds();
  // One stream is cancelled after its first denoising step; two others run beside it.
  absl::Notification cancelled;
  std::chrono::steady_clock::time_point cancel_time;
  double steps_before_cancel = 0;
  StreamResult victim, other_a, other_b;
  std::string victim_id;
  int step_seen = 0;
  std::thread t_a([&] {
    other_a = RunGenerate(server_->NewChannel(), Shaped(SmallRequest(21, 4)), absl::Seconds(120));
  });
  std::thread t_victim([&] {
    victim = RunGenerate(server_->NewChannel(), Shaped(SmallRequest(22, 40)), absl::Seconds(120),
                         [&](const v1::GenerateEvent& e, grpc::ClientContext* context) {
                           if (e.has_accepted()) victim_id = e.accepted().job_id();
                           if (e.has_progress() && e.progress().stage() == v1::STAGE_DENOISE &&
                               e.progress().step() >= 1 && !cancelled.HasBeenNotified()) {
                             step_seen = e.progress().step();
                             absl::StatusOr<bench::MetricsSnapshot> m = server_->Scrape();
                             steps_before_cancel =
                                 m.ok() ? m->Get("sparge_denoise_step_seconds_count") : 0;
                             cancel_time = std::chrono::steady_clock::now();
                             context->TryCancel();
                             cancelled.Notify();
                           }
                         });
  });
  std::thread t_b([&] {
    other_b = RunGenerate(server_->NewChannel(), Shaped(SmallRequest(23, 4)), absl::Seconds(120));
  });
  ASSERT_TRUE(cancelled.WaitForNotificationWithTimeout(absl::Seconds(120)));
  // The server ends the job at its next step boundary and counts it once its state is freed.
  double latency = -1;
  double steps_after_cancel = -1;
  while (std::chrono::steady_clock::now() - cancel_time < std::chrono::seconds(60)) {
    absl::StatusOr<bench::MetricsSnapshot> m = server_->Scrape();
    if (m.ok() && m->Get("sparge_cancellations_total", {{"reason", "client"}}) > cancels_before) {
      latency =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - cancel_time).count();
      steps_after_cancel = m->Get("sparge_denoise_step_seconds_count") - steps_before_cancel;
      break;
    }
    absl::SleepFor(absl::Milliseconds(2));
  }
  t_victim.join();
  t_a.join();
  t_b.join();
  EXPECT_EQ(victim.status.error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_GE(latency, 0) << "the server never counted the client cancellation";
  // The job API sees the Generate call's job end CANCELLED, stopped mid-denoise.
  absl::StatusOr<v1::Job> job =
      WaitForFinalState(server_->NewChannel(), victim_id, absl::Seconds(10));
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::JOB_STATE_CANCELLED) << v1::JobState_Name(job->state());
  const int job_steps_after = job->progress().step() - step_seen;
  const double step_seconds = MeanStepSeconds() > 0 ? MeanStepSeconds() : step_seconds_hint;
  std::printf(
      "cancel latency: %.1f ms; the job ran %d step(s) after the last one seen, the "
      "executor %.0f step call(s); mean step %.1f ms\n",
      latency * 1000, job_steps_after, steps_after_cancel, step_seconds * 1000);
  // The step in flight when the cancel arrived finishes, then the job stops: one step, two when
  // a step ended while the cancel was on its way.
  EXPECT_GE(job_steps_after, 0);
  EXPECT_LE(job_steps_after, 2);
  EXPECT_LE(steps_after_cancel, 2);
  // One step plus slack for a decode/encode of a batch-mate in flight and a loaded 2-core CI box.
  EXPECT_LE(latency, step_seconds + 2.0);
  ExpectValidVideo(other_a, 128, 128, 17);
  ExpectValidVideo(other_b, 128, 128, 17);
}

TEST_F(ServingIntegrationTest, DeadlineExpiryEndsOnlyThatJob) {
  const double deadline_stopped_before = CancellationCount(*server_, "deadline");
  StreamResult late, fine;
  std::thread t_fine(
      [&] { fine = RunGenerate(server_->NewChannel(), SmallRequest(31, 3), absl::Seconds(120)); });
  // The deadline passes mid-denoise.
  late = RunGenerate(server_->NewChannel(), LongRequest(32), absl::Milliseconds(1500));
  t_fine.join();
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << late.status.error_message();
  ExpectValidVideo(fine);
  // The server stops the job too, as DEADLINE_EXCEEDED: the client's deadline timer can fire (and
  // its RST_STREAM arrive) a little before the server's own copy of the deadline passes, which the
  // server allows for (video_service.cc, kDeadlineSlack) instead of taking it for a client cancel.
  ASSERT_FALSE(late.events.empty());
  absl::StatusOr<v1::Job> job = WaitForFinalState(
      server_->NewChannel(), late.events.front().accepted().job_id(), absl::Seconds(10));
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::JOB_STATE_DEADLINE_EXCEEDED) << v1::JobState_Name(job->state());
  std::printf("Generate past its deadline: server state %s (%s)\n",
              v1::JobState_Name(job->state()).c_str(), job->error().message().c_str());
  EXPECT_EQ(CancellationCount(*server_, "deadline"), deadline_stopped_before + 1);
}

TEST_F(ServingIntegrationTest, SubmittedJobTimeoutIsDeadlineExceeded) {
  const double deadline_before = CancellationCount(*server_, "deadline");
  std::shared_ptr<grpc::Channel> channel = server_->NewChannel();
  v1::SubmitJobRequest submit;
  *submit.mutable_request() = LongRequest(33);
  submit.set_timeout_seconds(1.0);
  v1::Job job;
  {
    grpc::ClientContext context;
    grpc::Status s = v1::VideoService::NewStub(channel)->SubmitJob(&context, submit, &job);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  absl::StatusOr<v1::Job> done = WaitForFinalState(channel, job.job_id(), absl::Seconds(30));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), v1::JOB_STATE_DEADLINE_EXCEEDED) << v1::JobState_Name(done->state());
  EXPECT_EQ(done->error().code_name(), "DEADLINE_EXCEEDED");
  EXPECT_GT(done->progress().step(), 0);
  EXPECT_LT(done->progress().step(), 1000);
  EXPECT_EQ(CancellationCount(*server_, "deadline"), deadline_before + 1);
}

TEST_F(ServingIntegrationTest, FullQueueIsResourceExhaustedNamingTheLimit) {
  // max_running_jobs 2 + max_queue_length 4: six long jobs fill both; the seventh is refused.
  constexpr int kHeld = 6;
  std::vector<absl::Notification> accepted(kHeld);
  std::vector<StreamResult> held(kHeld);
  std::vector<std::thread> threads;
  absl::Notification cancel_all;
  std::vector<std::atomic<bool>> ended(kHeld);
  for (int i = 0; i < kHeld; ++i) {
    threads.emplace_back([&, i] {
      // Queued jobs get no events until they start, so each job cancels itself at its first
      // event after cancel_all (running ones at their next step, queued ones when they start).
      held[i] = RunGenerate(server_->NewChannel(), LongRequest(40 + i), absl::Seconds(120),
                            [&, i](const v1::GenerateEvent& e, grpc::ClientContext* context) {
                              if (e.has_accepted()) accepted[i].Notify();
                              if (cancel_all.HasBeenNotified()) context->TryCancel();
                            });
      ended[i] = true;
      if (!accepted[i].HasBeenNotified()) accepted[i].Notify();
    });
    EXPECT_TRUE(accepted[i].WaitForNotificationWithTimeout(absl::Seconds(60)));
    EXPECT_FALSE(ended[i]) << "job " << i << ": " << held[i].status.error_message();
    // The first two must be running (admitted off the queue) before the rest queue up.
    if (i == 1 || i == kHeld - 1) {
      const double want_queued = i == 1 ? 0 : kHeld - 2;
      bool reached = false;
      for (int k = 0; k < 500 && !reached; ++k) {
        absl::StatusOr<bench::MetricsSnapshot> m = server_->Scrape();
        reached = m.ok() && m->Get("sparge_running_jobs") == 2 &&
                  m->Get("sparge_queue_depth") == want_queued;
        if (!reached) absl::SleepFor(absl::Milliseconds(10));
      }
      EXPECT_TRUE(reached) << "never 2 running and " << want_queued << " queued";
    }
  }
  const StreamResult refused =
      RunGenerate(server_->NewChannel(), SmallRequest(49, 2), absl::Seconds(30));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("max_queue_length"));
  cancel_all.Notify();
  for (std::thread& t : threads) t.join();
  for (const StreamResult& r : held) {
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED) << r.status.error_message();
  }
  // Capacity is back once they are gone.
  ExpectValidVideo(RunGenerate(server_->NewChannel(), SmallRequest(50, 2), absl::Seconds(60)));
}

TEST_F(ServingIntegrationTest, BadInputsAreInvalidArgumentAndTheServerKeepsServing) {
  struct Case {
    const char* field;
    std::function<void(v1::GenerateRequest*)> mutate;
  };
  const std::vector<Case> cases = {
      {"width", [](v1::GenerateRequest* r) { r->set_width(17); }},
      {"height", [](v1::GenerateRequest* r) { r->set_height(4096); }},
      {"num_frames", [](v1::GenerateRequest* r) { r->set_num_frames(4); }},
      {"num_steps", [](v1::GenerateRequest* r) { r->set_num_steps(0); }},
      {"guidance_scale", [](v1::GenerateRequest* r) { r->set_guidance_scale(31); }},
      {"topk", [](v1::GenerateRequest* r) { r->mutable_sparsity()->set_topk(1.5f); }},
      {"topp", [](v1::GenerateRequest* r) { r->mutable_sparsity()->set_topp(0); }},
      {"prompt", [](v1::GenerateRequest* r) { r->clear_prompt(); }},
  };
  std::shared_ptr<grpc::Channel> channel = server_->NewChannel();
  for (const Case& c : cases) {
    v1::GenerateRequest request = SmallRequest(60, 2);
    c.mutate(&request);
    const StreamResult r = RunGenerate(channel, request, absl::Seconds(30));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.field));
    EXPECT_TRUE(r.events.empty()) << c.field << ": rejected before a job was accepted";
  }
  absl::StatusOr<server::HealthStatus> health = server::CheckHealth(channel, "", absl::Seconds(5));
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, server::HealthStatus::kServing);
  ExpectValidVideo(RunGenerate(channel, SmallRequest(61, 2), absl::Seconds(60)));
}

TEST_F(ServingIntegrationTest, SubmittedJobOutlivesItsWatcherAndIsRetrievable) {
  std::shared_ptr<grpc::Channel> channel = server_->NewChannel();
  v1::SubmitJobRequest submit;
  *submit.mutable_request() = SmallRequest(81, 30);
  v1::Job job;
  {
    grpc::ClientContext context;
    grpc::Status s = v1::VideoService::NewStub(channel)->SubmitJob(&context, submit, &job);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(job.origin(), v1::JOB_ORIGIN_SUBMIT_JOB);
  // A watcher that goes away after the first denoising step.
  v1::WatchJobRequest watch;
  watch.set_job_id(job.job_id());
  grpc::ClientContext watch_context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader =
      v1::VideoService::NewStub(server_->NewChannel())->WatchJob(&watch_context, watch);
  v1::GenerateEvent event;
  bool saw_step = false;
  while (!saw_step && reader->Read(&event)) {
    saw_step = event.has_progress() && event.progress().stage() == v1::STAGE_DENOISE &&
               event.progress().step() >= 1;
  }
  ASSERT_TRUE(saw_step);
  watch_context.TryCancel();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The job runs on and its video is stored.
  absl::StatusOr<v1::Job> done = WaitForFinalState(channel, job.job_id(), absl::Seconds(60));
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error().message();
  const StreamResult stored = FetchJobResult(channel, *done);
  ExpectValidVideo(stored);
  // Both ran alone (batch size 1): the same bytes as a Generate call of the same request.
  const StreamResult direct = RunGenerate(channel, SmallRequest(81, 30), absl::Seconds(60));
  ExpectValidVideo(direct);
  EXPECT_TRUE(stored.file == direct.file) << "stored result differs from Generate's";
}

TEST_F(ServingIntegrationTest, CancelJobStopsASubmittedJobWithinOneStep) {
  std::shared_ptr<grpc::Channel> channel = server_->NewChannel();
  std::unique_ptr<v1::VideoService::Stub> stub = v1::VideoService::NewStub(channel);
  v1::SubmitJobRequest submit;
  *submit.mutable_request() = LongRequest(82);
  v1::Job job;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->SubmitJob(&context, submit, &job).ok());
  }
  // Wait until it is denoising.
  for (int i = 0; i < 1000; ++i) {
    absl::StatusOr<v1::Job> j = GetJob(channel, job.job_id());
    ASSERT_TRUE(j.ok()) << j.status();
    if (j->progress().stage() == v1::STAGE_DENOISE && j->progress().step() >= 1) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  absl::StatusOr<bench::MetricsSnapshot> before = server_->Scrape();
  ASSERT_TRUE(before.ok());
  v1::CancelJobRequest cancel;
  cancel.set_job_id(job.job_id());
  v1::Job cancelled;
  const auto t0 = std::chrono::steady_clock::now();
  grpc::ClientContext context;
  const grpc::Status s = stub->CancelJob(&context, cancel, &cancelled);
  const double latency =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(s.ok()) << s.error_message();
  absl::StatusOr<bench::MetricsSnapshot> after = server_->Scrape();
  ASSERT_TRUE(after.ok());
  // CancelJob answers once the job has stopped.
  EXPECT_EQ(cancelled.state(), v1::JOB_STATE_CANCELLED) << v1::JobState_Name(cancelled.state());
  EXPECT_LT(cancelled.progress().step(), 1000);
  const double steps_after = after->Get("sparge_denoise_step_seconds_count") -
                             before->Get("sparge_denoise_step_seconds_count");
  const double step_seconds = MeanStepSeconds();
  std::printf("CancelJob: returned after %.1f ms, %.0f step call(s) meanwhile, mean step %.1f ms\n",
              latency * 1000, steps_after, step_seconds * 1000);
  EXPECT_LE(steps_after, 1);
  EXPECT_LE(latency, step_seconds + 2.0);
  // Idempotent: a second cancel returns the same final state.
  grpc::ClientContext again_context;
  v1::Job again;
  ASSERT_TRUE(stub->CancelJob(&again_context, cancel, &again).ok());
  EXPECT_EQ(again.state(), v1::JOB_STATE_CANCELLED);
}

// sparge-load end to end against this server: its report adds up and carries the server's view.
TEST_F(ServingIntegrationTest, LoadToolReportAddsUp) {
  char path[] = "/tmp/sparge-load-report-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  const std::string command = absl::StrCat(
      SPARGE_LOAD_PATH, " --target ", server_->target(), " --metrics-url ", server_->metrics_url(),
      " --clients 3 --requests 6 --seed 5 --cancel-fraction 1",
      " --cancel-after-steps 2 --mix 'width=128,height=128,frames=17,steps=6,guidance=1,",
      "mode=topk,topk=0.5' --out ", path, " 2>&1");
  std::string output;
  FILE* p = popen(command.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[512];
  while (fgets(buf, sizeof(buf), p)) output += buf;
  const int rc = pclose(p);
  ASSERT_EQ(rc, 0) << output;
  std::ifstream in(path);
  const nlohmann::json report = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  unlink(path);
  ASSERT_FALSE(report.is_discarded()) << output;
  const nlohmann::json& r = report["results"];
  EXPECT_EQ(r["requests_sent"], 6);
  const int ok = r["status_counts"].value("OK", 0);
  const int cancelled = r["status_counts"].value("CANCELLED", 0);
  EXPECT_EQ(ok + cancelled, 6) << r["status_counts"].dump();
  EXPECT_GE(cancelled, 1);
  EXPECT_EQ(r["videos_ok"], ok);
  EXPECT_EQ(r["latency_seconds"]["count"], ok);
  if (ok > 0) {
    EXPECT_GT(r["mean_achieved_sparsity"].get<double>(), 0.0);
  }
  // Every cancellation was measured, and each job stopped at the next step boundary (one more
  // step, or two when a step ended while the cancel was on its way).
  EXPECT_EQ(r["cancellation"]["cancelled"], cancelled);
  EXPECT_EQ(r["cancellation"]["measured"], cancelled);
  EXPECT_EQ(r["cancellation"]["job_steps_after_cancel"]["count"], cancelled);
  EXPECT_LE(r["cancellation"]["job_steps_after_cancel"]["max"].get<double>(), 2);
  // The batch-size histogram covers the step calls the server made for this load.
  const nlohmann::json& m = r["server_metrics"];
  double calls = 0;
  for (const auto& [bound, n] : m["batch_size_histogram"].items()) calls += n.get<double>();
  EXPECT_EQ(calls, m["denoise_step_calls"].get<double>());
  EXPECT_GE(m["mean_batch_size"].get<double>(), 1.0);
  EXPECT_LE(m["mean_batch_size"].get<double>(), 2.0);  // max_running_jobs 2
  EXPECT_EQ(m["cancellations"]["client"].get<double>(), cancelled);
  EXPECT_EQ(report["server"]["card"], "cpu");
}

// Its own server: SIGTERM ends it.
TEST(ServingShutdownTest, SigtermWhileBusyDrainsAndExitsZero) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> started =
      ServerProcess::Start(SPARGE_SERVER_PATH, kConfig, absl::Seconds(180));
  ASSERT_TRUE(started.ok()) << started.status();
  ServerProcess& server = **started;
  // A short job that finishes within the 3 s grace, and one far too long to. Same shape, so they
  // share each step: the executor steps the oldest job's batch first, and a job of another
  // shape would wait for the long one to end.
  absl::Notification short_running, long_running;
  StreamResult short_job, long_job;
  std::thread t_short([&] {
    short_job = RunGenerate(server.NewChannel(), Shaped(SmallRequest(71, 4)), absl::Seconds(120),
                            [&](const v1::GenerateEvent& e, grpc::ClientContext*) {
                              if (e.has_progress() && e.progress().stage() == v1::STAGE_DENOISE &&
                                  !short_running.HasBeenNotified()) {
                                short_running.Notify();
                              }
                            });
  });
  std::thread t_long([&] {
    long_job = RunGenerate(server.NewChannel(), LongRequest(72), absl::Seconds(120),
                           [&](const v1::GenerateEvent& e, grpc::ClientContext*) {
                             if (e.has_progress() && e.progress().stage() == v1::STAGE_DENOISE &&
                                 !long_running.HasBeenNotified()) {
                               long_running.Notify();
                             }
                           });
  });
  ASSERT_TRUE(short_running.WaitForNotificationWithTimeout(absl::Seconds(60)));
  ASSERT_TRUE(long_running.WaitForNotificationWithTimeout(absl::Seconds(60)));

  std::shared_ptr<grpc::Channel> health_channel = server.NewChannel();
  const auto t0 = std::chrono::steady_clock::now();
  kill(server.pid(), SIGTERM);
  // Health leaves SERVING at once (NOT_SERVING, or the call refused once gRPC stops listening).
  double not_serving_after = -1;
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5)) {
    absl::StatusOr<server::HealthStatus> h =
        server::CheckHealth(health_channel, "", absl::Milliseconds(500));
    if (!h.ok() || *h != server::HealthStatus::kServing) {
      not_serving_after =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      break;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  absl::StatusOr<int> exit_code = server.SignalAndWait(0, absl::Seconds(30));
  const double exit_after =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t_short.join();
  t_long.join();
  std::printf("SIGTERM: not serving after %.0f ms, exit after %.2f s (grace 3 s)\n",
              not_serving_after * 1000, exit_after);
  ASSERT_GE(not_serving_after, 0) << "still SERVING 5 s after SIGTERM";
  EXPECT_LT(not_serving_after, 1.0);
  ASSERT_TRUE(exit_code.ok()) << exit_code.status() << "\n" << server.log();
  EXPECT_EQ(*exit_code, 0) << server.log();
  // Grace (3 s) + the step in flight + model teardown.
  EXPECT_LT(exit_after, 3.0 + 5.0);
  ExpectValidVideo(short_job, 128, 128, 17);
  EXPECT_FALSE(long_job.status.ok());
  EXPECT_THAT(long_job.status.error_code(),
              ::testing::AnyOf(grpc::StatusCode::CANCELLED, grpc::StatusCode::UNAVAILABLE))
      << long_job.status.error_message();
  EXPECT_THAT(server.log(), HasSubstr("received SIGTERM"));
}

}  // namespace
}  // namespace sparge::integration
