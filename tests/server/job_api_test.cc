// The job API end to end: the server in process (FakePipeline, fake encoder, a temporary job
// directory) with real gRPC clients: submit -> watch -> result bytes, several watchers, clients
// going away, CancelJob within one step, errors, ListJobs paging, restart recovery, and the job
// commands of sparge-cli run as a subprocess.
#include <stdlib.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/job_files.h"
#include "server/job_store.h"
#include "server/testing/fake_pipeline.h"
#include "server/video_service.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using testing::FakePipelineCounters;
using testing::FakePipelineOptions;

constexpr absl::Duration kWait = absl::Seconds(30);

std::string MakeTempDir() {
  std::string pattern = ::testing::TempDir() + "/sparge_job_api_test_XXXXXX";
  EXPECT_NE(mkdtemp(pattern.data()), nullptr);
  return pattern;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

template <typename Fn>
bool Eventually(Fn condition) {
  for (absl::Time end = absl::Now() + kWait; absl::Now() < end;) {
    if (condition()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return condition();
}

struct Watched {
  std::vector<v1::GenerateEvent> events;
  grpc::Status status;
};

struct Downloaded {
  std::string data;
  std::vector<v1::JobResultChunk> chunks;  // without data
  grpc::Status status;
};

// One running server; several may share a directory over time (restart tests).
class TestServer {
 public:
  TestServer(const std::string& dir, FakePipelineOptions fake,
             std::shared_ptr<FakePipelineCounters> counters, int max_results = 100) {
    ServerConfig config;
    config.listen_address = "127.0.0.1";
    config.port = 0;
    config.metrics_port = 0;
    config.output_chunk_bytes = 1024;
    config.shutdown_grace_seconds = 0.2;
    config.jobs.output_dir = dir;
    config.jobs.max_results = max_results;
    ServerDeps deps;
    deps.create_pipeline = testing::FakePipelineFactory(std::move(fake), std::move(counters));
    deps.encode_video = testing::FakeVideoEncoder();
    absl::StatusOr<std::unique_ptr<SpargeServer>> server =
        SpargeServer::Create(std::move(config), std::move(deps));
    EXPECT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    absl::StatusOr<int> port = server_->Start();
    EXPECT_TRUE(port.ok()) << port.status();
    address_ = absl::StrCat("127.0.0.1:", *port);
    stub_ = v1::VideoService::NewStub(
        grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
    EXPECT_TRUE(server_->WaitUntilReady(kWait).ok());
  }

  SpargeServer& server() { return *server_; }
  v1::VideoService::Stub& stub() { return *stub_; }
  const std::string& address() const { return address_; }

 private:
  std::unique_ptr<SpargeServer> server_;
  std::string address_;
  std::unique_ptr<v1::VideoService::Stub> stub_;
};

class JobApiTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir(); }
  void TearDown() override {
    server_.reset();
    std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  void Start(FakePipelineOptions fake = {}, int max_results = 100) {
    server_ = std::make_unique<TestServer>(dir_, std::move(fake), counters_, max_results);
  }
  v1::VideoService::Stub& stub() { return server_->stub(); }

  static v1::GenerateRequest SmallRequest(const std::string& prompt = "a kite over dunes",
                                          int steps = 3) {
    v1::GenerateRequest r;
    r.set_prompt(prompt);
    r.set_width(64);
    r.set_height(64);
    r.set_num_frames(5);
    r.set_num_steps(steps);
    r.set_seed(11);
    return r;
  }

  absl::StatusOr<v1::Job> Submit(const v1::GenerateRequest& request, const std::string& key = "") {
    grpc::ClientContext context;
    v1::SubmitJobRequest submit;
    *submit.mutable_request() = request;
    submit.set_idempotency_key(key);
    v1::Job job;
    grpc::Status status = stub().SubmitJob(&context, submit, &job);
    if (!status.ok()) return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                                          status.error_message());
    return job;
  }

  absl::StatusOr<v1::Job> Get(const std::string& id) {
    grpc::ClientContext context;
    v1::GetJobRequest request;
    request.set_job_id(id);
    v1::Job job;
    grpc::Status status = stub().GetJob(&context, request, &job);
    if (!status.ok()) return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                                          status.error_message());
    return job;
  }

  absl::StatusOr<v1::Job> Cancel(const std::string& id) {
    grpc::ClientContext context;
    v1::CancelJobRequest request;
    request.set_job_id(id);
    v1::Job job;
    grpc::Status status = stub().CancelJob(&context, request, &job);
    if (!status.ok()) return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                                          status.error_message());
    return job;
  }

  Watched Watch(const std::string& id) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::WatchJobRequest request;
    request.set_job_id(id);
    Watched w;
    auto reader = stub().WatchJob(&context, request);
    v1::GenerateEvent event;
    while (reader->Read(&event)) w.events.push_back(event);
    w.status = reader->Finish();
    return w;
  }

  Downloaded Result(const std::string& id, int64_t offset = 0) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::GetJobResultRequest request;
    request.set_job_id(id);
    request.set_offset(offset);
    Downloaded d;
    auto reader = stub().GetJobResult(&context, request);
    v1::JobResultChunk chunk;
    while (reader->Read(&chunk)) {
      EXPECT_EQ(chunk.offset(), offset + static_cast<int64_t>(d.data.size()));
      d.data += chunk.data();
      chunk.clear_data();
      d.chunks.push_back(chunk);
    }
    d.status = reader->Finish();
    return d;
  }

  // The file Generate streams for `request` (the reference output).
  std::string GenerateFile(const v1::GenerateRequest& request) {
    grpc::ClientContext context;
    auto reader = stub().Generate(&context, request);
    v1::GenerateEvent event;
    std::string file;
    while (reader->Read(&event)) {
      if (event.has_chunk()) file += event.chunk().data();
    }
    EXPECT_TRUE(reader->Finish().ok());
    return file;
  }

  v1::Job WaitFinal(const std::string& id) {
    v1::Job job;
    Eventually([&] {
      absl::StatusOr<v1::Job> j = Get(id);
      if (j.ok()) job = *j;
      return j.ok() && job.state() >= v1::JOB_STATE_SUCCEEDED;
    });
    return job;
  }

  std::shared_ptr<FakePipelineCounters> counters_ = std::make_shared<FakePipelineCounters>();
  std::string dir_;
  std::unique_ptr<TestServer> server_;
};

