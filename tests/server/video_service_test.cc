// The server in process on a loopback port (FakePipeline, fake encoder) with real gRPC clients:
// streaming order, file reassembly, bad inputs rejected while health stays SERVING, readiness,
// cancellation and deadlines reaching the executor, server info, and the /metrics scrape.
#include "server/video_service.h"

#include <stdlib.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "server/health_client.h"
#include "server/metrics.h"
#include "server/testing/fake_pipeline.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using ::testing::HasSubstr;
using testing::FakePipelineCounters;
using testing::FakePipelineOptions;

constexpr absl::Duration kWait = absl::Seconds(30);

struct CallResult {
  std::vector<v1::GenerateEvent> events;
  grpc::Status status;
};

// Polls `condition` (state owned by another thread) for up to kWait.
template <typename Fn>
bool Eventually(Fn condition) {
  for (absl::Time end = absl::Now() + kWait; absl::Now() < end;) {
    if (condition()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return condition();
}

class VideoServiceTest : public ::testing::Test {
 protected:
  void StartServer(FakePipelineOptions fake = {}, bool wait_ready = true,
                   PipelineFactory factory = nullptr) {
    ServerConfig config;
    config.listen_address = "127.0.0.1";
    config.port = 0;
    config.metrics_address = "127.0.0.1";
    config.metrics_port = -1;
    config.output_chunk_bytes = 1024;
    config.shutdown_grace_seconds = 0.2;
    // ctest runs tests in parallel processes: each server gets its own job directory.
    std::string dir = ::testing::TempDir() + "/sparge_video_service_test_XXXXXX";
    ASSERT_NE(mkdtemp(dir.data()), nullptr);
    jobs_dir_ = dir;
    config.jobs.output_dir = jobs_dir_;
    ServerDeps deps;
    deps.create_pipeline =
        factory ? factory : testing::FakePipelineFactory(std::move(fake), counters_);
    deps.encode_video = testing::FakeVideoEncoder();
    absl::StatusOr<std::unique_ptr<SpargeServer>> server =
        SpargeServer::Create(std::move(config), std::move(deps));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    absl::StatusOr<int> port = server_->Start();
    ASSERT_TRUE(port.ok()) << port.status();
    ASSERT_GT(*port, 0);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", *port),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::VideoService::NewStub(channel_);
    if (wait_ready) ASSERT_TRUE(server_->WaitUntilReady(kWait).ok());
  }

  void TearDown() override {
    if (server_) server_->Shutdown();
    if (!jobs_dir_.empty()) std::system(("rm -rf '" + jobs_dir_ + "'").c_str());
  }

  CallResult Generate(const v1::GenerateRequest& request,
                      absl::Duration deadline = absl::Seconds(60)) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(deadline));
    CallResult result;
    auto reader = stub_->Generate(&context, request);
    v1::GenerateEvent event;
    while (reader->Read(&event)) result.events.push_back(event);
    result.status = reader->Finish();
    return result;
  }

  HealthStatus Health(const std::string& service = "") {
    absl::StatusOr<HealthStatus> s = CheckHealth(channel_, service, absl::Seconds(5));
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : HealthStatus::kUnknown;
  }

  static v1::GenerateRequest SmallRequest(const std::string& prompt = "a heron at dawn") {
    v1::GenerateRequest r;
    r.set_prompt(prompt);
    r.set_width(64);
    r.set_height(64);
    r.set_num_frames(5);
    r.set_num_steps(3);
    return r;
  }

  std::shared_ptr<FakePipelineCounters> counters_ = std::make_shared<FakePipelineCounters>();
  std::unique_ptr<SpargeServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::VideoService::Stub> stub_;
  std::string jobs_dir_;
};

TEST_F(VideoServiceTest, StreamsEventsInOrderAndTheFileReassembles) {
  StartServer();
  for (v1::OutputFormat format : {v1::OUTPUT_FORMAT_MP4, v1::OUTPUT_FORMAT_PNG_FRAMES}) {
    v1::GenerateRequest request = SmallRequest();
    request.set_output_format(format);
    request.set_seed(5);
    CallResult r = Generate(request);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    ASSERT_GE(r.events.size(), 4u);
    ASSERT_TRUE(r.events.front().has_accepted());
    EXPECT_FALSE(r.events.front().accepted().job_id().empty());
    EXPECT_EQ(r.events.front().accepted().resolved_request().seed(), 5u);
    ASSERT_TRUE(r.events.back().has_completed());

    // accepted, progress..., chunk..., completed: phases never go back.
    int phase = 0;  // 0 accepted, 1 progress, 2 chunks, 3 completed
    int last_step = 0, denoise_events = 0;
    std::string file;
    for (const v1::GenerateEvent& e : r.events) {
      const int p = e.has_accepted() ? 0 : e.has_progress() ? 1 : e.has_chunk() ? 2 : 3;
      ASSERT_GE(p, phase);
      phase = p;
      if (e.has_progress() && e.progress().stage() == v1::STAGE_DENOISE) {
        EXPECT_EQ(e.progress().step(), last_step + 1);
        EXPECT_EQ(e.progress().total_steps(), 3);
        last_step = e.progress().step();
        ++denoise_events;
      }
      if (e.has_chunk()) {
        ASSERT_EQ(e.chunk().offset(), static_cast<int64_t>(file.size()));
        file += e.chunk().data();
      }
    }
    EXPECT_EQ(denoise_events, 3);
    const v1::GenerateCompleted& c = r.events.back().completed();
    EXPECT_EQ(c.file_size_bytes(), static_cast<int64_t>(file.size()));
    EXPECT_GT(file.size(), 1024u);  // more than one chunk
    EXPECT_EQ(c.content_type(),
              format == v1::OUTPUT_FORMAT_MP4 ? "video/mp4" : "application/x-tar");
    EXPECT_EQ(file.rfind(format == v1::OUTPUT_FORMAT_MP4 ? "FAKE mp4 64x64x5@16\n"
                                                         : "FAKE tar 64x64x5@16\n",
                         0),
              0u);
    EXPECT_EQ(c.seed(), 5u);
  }
  EXPECT_EQ(counters_->live_jobs.load(), 0);
}

