// Config loading: the committed config/server.yaml equals the built-in defaults; syntax errors,
// type errors, unknown keys and out-of-range values are INVALID_ARGUMENT with file:line:column.
#include "server/config.h"

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sparge::server {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string SourceDir() {
  const char* dir = std::getenv("SPARGE_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

std::string ErrorOf(const std::string& yaml) {
  absl::StatusOr<ServerConfig> c = ParseServerConfig(yaml, "test.yaml");
  EXPECT_FALSE(c.ok()) << "accepted:\n" << yaml;
  if (c.ok()) return "";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(c.status().message());
}

TEST(ConfigTest, CommittedFileMatchesBuiltInDefaults) {
  absl::StatusOr<ServerConfig> c = LoadServerConfig(SourceDir() + "/config/server.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  const ServerConfig d;
  EXPECT_EQ(c->listen_address, d.listen_address);
  EXPECT_EQ(c->port, 50051);
  EXPECT_EQ(c->metrics_port, 9090);
  EXPECT_EQ(c->metrics_address, d.metrics_address);
  EXPECT_EQ(c->model.device, "cpu");
  EXPECT_EQ(c->output_chunk_bytes, 65536);
  EXPECT_EQ(c->warmup, d.warmup);
  EXPECT_DOUBLE_EQ(c->shutdown_grace_seconds, d.shutdown_grace_seconds);
  EXPECT_EQ(c->model.model, "tiny");
  EXPECT_EQ(c->model.dtype, d.model.dtype);
  EXPECT_EQ(c->model.weight_seed, d.model.weight_seed);
  EXPECT_EQ(c->model.block_q, d.model.block_q);
  EXPECT_EQ(c->model.block_k, d.model.block_k);
  EXPECT_EQ(c->model.num_threads, d.model.num_threads);
  EXPECT_EQ(c->scheduler.max_queue_length, d.scheduler.max_queue_length);
  EXPECT_EQ(c->scheduler.max_running_jobs, d.scheduler.max_running_jobs);
  EXPECT_EQ(c->scheduler.max_batch_tokens, d.scheduler.max_batch_tokens);
  EXPECT_EQ(c->scheduler.preemption, d.scheduler.preemption);
  EXPECT_DOUBLE_EQ(c->scheduler.aging_seconds, d.scheduler.aging_seconds);
  EXPECT_EQ(c->scheduler.deadline_aware, d.scheduler.deadline_aware);
  EXPECT_EQ(c->jobs.output_dir, d.jobs.output_dir);
  EXPECT_EQ(c->jobs.max_results, d.jobs.max_results);
  EXPECT_DOUBLE_EQ(c->jobs.result_ttl_seconds, d.jobs.result_ttl_seconds);
  const RequestLimits& l = c->limits;
  EXPECT_EQ(l.min_width, d.limits.min_width);
  EXPECT_EQ(l.max_width, d.limits.max_width);
  EXPECT_EQ(l.min_height, d.limits.min_height);
  EXPECT_EQ(l.max_height, d.limits.max_height);
  EXPECT_EQ(l.size_multiple, d.limits.size_multiple);
  EXPECT_EQ(l.min_frames, d.limits.min_frames);
  EXPECT_EQ(l.max_frames, d.limits.max_frames);
  EXPECT_EQ(l.max_steps, d.limits.max_steps);
  EXPECT_EQ(l.max_prompt_bytes, d.limits.max_prompt_bytes);
  EXPECT_FLOAT_EQ(l.max_guidance_scale, d.limits.max_guidance_scale);
  EXPECT_FLOAT_EQ(l.max_shift, d.limits.max_shift);
  EXPECT_EQ(l.max_fps, d.limits.max_fps);
  const RequestDefaults& r = c->defaults;
  EXPECT_EQ(r.negative_prompt, d.defaults.negative_prompt);
  EXPECT_EQ(r.width, d.defaults.width);
  EXPECT_EQ(r.height, d.defaults.height);
  EXPECT_EQ(r.num_frames, d.defaults.num_frames);
  EXPECT_EQ(r.fps, d.defaults.fps);
  EXPECT_EQ(r.num_steps, d.defaults.num_steps);
  EXPECT_FLOAT_EQ(r.guidance_scale, d.defaults.guidance_scale);
  EXPECT_EQ(r.sampler, d.defaults.sampler);
  EXPECT_FLOAT_EQ(r.shift, d.defaults.shift);
  EXPECT_EQ(r.output_format, d.defaults.output_format);
  EXPECT_EQ(r.sparsity.mode, d.defaults.sparsity.mode);
  EXPECT_FLOAT_EQ(r.sparsity.topk, d.defaults.sparsity.topk);
  EXPECT_FLOAT_EQ(r.sparsity.topp, d.defaults.sparsity.topp);
  EXPECT_EQ(r.sparsity.dense_steps, d.defaults.sparsity.dense_steps);
}

TEST(ConfigTest, BuiltInDefaultsValidate) { EXPECT_TRUE(ServerConfig().Validate().ok()); }

TEST(ConfigTest, EmptyDocumentGivesDefaults) {
  absl::StatusOr<ServerConfig> c = ParseServerConfig("", "empty.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->port, 50051);
}

TEST(ConfigTest, ValuesAreRead) {
  absl::StatusOr<ServerConfig> c = ParseServerConfig(R"(
port: 0
metrics_port: 0
device: cuda:1
warmup: false
model:
  name: tiny
  dtype: bfloat16
  weight_seed: 7
scheduler:
  max_queue_length: 3
  max_running_jobs: 4
  max_batch_tokens: 4096
  preemption: false
  aging_seconds: 0
  deadline_aware: false
jobs:
  output_dir: /var/lib/sparge
  max_results: 7
  result_ttl_seconds: 3.5
defaults:
  sampler: unipc
  output_format: png
  sparsity:
    mode: topp
    topp: 0.5
)",
                                                     "t.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->port, 0);
  EXPECT_EQ(c->metrics_port, 0);
  EXPECT_EQ(c->model.device, "cuda:1");
  EXPECT_FALSE(c->warmup);
  EXPECT_EQ(c->model.dtype, "bfloat16");
  EXPECT_EQ(c->model.weight_seed, 7u);
  EXPECT_EQ(c->scheduler.max_queue_length, 3);
  EXPECT_EQ(c->scheduler.max_running_jobs, 4);
  EXPECT_EQ(c->scheduler.max_batch_tokens, 4096);
  EXPECT_FALSE(c->scheduler.preemption);
  EXPECT_DOUBLE_EQ(c->scheduler.aging_seconds, 0.0);
  EXPECT_FALSE(c->scheduler.deadline_aware);
  EXPECT_EQ(c->jobs.output_dir, "/var/lib/sparge");
  EXPECT_EQ(c->jobs.max_results, 7);
  EXPECT_DOUBLE_EQ(c->jobs.result_ttl_seconds, 3.5);
  EXPECT_EQ(c->defaults.sampler, engine::SamplerKind::kUniPC);
  EXPECT_EQ(c->defaults.output_format, OutputFormat::kPngFrames);
  EXPECT_EQ(c->defaults.sparsity.mode, engine::AttentionMode::kTopP);
  EXPECT_FLOAT_EQ(c->defaults.sparsity.topp, 0.5f);
  EXPECT_FLOAT_EQ(c->defaults.sparsity.topk, 0.1f);  // untouched default
}

TEST(ConfigTest, SyntaxErrorNamesFileAndLine) {
  const std::string message = ErrorOf("port: 50051\nmodel:\n  name: tiny\n  dtype: [float32\n");
  EXPECT_THAT(message, StartsWith("test.yaml:"));
  EXPECT_THAT(message, HasSubstr("(syntax)"));
  // The unterminated flow sequence opens on line 4; yaml-cpp reports where it notices (4 or 5).
  EXPECT_TRUE(absl::StartsWith(message, "test.yaml:4:") || absl::StartsWith(message, "test.yaml:5:"))
      << message;
}

TEST(ConfigTest, TabIndentationIsASyntaxError) {
  EXPECT_THAT(ErrorOf("model:\n\tname: tiny\n"), StartsWith("test.yaml:2:"));
}

TEST(ConfigTest, UnknownKeyIsNamed) {
  EXPECT_THAT(ErrorOf("port: 1\nmodel:\n  nmae: tiny\n"),
              StartsWith("test.yaml:3:3: model.nmae: unknown key 'nmae' (known keys here: name, "));
  EXPECT_THAT(ErrorOf("prot: 1\n"), StartsWith("test.yaml:1:1: prot: unknown key 'prot'"));
  EXPECT_THAT(ErrorOf("defaults:\n  sparsity:\n    top_k: 0.2\n"),
              StartsWith("test.yaml:3:5: defaults.sparsity.top_k: unknown key 'top_k'"));
}

TEST(ConfigTest, DuplicateKeyIsAnError) {
  EXPECT_EQ(ErrorOf("port: 1\nport: 2\n"), "test.yaml:2:1: port: duplicate key");
}

TEST(ConfigTest, TypeErrorsNameFieldAndValue) {
  EXPECT_EQ(ErrorOf("port: abc\n"), "test.yaml:1:7: port: expected an integer, got 'abc'");
  EXPECT_EQ(ErrorOf("warmup: maybe\n"),
            "test.yaml:1:9: warmup: expected true or false, got 'maybe'");
  EXPECT_EQ(ErrorOf("limits:\n  max_shift: [1]\n"),
            "test.yaml:2:14: limits.max_shift: expected a number, got a list");
  EXPECT_EQ(ErrorOf("model: tiny\n"), "test.yaml:1:8: model: expected a mapping, got 'tiny'");
  EXPECT_EQ(ErrorOf("defaults:\n  sampler: ddim\n"),
            "test.yaml:2:12: defaults.sampler: must be one of euler, unipc, got 'ddim'");
  EXPECT_EQ(ErrorOf("defaults:\n  sparsity:\n    mode: sparse\n"),
            "test.yaml:3:11: defaults.sparsity.mode: must be one of dense, topk, topp, hybrid, "
            "got 'sparse'");
}

TEST(ConfigTest, OutOfRangeValuesNameFieldRangeAndLine) {
  EXPECT_EQ(ErrorOf("port: 70000\n"), "test.yaml:1:1: port: must be in [0, 65535], got 70000");
  EXPECT_EQ(ErrorOf("device: tpu\n"),
            "test.yaml:1:1: device: must be cpu, cuda or cuda:N, got tpu");
  EXPECT_EQ(ErrorOf("model:\n  block_q: 50\n"),
            "test.yaml:2:3: model.block_q: must be a multiple of 16 in [16, 1024], got 50");
  EXPECT_EQ(ErrorOf("limits:\n  max_frames: 80\n"),
            "test.yaml:2:3: limits.max_frames: must be 4k+1 in [1, 1001], got 80");
  EXPECT_EQ(ErrorOf("defaults:\n  sparsity:\n    topp: 1.5\n"),
            "test.yaml:3:5: defaults.sparsity.topp: must be in (0, 1], got 1.5");
  EXPECT_EQ(ErrorOf("scheduler:\n  max_running_jobs: 0\n"),
            "test.yaml:2:3: scheduler.max_running_jobs: must be in [1, 256], got 0");
  EXPECT_EQ(ErrorOf("scheduler:\n  max_batch_tokens: -1\n"),
            "test.yaml:2:3: scheduler.max_batch_tokens: must be in [0, 1099511627776], got -1");
  EXPECT_EQ(ErrorOf("scheduler:\n  aging_seconds: -5\n"),
            "test.yaml:2:3: scheduler.aging_seconds: must be in [0, 604800], got -5");
  EXPECT_EQ(ErrorOf("scheduler:\n  preemption: sometimes\n"),
            "test.yaml:2:15: scheduler.preemption: expected true or false, got 'sometimes'");
  EXPECT_EQ(ErrorOf("jobs:\n  output_dir: \"\"\n"),
            "test.yaml:2:3: jobs.output_dir: must be non-empty");
  EXPECT_EQ(ErrorOf("jobs:\n  max_results: 0\n"),
            "test.yaml:2:3: jobs.max_results: must be in [1, 100000], got 0");
  EXPECT_EQ(ErrorOf("jobs:\n  result_ttl_seconds: 0\n"),
            "test.yaml:2:3: jobs.result_ttl_seconds: must be in (0, 1e+12], got 0");
  EXPECT_THAT(ErrorOf("jobs:\n  max_result: 5\n"),
              StartsWith("test.yaml:2:3: jobs.max_result: unknown key 'max_result' (known keys "
                         "here: output_dir, max_results, result_ttl_seconds)"));
  // A default that no longer fits a tightened limit is reported against the default.
  EXPECT_EQ(ErrorOf("limits:\n  max_width: 128\n"),
            "test.yaml: defaults.width: must be a multiple of 16 in [64, 128], got 256");
}

TEST(ConfigTest, TopLevelMustBeAMapping) {
  EXPECT_THAT(ErrorOf("- a\n- b\n"), HasSubstr("(top level): expected a mapping, got a list"));
}

TEST(ConfigTest, MissingFileIsNotFound) {
  absl::StatusOr<ServerConfig> c = LoadServerConfig("/nonexistent/server.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr("/nonexistent/server.yaml"));
}

TEST(ConfigTest, NamesRoundTrip) {
  for (auto mode : {engine::AttentionMode::kDense, engine::AttentionMode::kTopK,
                    engine::AttentionMode::kTopP, engine::AttentionMode::kHybrid}) {
    EXPECT_EQ(*ParseAttentionMode(AttentionModeName(mode)), mode);
  }
  for (auto sampler : {engine::SamplerKind::kEuler, engine::SamplerKind::kUniPC}) {
    EXPECT_EQ(*ParseSampler(SamplerName(sampler)), sampler);
  }
  EXPECT_EQ(*ParseOutputFormat(ToString(OutputFormat::kPngFrames)), OutputFormat::kPngFrames);
}

}  // namespace
}  // namespace sparge::server