TEST_F(JobApiTest, SubmitWatchAndFetchTheResult) {
  Start();
  const std::string reference = GenerateFile(SmallRequest());
  ASSERT_GT(reference.size(), 1024u);

  absl::StatusOr<v1::Job> submitted = Submit(SmallRequest());
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  const std::string id = submitted->job_id();
  EXPECT_FALSE(id.empty());
  EXPECT_EQ(submitted->origin(), v1::JOB_ORIGIN_SUBMIT_JOB);
  EXPECT_EQ(submitted->request().seed(), 11u);
  EXPECT_EQ(submitted->request().num_steps(), 3);
  EXPECT_TRUE(submitted->has_create_time());

  Watched w = Watch(id);
  ASSERT_TRUE(w.status.ok()) << w.status.error_message();
  ASSERT_GE(w.events.size(), 2u);
  EXPECT_TRUE(w.events.front().has_accepted());
  EXPECT_EQ(w.events.front().accepted().job_id(), id);
  ASSERT_TRUE(w.events.back().has_completed());
  for (const auto& e : w.events) EXPECT_FALSE(e.has_chunk());
  const v1::GenerateCompleted completed = w.events.back().completed();
  EXPECT_EQ(completed.file_size_bytes(), static_cast<int64_t>(reference.size()));

  v1::Job job = WaitFinal(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job.result().size_bytes(), static_cast<int64_t>(reference.size()));
  EXPECT_EQ(job.result().content_type(), "video/mp4");
  EXPECT_EQ(job.result().output_format(), v1::OUTPUT_FORMAT_MP4);
  EXPECT_EQ(job.progress().step(), 3);
  EXPECT_TRUE(job.has_start_time() && job.has_end_time());

  Downloaded d = Result(id);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.data, reference);  // the fake encoder's output, byte for byte
  ASSERT_GT(d.chunks.size(), 1u);
  EXPECT_EQ(d.chunks[0].content_type(), "video/mp4");
  EXPECT_EQ(d.chunks[0].total_size_bytes(), static_cast<int64_t>(reference.size()));
  EXPECT_EQ(ReadFile(dir_ + "/" + id + ".mp4"), reference);

  // Resuming a download from an offset.
  Downloaded tail = Result(id, 1000);
  ASSERT_TRUE(tail.status.ok());
  EXPECT_EQ(tail.data, reference.substr(1000));

  // Watching a finished job: accepted, last progress, completed, OK.
  Watched again = Watch(id);
  ASSERT_TRUE(again.status.ok());
  ASSERT_EQ(again.events.size(), 3u);
  EXPECT_TRUE(again.events[1].has_progress());
  EXPECT_EQ(again.events[2].completed().file_size_bytes(), completed.file_size_bytes());
  EXPECT_EQ(counters_->live_jobs.load(), 0);
  // Counted once each: the Generate call when it ended, the server-owned job when it finished.
  EXPECT_TRUE(Eventually([&] {
    return absl::StrContains(server_->server().metrics().SerializeText(),
                             "sparge_requests_total{status=\"OK\"} 2");
  })) << server_->server().metrics().SerializeText();
}