TEST_F(VideoServiceTest, UnsetSeedIsRandomAndReported) {
  StartServer();
  CallResult a = Generate(SmallRequest());
  CallResult b = Generate(SmallRequest());
  ASSERT_TRUE(a.status.ok() && b.status.ok());
  const uint64_t seed_a = a.events.back().completed().seed();
  EXPECT_EQ(a.events.front().accepted().resolved_request().seed(), seed_a);
  EXPECT_NE(seed_a, b.events.back().completed().seed());
}

TEST_F(VideoServiceTest, BadInputsAreRejectedWhileTheServerKeepsServing) {
  StartServer();
  struct Case {
    const char* field;
    void (*mutate)(v1::GenerateRequest*);
  };
  const Case cases[] = {
      {"width: must be a multiple of 16 in [64, 1280], got 17",
       [](v1::GenerateRequest* r) { r->set_width(17); }},
      {"num_frames: must be 4k+1 in [1, 81], got 0",
       [](v1::GenerateRequest* r) { r->set_num_frames(0); }},
      {"sparsity.topp: must be in (0, 1], got 1.5",
       [](v1::GenerateRequest* r) { r->mutable_sparsity()->set_topp(1.5f); }},
      {"sparsity.topk: must be in (0, 1], got -1",
       [](v1::GenerateRequest* r) { r->mutable_sparsity()->set_topk(-1.0f); }},
      {"prompt: must be non-empty", [](v1::GenerateRequest* r) { r->clear_prompt(); }},
      {"got 1048576 bytes",
       [](v1::GenerateRequest* r) { r->set_prompt(std::string(1 << 20, 'x')); }},
      {"num_steps: must be in [1, 100], got 10000",
       [](v1::GenerateRequest* r) { r->set_num_steps(10000); }},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest request = SmallRequest();
    c.mutate(&request);
    CallResult r = Generate(request);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.field));
    EXPECT_TRUE(r.events.empty()) << c.field;
    EXPECT_EQ(Health(), HealthStatus::kServing) << "after " << c.field;
  }
  EXPECT_EQ(Health("sparge.v1.VideoService"), HealthStatus::kServing);
  CallResult good = Generate(SmallRequest());
  EXPECT_TRUE(good.status.ok()) << good.status.error_message();
  EXPECT_TRUE(good.events.back().has_completed());
  EXPECT_EQ(counters_->starts.load(), 1);  // rejected requests never reached the engine

  // Engine failures are per job too.
  CallResult failed = Generate(SmallRequest(std::string("x ") + testing::kFailStep));
  EXPECT_EQ(failed.status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_EQ(Health(), HealthStatus::kServing);
  EXPECT_TRUE(Generate(SmallRequest()).status.ok());
}

