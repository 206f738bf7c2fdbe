// sparge-cli against an in-process server (FakePipeline, fake encoder): generate writes the file
// and a summary, bad flags and bad requests fail with the field named, info and health work.
#include <stdlib.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/testing/fake_pipeline.h"
#include "server/video_service.h"

namespace sparge::server {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct CliRun {
  int exit_code = -1;
  std::string out, err;
};

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // ctest runs tests in parallel processes: each gets its own directory (also for job results).
    std::string pattern = ::testing::TempDir() + "/sparge_cli_test_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    ServerConfig config;
    config.listen_address = "127.0.0.1";
    config.port = 0;
    config.metrics_port = 0;
    config.jobs.output_dir = dir_ + "/jobs";
    ServerDeps deps;
    deps.create_pipeline = testing::FakePipelineFactory({}, counters_);
    deps.encode_video = testing::FakeVideoEncoder();
    absl::StatusOr<std::unique_ptr<SpargeServer>> server = SpargeServer::Create(config, deps);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    absl::StatusOr<int> port = server_->Start();
    ASSERT_TRUE(port.ok()) << port.status();
    ASSERT_TRUE(server_->WaitUntilReady(absl::Seconds(30)).ok());
    address_ = absl::StrCat("127.0.0.1:", *port);
  }

  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }

  CliRun Cli(const std::string& args) {
    const std::string out = dir_ + "/cli.out", err = dir_ + "/cli.err";
    const std::string command =
        absl::StrCat(SPARGE_CLI_PATH, " ", args, " > ", out, " 2> ", err);
    const int status = std::system(command.c_str());
    CliRun run;
    run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    run.out = ReadFile(out);
    run.err = ReadFile(err);
    return run;
  }

  std::shared_ptr<testing::FakePipelineCounters> counters_ =
      std::make_shared<testing::FakePipelineCounters>();
  std::unique_ptr<SpargeServer> server_;
  std::string address_;
  std::string dir_;
};

TEST_F(CliTest, GenerateWritesTheFileAndASummary) {
  const std::string file = dir_ + "/fox.mp4";
  CliRun r = Cli(absl::StrCat("generate --server ", address_,
                           " --prompt 'a fox' --width 64 --height 64 --frames 5 --steps 2 "
                           "--seed 7 --out ",
                           file));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(ReadFile(file), StartsWith("FAKE mp4 64x64x5@16\n"));
  EXPECT_THAT(r.out, HasSubstr("wrote " + file));
  EXPECT_THAT(r.out, HasSubstr("64x64, 5 frames at 16 fps, seed 7"));
  EXPECT_THAT(r.err, HasSubstr("step 2/2"));  // progress (one line per event off a terminal)
  EXPECT_THAT(r.err, HasSubstr("accepted"));
}

TEST_F(CliTest, PngFormatAndSparsityFlags) {
  const std::string file = dir_ + "/frames.tar";
  CliRun r = Cli(absl::StrCat("--server ", address_,
                           " --prompt waves --width 128 --height 96 --frames 5 --steps 2 "
                           "--format png --mode topk --topk 0.25 --dense-steps 0 --quiet --out ",
                           file));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(ReadFile(file), StartsWith("FAKE tar 128x96x5@16\n"));
  EXPECT_EQ(r.err, "");  // --quiet
  // topk 0.25 in every step: the fake reports 1 - topk.
  EXPECT_THAT(r.out, HasSubstr("mean sparsity 0.750"));
}

TEST_F(CliTest, BadRequestNamesTheFieldAndExitsNonZero) {
  CliRun r = Cli(absl::StrCat("generate --server ", address_, " --prompt x --width 17 --out ",
                           dir_, "/bad.mp4"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("INVALID_ARGUMENT: width: must be a multiple of 16"));
  EXPECT_FALSE(std::ifstream(dir_ + "/bad.mp4").good());
  EXPECT_FALSE(std::ifstream(dir_ + "/bad.mp4.part").good());
}

TEST_F(CliTest, BadFlagsFailBeforeCalling) {
  EXPECT_NE(Cli("generate --no-such-flag 3").exit_code, 0);
  EXPECT_NE(Cli(absl::StrCat("--server ", address_, " --prompt x --mode sparse")).exit_code, 0);
  EXPECT_NE(Cli(absl::StrCat("--server ", address_)).exit_code, 0);  // no --prompt
  EXPECT_NE(Cli("frobnicate").exit_code, 0);
  EXPECT_EQ(counters_->starts.load(), 0);
}

TEST_F(CliTest, InfoHealthAndHelp) {
  CliRun info = Cli(absl::StrCat("info --server ", address_));
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_THAT(info.out, HasSubstr("name: \"fake\""));
  EXPECT_THAT(info.out, HasSubstr("max_width: 1280"));
  CliRun health = Cli(absl::StrCat("health --server ", address_));
  EXPECT_EQ(health.exit_code, 0) << health.err;
  EXPECT_THAT(health.out, HasSubstr("SERVING"));
  CliRun help = Cli("--help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.out, HasSubstr("--dense-steps"));
  server_->Shutdown();
  EXPECT_NE(Cli(absl::StrCat("health --timeout 2 --server ", address_)).exit_code, 0);
}

}  // namespace
}  // namespace sparge::server