TEST_F(JobApiTest, TwoWatchersSeeTheSameJob) {
  FakePipelineOptions fake;
  fake.step_delay = absl::Milliseconds(5);
  Start(fake);
  absl::StatusOr<v1::Job> job = Submit(SmallRequest("two watchers", 20));
  ASSERT_TRUE(job.ok());
  Watched a, b;
  std::thread ta([&] { a = Watch(job->job_id()); });
  std::thread tb([&] { b = Watch(job->job_id()); });
  ta.join();
  tb.join();
  for (const Watched* w : {&a, &b}) {
    ASSERT_TRUE(w->status.ok()) << w->status.error_message();
    EXPECT_TRUE(w->events.front().has_accepted());
    EXPECT_TRUE(w->events.back().has_completed());
    int last_step = -1;
    for (const auto& e : w->events) {
      if (e.has_progress() && e.progress().stage() == v1::STAGE_DENOISE) {
        EXPECT_GT(e.progress().step(), last_step);  // in order, live
        last_step = e.progress().step();
      }
    }
    EXPECT_EQ(last_step, 20);
  }
}

TEST_F(JobApiTest, JobsOutliveTheirWatchersAndGenerateJobsAreListed) {
  FakePipelineOptions fake;
  fake.step_delay = absl::Milliseconds(5);
  Start(fake);
  absl::StatusOr<v1::Job> job = Submit(SmallRequest("left alone", 30));
  ASSERT_TRUE(job.ok());
  {
    // A watcher reads two events and goes away.
    grpc::ClientContext context;
    v1::WatchJobRequest request;
    request.set_job_id(job->job_id());
    auto reader = stub().WatchJob(&context, request);
    v1::GenerateEvent event;
    ASSERT_TRUE(reader->Read(&event));
    ASSERT_TRUE(reader->Read(&event));
    context.TryCancel();
    while (reader->Read(&event)) {
    }
    reader->Finish();
  }
  {
    // A watcher that never reads (its call simply ends).
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(30));
    v1::WatchJobRequest request;
    request.set_job_id(job->job_id());
    auto reader = stub().WatchJob(&context, request);
    reader->Finish();
  }
  const v1::Job done = WaitFinal(job->job_id());
  EXPECT_EQ(done.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(done.progress().step(), 30);
  Downloaded d = Result(job->job_id());
  EXPECT_TRUE(d.status.ok());
  EXPECT_THAT(d.data, StartsWith("FAKE mp4 64x64x5@16\n"));

  // A Generate call that goes away cancels its job, which stays visible.
  grpc::ClientContext context;
  auto reader = stub().Generate(&context, SmallRequest("generate then leave", 100));
  v1::GenerateEvent event;
  ASSERT_TRUE(reader->Read(&event));
  const std::string generate_id = event.accepted().job_id();
  context.TryCancel();
  while (reader->Read(&event)) {
  }
  reader->Finish();
  const v1::Job cancelled = WaitFinal(generate_id);
  EXPECT_EQ(cancelled.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(cancelled.origin(), v1::JOB_ORIGIN_GENERATE);
  Downloaded none = Result(generate_id);
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(none.status.error_message(), HasSubstr("JOB_STATE_CANCELLED"));
}

TEST_F(JobApiTest, CancelJobStopsItWithinOneStep) {
  // The executor is held inside step 5 until the cancellation has reached the job, so that the
  // count of steps after it does not depend on how fast the RPC travels.
  auto reached = std::make_shared<absl::Notification>();
  auto release = std::make_shared<absl::Notification>();
  FakePipelineOptions fake;
  fake.on_step = [reached, release](const std::vector<std::string>&, int steps_done) {
    if (steps_done != 5 || reached->HasBeenNotified()) return;
    reached->Notify();
    release->WaitForNotificationWithTimeout(kWait);
  };
  Start(fake);
  absl::StatusOr<v1::Job> job = Submit(SmallRequest("cancel me", 100));
  ASSERT_TRUE(job.ok());
  ASSERT_TRUE(reached->WaitForNotificationWithTimeout(kWait));
  absl::StatusOr<v1::Job> cancelled;
  std::thread canceller([&] { cancelled = Cancel(job->job_id()); });
  absl::StatusOr<JobStore::Entry> live = server_->server().jobs()->Find(job->job_id());
  ASSERT_TRUE(live.ok() && live->handle != nullptr);
  EXPECT_TRUE(Eventually([&] { return live->handle->cancel_reason() != CancelReason::kNone; }));
  const int steps_before = counters_->job_steps.load();  // step 5 is still running
  release->Notify();
  canceller.join();
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  // CancelJob answers once the job has stopped: no step ran after the one in progress.
  EXPECT_EQ(cancelled->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(counters_->job_steps.load(), steps_before);
  EXPECT_THAT(cancelled->error().message(), HasSubstr("after step 5/100"));
  EXPECT_EQ(cancelled->error().code_name(), "CANCELLED");
  EXPECT_THAT(cancelled->error().message(), HasSubstr("after step"));
  EXPECT_TRUE(Eventually([&] { return counters_->live_jobs.load() == 0; }));
  // Idempotent.
  absl::StatusOr<v1::Job> again = Cancel(job->job_id());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->state(), v1::JOB_STATE_CANCELLED);
  // A finished job is left as it is.
  absl::StatusOr<v1::Job> quick = Submit(SmallRequest("quick", 1));
  ASSERT_TRUE(quick.ok());
  ASSERT_EQ(WaitFinal(quick->job_id()).state(), v1::JOB_STATE_SUCCEEDED);
  absl::StatusOr<v1::Job> noop = Cancel(quick->job_id());
  ASSERT_TRUE(noop.ok());
  EXPECT_EQ(noop->state(), v1::JOB_STATE_SUCCEEDED);
  // A watcher of a cancelled job gets its error as the final status.
  Watched w = Watch(job->job_id());
  EXPECT_EQ(w.status.error_code(), grpc::StatusCode::CANCELLED);
}

TEST_F(JobApiTest, CancelAQueuedJob) {
  auto blocking = std::make_shared<absl::Notification>();
  auto release = std::make_shared<absl::Notification>();
  FakePipelineOptions fake;
  fake.on_step = [blocking, release](const std::vector<std::string>& prompts, int) {
    if (prompts[0] != "blocker") return;
    if (!blocking->HasBeenNotified()) blocking->Notify();
    release->WaitForNotificationWithTimeout(kWait);
  };
  Start(fake);
  absl::StatusOr<v1::Job> blocker = Submit(SmallRequest("blocker", 2));
  ASSERT_TRUE(blocking->WaitForNotificationWithTimeout(kWait));
  absl::StatusOr<v1::Job> queued = Submit(SmallRequest("waiting", 2));
  ASSERT_TRUE(blocker.ok() && queued.ok());
  absl::StatusOr<v1::Job> q = Get(queued->job_id());
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(q->progress().queue_position(), 0);  // next in line
  std::thread releaser([release] {
    absl::SleepFor(absl::Milliseconds(50));
    release->Notify();
  });
  absl::StatusOr<v1::Job> cancelled = Cancel(queued->job_id());
  releaser.join();
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_FALSE(cancelled->has_start_time());
  EXPECT_EQ(WaitFinal(blocker->job_id()).state(), v1::JOB_STATE_SUCCEEDED);
}

TEST_F(JobApiTest, ErrorsNameTheProblem) {
  Start();
  EXPECT_EQ(Get("job-404-00000000").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Cancel("job-404-00000000").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Watch("job-404-00000000").status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Result("job-404-00000000").status.error_code(), grpc::StatusCode::NOT_FOUND);
  for (const char* bad : {"", "../../etc/passwd", "a b"}) {
    absl::Status s = Get(bad).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(s.message(), HasSubstr("job_id: must be 1-128 characters")) << bad;
    EXPECT_EQ(Result(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(Watch(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext context;
    v1::ListJobsRequest request;
    request.set_page_token("not-a-token");
    v1::ListJobsResponse response;
    grpc::Status s = stub().ListJobs(&context, request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("page_token"));
  }
  v1::GenerateRequest bad_width = SmallRequest();
  bad_width.set_width(17);
  absl::Status s = Submit(bad_width).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("width: must be a multiple of 16"));
  EXPECT_THAT(Submit(SmallRequest(), "bad key!").status().message(),
              HasSubstr("idempotency_key: must be at most 128 characters"));

  // A failed job: its error, and no result.
  absl::StatusOr<v1::Job> failed = Submit(SmallRequest(std::string("x ") + testing::kFailStep));
  ASSERT_TRUE(failed.ok());
  const v1::Job f = WaitFinal(failed->job_id());
  EXPECT_EQ(f.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(f.error().code_name(), "INTERNAL");
  Downloaded d = Result(failed->job_id());
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Watch(failed->job_id()).status.error_code(), grpc::StatusCode::INTERNAL);

  absl::StatusOr<v1::Job> ok = Submit(SmallRequest());
  ASSERT_EQ(WaitFinal(ok->job_id()).state(), v1::JOB_STATE_SUCCEEDED);
  Downloaded out_of_range = Result(ok->job_id(), 1 << 30);
  EXPECT_EQ(out_of_range.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out_of_range.status.error_message(), HasSubstr("offset: must be in [0, "));
}

TEST_F(JobApiTest, IdempotencyKeyAndTimeout) {
  FakePipelineOptions fake;
  fake.step_delay = absl::Milliseconds(5);
  Start(fake);
  absl::StatusOr<v1::Job> first = Submit(SmallRequest("once", 2), "order-42");
  absl::StatusOr<v1::Job> second = Submit(SmallRequest("twice?", 2), "order-42");
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->job_id(), second->job_id());
  EXPECT_EQ(second->idempotency_key(), "order-42");
  WaitFinal(first->job_id());
  EXPECT_EQ(counters_->starts.load(), 1);

  grpc::ClientContext context;
  v1::SubmitJobRequest submit;
  *submit.mutable_request() = SmallRequest("too slow", 100);
  submit.set_timeout_seconds(0.05);
  v1::Job job;
  ASSERT_TRUE(stub().SubmitJob(&context, submit, &job).ok());
  const v1::Job late = WaitFinal(job.job_id());
  EXPECT_EQ(late.state(), v1::JOB_STATE_DEADLINE_EXCEEDED);
  EXPECT_EQ(late.error().code_name(), "DEADLINE_EXCEEDED");

  grpc::ClientContext bad_context;
  submit.set_timeout_seconds(-1);
  grpc::Status bad = stub().SubmitJob(&bad_context, submit, &job);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), HasSubstr("timeout_seconds: must be in (0, 604800]"));
}

TEST_F(JobApiTest, ListJobsPagesNewestFirstAndFilters) {
  Start();
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    const std::string prompt =
        i == 2 ? std::string("x ") + testing::kFailStart : absl::StrCat("clip ", i);
    absl::StatusOr<v1::Job> job = Submit(SmallRequest(prompt, 1));
    ASSERT_TRUE(job.ok());
    WaitFinal(job->job_id());
    ids.push_back(job->job_id());
  }
  v1::ListJobsRequest request;
  request.set_page_size(2);
  std::vector<std::string> listed;
  for (int page = 0; page < 5; ++page) {
    grpc::ClientContext context;
    v1::ListJobsResponse response;
    ASSERT_TRUE(stub().ListJobs(&context, request, &response).ok());
    EXPECT_LE(response.jobs_size(), 2);
    for (const auto& job : response.jobs()) listed.push_back(job.job_id());
    if (response.next_page_token().empty()) break;
    request.set_page_token(response.next_page_token());
  }
  EXPECT_EQ(listed, std::vector<std::string>(ids.rbegin(), ids.rend()));

  grpc::ClientContext context;
  v1::ListJobsRequest failed_only;
  failed_only.add_states(v1::JOB_STATE_FAILED);
  v1::ListJobsResponse response;
  ASSERT_TRUE(stub().ListJobs(&context, failed_only, &response).ok());
  ASSERT_EQ(response.jobs_size(), 1);
  EXPECT_EQ(response.jobs(0).job_id(), ids[2]);
}