TEST_F(VideoServiceTest, NotServingUntilTheModelIsLoaded) {
  auto release = std::make_shared<absl::Notification>();
  PipelineFactory inner = testing::FakePipelineFactory({}, counters_);
  StartServer({}, /*wait_ready=*/false,
              [release, inner]() -> absl::StatusOr<std::unique_ptr<engine::Pipeline>> {
                release->WaitForNotification();
                return inner();
              });
  EXPECT_EQ(Health(), HealthStatus::kNotServing);
  CallResult early = Generate(SmallRequest());
  EXPECT_EQ(early.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(early.status.error_message(), HasSubstr("still loading"));
  {
    grpc::ClientContext context;
    v1::ServerInfo info;
    ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
    EXPECT_FALSE(info.ready());
  }
  release->Notify();
  ASSERT_TRUE(server_->WaitUntilReady(kWait).ok());
  EXPECT_EQ(Health(), HealthStatus::kServing);
  EXPECT_TRUE(Generate(SmallRequest()).status.ok());
}

TEST_F(VideoServiceTest, ClientCancellationStopsTheJobAtAStepBoundary) {
  FakePipelineOptions fake;
  fake.step_delay = absl::Milliseconds(5);
  StartServer(fake);
  v1::GenerateRequest request = SmallRequest();
  request.set_num_steps(100);
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, request);
  v1::GenerateEvent event;
  int denoise_events = 0;
  while (denoise_events < 3 && reader->Read(&event)) {
    if (event.has_progress() && event.progress().stage() == v1::STAGE_DENOISE) ++denoise_events;
  }
  ASSERT_EQ(denoise_events, 3);
  context.TryCancel();
  while (reader->Read(&event)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(Eventually([&] { return counters_->live_jobs.load() == 0; }));
  EXPECT_LT(counters_->job_steps.load(), 100);
  EXPECT_TRUE(Eventually([&] {
    return absl::StrContains(server_->metrics().SerializeText(),
                             "sparge_cancellations_total{reason=\"client\"} 1");
  }));
  EXPECT_TRUE(Generate(SmallRequest()).status.ok());  // still serving
}

TEST_F(VideoServiceTest, DeadlineStopsTheJob) {
  FakePipelineOptions fake;
  fake.step_delay = absl::Milliseconds(5);
  StartServer(fake);
  v1::GenerateRequest request = SmallRequest();
  request.set_num_steps(100);
  CallResult r = Generate(request, absl::Milliseconds(150));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(Eventually([&] { return counters_->live_jobs.load() == 0; }));
  EXPECT_LT(counters_->job_steps.load(), 100);
}

TEST_F(VideoServiceTest, ServerInfoReportsModelLimitsAndDefaults) {
  StartServer();
  grpc::ClientContext context;
  v1::ServerInfo info;
  grpc::Status status = stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(info.ready());
  EXPECT_FALSE(info.version().empty());
  EXPECT_EQ(info.device(), "cpu (fake)");
  EXPECT_EQ(info.model().name(), "fake");
  EXPECT_EQ(info.model().architecture(), "wan2.1-t2v");
  EXPECT_EQ(info.model().block_q(), 64);
  EXPECT_EQ(info.limits().max_width(), 1280);
  EXPECT_EQ(info.limits().size_multiple(), 16);
  EXPECT_EQ(info.limits().max_steps(), 100);
  EXPECT_EQ(info.limits().max_prompt_bytes(), 2048);
  EXPECT_EQ(info.defaults().width(), 256);
  EXPECT_EQ(info.defaults().num_frames(), 17);
  EXPECT_EQ(info.defaults().sparsity().mode(), v1::ATTENTION_MODE_HYBRID);
  EXPECT_FALSE(info.defaults().has_seed());
}

TEST_F(VideoServiceTest, MetricsScrapeHasEveryMetricAndCountsRequests) {
  StartServer();
  ASSERT_TRUE(Generate(SmallRequest()).status.ok());
  v1::GenerateRequest bad = SmallRequest();
  bad.set_width(17);
  ASSERT_EQ(Generate(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_GT(server_->metrics_port(), 0);
  httplib::Client client("127.0.0.1", server_->metrics_port());
  // The OK count is recorded when the reactor finishes, just after the client saw the status.
  std::string body;
  EXPECT_TRUE(Eventually([&] {
    httplib::Result res = client.Get("/metrics");
    if (!res || res->status != 200) return false;
    body = res->body;
    return absl::StrContains(body, "sparge_requests_total{status=\"OK\"} 1");
  })) << body;
  for (const char* name :
       {kRequestsTotal, kRequestDurationSeconds, kQueueWaitSeconds, kQueueDepth, kRunningJobs,
        kBatchSize, kDenoiseStepSeconds, kTextEncodeSeconds, kVaeDecodeSeconds,
        kVideoEncodeSeconds, kAttentionSparsityRatio, kCancellationsTotal}) {
    EXPECT_THAT(body, HasSubstr(name));
  }
  EXPECT_THAT(body, HasSubstr("sparge_requests_total{status=\"INVALID_ARGUMENT\"} 1"));
  EXPECT_THAT(body, HasSubstr("sparge_denoise_step_seconds_count 3"));
  EXPECT_THAT(body, HasSubstr("sparge_attention_sparsity_ratio_count 3"));
  EXPECT_THAT(body, HasSubstr("sparge_model_ready 1"));
}

TEST_F(VideoServiceTest, ShutdownEndsInFlightCallsAndFreesJobs) {
  FakePipelineOptions fake;
  fake.step_delay = absl::Milliseconds(20);  // 100 steps: 2 s, far beyond the 0.2 s grace
  StartServer(fake);
  v1::GenerateRequest request = SmallRequest();
  request.set_num_steps(100);
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, request);
  v1::GenerateEvent event;
  ASSERT_TRUE(reader->Read(&event));
  ASSERT_TRUE(event.has_accepted());
  const absl::Time t0 = absl::Now();
  server_->Shutdown();  // grace 0.2 s, then the call is cancelled
  EXPECT_LT(absl::Now() - t0, absl::Seconds(1.5));
  while (reader->Read(&event)) {
    EXPECT_FALSE(event.has_completed());
  }
  EXPECT_FALSE(reader->Finish().ok());
  EXPECT_EQ(counters_->live_jobs.load(), 0);
  EXPECT_LT(counters_->job_steps.load(), 100);
}

}  // namespace
}  // namespace sparge::server
