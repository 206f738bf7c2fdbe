// The in-process server with the real engine: the embedded tiny model on CPU and the FFmpeg
// encoder, driven by a real gRPC client on a loopback port. Checks the streamed MP4 and PNG tar
// against the request, and that the server keeps serving after a bad request.
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/engine_binding.h"
#include "server/health_client.h"
#include "server/video_service.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using ::testing::HasSubstr;

struct Output {
  std::vector<v1::GenerateEvent> events;
  std::string file;
  grpc::Status status;
};

class RealModelServerTest : public ::testing::Test {
 protected:
  // One server for the whole suite, started by the first test; a load failure fails every test
  // (not just the suite set-up, which ctest would report as skipped tests).
  void SetUp() override {
    if (server_ == nullptr && start_status_.ok()) start_status_ = StartServer();
    ASSERT_TRUE(start_status_.ok()) << start_status_;
  }
  static void TearDownTestSuite() {
    delete channel_;
    channel_ = nullptr;
    delete server_;
    server_ = nullptr;
  }

  static absl::Status StartServer() {
    ServerConfig config;
    config.listen_address = "127.0.0.1";
    config.port = 0;
    config.metrics_port = 0;
    config.warmup = false;  // keeps the test short; warm-up is exercised by sparge-server
    // Job results go to a directory of this process, not the working directory.
    std::string pattern = ::testing::TempDir() + "/sparge_real_model_test_XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) return absl::InternalError("mkdtemp failed");
    config.jobs.output_dir = pattern + "/jobs";
    absl::StatusOr<std::unique_ptr<SpargeServer>> server = SpargeServer::Create(
        config, ServerDeps{EnginePipelineFactory(config.model), EngineVideoEncoder()});
    if (!server.ok()) return server.status();
    server_ = server->release();
    absl::StatusOr<int> port = server_->Start();
    if (!port.ok()) return port.status();
    channel_ = new std::shared_ptr<grpc::Channel>(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", *port), grpc::InsecureChannelCredentials()));
    return server_->WaitUntilReady(absl::Minutes(5));
  }

  static Output Generate(const v1::GenerateRequest& request) {
    auto stub = v1::VideoService::NewStub(*channel_);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
    Output out;
    auto reader = stub->Generate(&context, request);
    v1::GenerateEvent event;
    while (reader->Read(&event)) {
      if (event.has_chunk()) {
        EXPECT_EQ(event.chunk().offset(), static_cast<int64_t>(out.file.size()));
        out.file += event.chunk().data();
      }
      out.events.push_back(event);
    }
    out.status = reader->Finish();
    return out;
  }

  static v1::GenerateRequest Small(v1::OutputFormat format) {
    v1::GenerateRequest r;
    r.set_prompt("a lighthouse on a cliff at dusk");
    r.set_width(128);
    r.set_height(96);
    r.set_num_frames(5);
    r.set_num_steps(2);
    r.set_seed(11);
    r.set_output_format(format);
    r.mutable_sparsity()->set_mode(v1::ATTENTION_MODE_HYBRID);
    r.mutable_sparsity()->set_topk(0.3f);
    r.mutable_sparsity()->set_topp(0.5f);
    r.mutable_sparsity()->set_dense_steps(0);
    return r;
  }

  static SpargeServer* server_;
  static absl::Status start_status_;
  static std::shared_ptr<grpc::Channel>* channel_;
};

SpargeServer* RealModelServerTest::server_ = nullptr;
absl::Status RealModelServerTest::start_status_;
std::shared_ptr<grpc::Channel>* RealModelServerTest::channel_ = nullptr;

TEST_F(RealModelServerTest, StreamsAnMp4OfTheRequestedSize) {
  Output out = Generate(Small(v1::OUTPUT_FORMAT_MP4));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  ASSERT_TRUE(out.events.front().has_accepted());
  ASSERT_TRUE(out.events.back().has_completed());
  const v1::GenerateCompleted& c = out.events.back().completed();
  EXPECT_EQ(c.content_type(), "video/mp4");
  EXPECT_EQ(c.file_size_bytes(), static_cast<int64_t>(out.file.size()));
  EXPECT_EQ(c.width(), 128);
  EXPECT_EQ(c.height(), 96);
  EXPECT_EQ(c.num_frames(), 5);
  ASSERT_GT(out.file.size(), 8u);
  EXPECT_EQ(out.file.substr(4, 4), "ftyp");  // an ISO BMFF file
  int denoise = 0;
  for (const v1::GenerateEvent& e : out.events) {
    if (e.has_progress() && e.progress().stage() == v1::STAGE_DENOISE) {
      ++denoise;
      // Every step is sparse (dense_steps 0, topk 0.3): some attention was skipped.
      EXPECT_GT(e.progress().achieved_sparsity(), 0.0f);
      EXPECT_LE(e.progress().achieved_sparsity(), 1.0f);
    }
  }
  EXPECT_EQ(denoise, 2);
  EXPECT_GT(c.mean_achieved_sparsity(), 0.0f);
}

TEST_F(RealModelServerTest, SameSeedSameFileAndPngFrames) {
  Output a = Generate(Small(v1::OUTPUT_FORMAT_PNG_FRAMES));
  Output b = Generate(Small(v1::OUTPUT_FORMAT_PNG_FRAMES));
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(a.events.back().completed().content_type(), "application/x-tar");
  EXPECT_EQ(a.file, b.file);  // deterministic for a fixed seed
  // ustar: 512-byte headers, each naming one PNG frame.
  int frames = 0;
  for (size_t offset = 0; offset + 512 <= a.file.size();) {
    const std::string name(a.file.c_str() + offset);
    if (name.empty()) break;
    EXPECT_EQ(name, absl::StrCat("frame_0000", frames, ".png"));
    const int64_t size = std::stoll(std::string(a.file, offset + 124, 11), nullptr, 8);
    EXPECT_EQ(a.file.substr(offset + 512 + 1, 3), "PNG");
    offset += 512 + ((size + 511) / 512) * 512;
    ++frames;
  }
  EXPECT_EQ(frames, 5);
}

TEST_F(RealModelServerTest, BadRequestThenGoodRequest) {
  v1::GenerateRequest bad = Small(v1::OUTPUT_FORMAT_MP4);
  bad.set_width(17);
  Output rejected = Generate(bad);
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(rejected.status.error_message(), HasSubstr("width"));
  absl::StatusOr<HealthStatus> health = CheckHealth(*channel_, "", absl::Seconds(5));
  ASSERT_TRUE(health.ok());
  EXPECT_EQ(*health, HealthStatus::kServing);
  v1::GenerateRequest good = Small(v1::OUTPUT_FORMAT_MP4);
  good.set_num_steps(1);
  EXPECT_TRUE(Generate(good).status.ok());
}

}  // namespace
}  // namespace sparge::server