TEST_F(JobApiTest, RestartServesOldResultsAndReportsInterruptedJobs) {
  auto running = std::make_shared<absl::Notification>();
  FakePipelineOptions fake;
  // "stuck" runs 100 steps of 5 ms: long enough to be caught running by the copy and by the
  // shutdown below, without blocking the executor.
  fake.step_delay = absl::Milliseconds(5);
  fake.on_step = [running](const std::vector<std::string>& prompts, int) {
    if (prompts[0] == "stuck" && !running->HasBeenNotified()) running->Notify();
  };
  Start(fake);
  absl::StatusOr<v1::Job> done = Submit(SmallRequest("finished before", 2));
  ASSERT_TRUE(done.ok());
  ASSERT_EQ(WaitFinal(done->job_id()).state(), v1::JOB_STATE_SUCCEEDED);
  const std::string reference = Result(done->job_id()).data;
  ASSERT_FALSE(reference.empty());
  absl::StatusOr<v1::Job> stuck = Submit(SmallRequest("stuck", 100));
  absl::StatusOr<v1::Job> queued = Submit(SmallRequest("never started", 5));
  ASSERT_TRUE(stuck.ok() && queued.ok());
  ASSERT_TRUE(running->WaitForNotificationWithTimeout(kWait));

  // A crash now: a new server on a copy of the directory as it is.
  const std::string crashed = MakeTempDir();
  ASSERT_EQ(std::system(("cp -a '" + dir_ + "/.' '" + crashed + "/'").c_str()), 0);
  server_.reset();  // graceful stop of the first server (its own directory)
  {
    TestServer restarted(crashed, {}, std::make_shared<FakePipelineCounters>());
    grpc::ClientContext context;
    v1::GetJobRequest request;
    request.set_job_id(done->job_id());
    v1::Job job;
    ASSERT_TRUE(restarted.stub().GetJob(&context, request, &job).ok());
    EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
    for (const std::string& id : {stuck->job_id(), queued->job_id()}) {
      grpc::ClientContext c;
      request.set_job_id(id);
      ASSERT_TRUE(restarted.stub().GetJob(&c, request, &job).ok());
      EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED) << id;
      EXPECT_THAT(job.error().message(), StartsWith("interrupted")) << id;
    }
    grpc::ClientContext rc;
    v1::GetJobResultRequest result_request;
    result_request.set_job_id(done->job_id());
    auto reader = restarted.stub().GetJobResult(&rc, result_request);
    std::string data;
    v1::JobResultChunk chunk;
    while (reader->Read(&chunk)) data += chunk.data();
    EXPECT_TRUE(reader->Finish().ok());
    EXPECT_EQ(data, reference);
  }
  std::system(("rm -rf '" + crashed + "'").c_str());

  // The first server stopped gracefully with jobs unfinished: the same report after restart.
  Start();
  for (const std::string& id : {stuck->job_id(), queued->job_id()}) {
    absl::StatusOr<v1::Job> after = Get(id);
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->state(), v1::JOB_STATE_FAILED) << id;
    EXPECT_THAT(after->error().message(), StartsWith("interrupted")) << id;
  }
  EXPECT_EQ(Result(done->job_id()).data, reference);
}

TEST_F(JobApiTest, RetentionLimitsStoredResults) {
  Start({}, /*max_results=*/2);
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<v1::Job> job = Submit(SmallRequest(absl::StrCat("r", i), 1));
    ASSERT_TRUE(job.ok());
    WaitFinal(job->job_id());
    ids.push_back(job->job_id());
  }
  EXPECT_EQ(Get(ids[0]).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Get(ids[1]).status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(FileSize(dir_ + "/" + ids[0] + ".mp4").ok());
  EXPECT_TRUE(Get(ids[3]).ok());
  EXPECT_TRUE(Result(ids[2]).status.ok());
}

// sparge-cli's job commands against the in-process server.
struct CliRun {
  int exit_code = -1;
  std::string out, err;
};

class JobCliTest : public JobApiTest {
 protected:
  CliRun Cli(const std::string& args) {
    const std::string out = dir_ + "/cli.out", err = dir_ + "/cli.err";
    const std::string command = absl::StrCat(SPARGE_CLI_PATH, " ", args, " --server ",
                                             server_->address(), " > ", out, " 2> ", err);
    const int status = std::system(command.c_str());
    CliRun run;
    run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    run.out = ReadFile(out);
    run.err = ReadFile(err);
    return run;
  }

  // The job id printed by `submit` (its first line is "job <id> ...").
  static std::string IdFrom(const std::string& out) {
    const size_t start = out.find("job-");
    if (start == std::string::npos) return "";
    return out.substr(start, out.find_first_of(" \n", start) - start);
  }
};

TEST_F(JobCliTest, SubmitWatchGetListResult) {
  Start();
  CliRun submit = Cli("submit --prompt 'a fox' --width 64 --height 64 --frames 5 --steps 2 "
                      "--seed 7");
  ASSERT_EQ(submit.exit_code, 0) << submit.err;
  const std::string id = IdFrom(submit.out);
  ASSERT_FALSE(id.empty()) << submit.out;

  CliRun watch = Cli("watch " + id);
  EXPECT_EQ(watch.exit_code, 0) << watch.err;
  EXPECT_THAT(watch.err, HasSubstr("step 2/2"));
  EXPECT_THAT(watch.out, HasSubstr("SUCCEEDED"));

  CliRun get = Cli("get " + id);
  EXPECT_EQ(get.exit_code, 0) << get.err;
  EXPECT_THAT(get.out, HasSubstr("state: JOB_STATE_SUCCEEDED"));

  CliRun list = Cli("list --states succeeded");
  EXPECT_EQ(list.exit_code, 0) << list.err;
  EXPECT_THAT(list.out, HasSubstr(id));
  EXPECT_THAT(list.out, HasSubstr("SUCCEEDED"));

  const std::string file = dir_ + "/downloaded.mp4";
  CliRun result = Cli(absl::StrCat("result ", id, " --out ", file));
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_EQ(ReadFile(file), ReadFile(dir_ + "/" + id + ".mp4"));
  EXPECT_THAT(ReadFile(file), StartsWith("FAKE mp4 64x64x5@16\n"));
  EXPECT_THAT(result.out, HasSubstr("wrote " + file));
}

TEST_F(JobCliTest, CancelAndErrors) {
  FakePipelineOptions fake;
  fake.step_delay = absl::Milliseconds(5);
  Start(fake);
  CliRun submit = Cli("submit --prompt 'long one' --width 64 --height 64 --frames 5 --steps 100");
  ASSERT_EQ(submit.exit_code, 0) << submit.err;
  const std::string id = IdFrom(submit.out);
  CliRun cancel = Cli("cancel " + id);
  EXPECT_EQ(cancel.exit_code, 0) << cancel.err;
  EXPECT_THAT(cancel.out, HasSubstr("CANCELLED"));
  CliRun result = Cli(absl::StrCat("result ", id, " --out ", dir_, "/none.mp4"));
  EXPECT_NE(result.exit_code, 0);
  EXPECT_THAT(result.err, HasSubstr("FAILED_PRECONDITION"));
  EXPECT_FALSE(FileSize(dir_ + "/none.mp4").ok());
  CliRun missing = Cli("get job-0-ffffffff");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_THAT(missing.err, HasSubstr("NOT_FOUND"));
  EXPECT_NE(Cli("get").exit_code, 0);  // no id
  EXPECT_NE(Cli("list --states nonsense").exit_code, 0);
  CliRun help = Cli("--help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.out, HasSubstr("submit"));
  EXPECT_THAT(help.out, HasSubstr("result JOB_ID"));
}

}  // namespace
}  // namespace sparge::server
