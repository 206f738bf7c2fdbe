// Request validation: every acceptance case of the foundation issue is rejected with
// INVALID_ARGUMENT naming the field, its allowed range and the value; defaults fill unset fields.
#include "server/request_validation.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using ::testing::HasSubstr;

v1::GenerateRequest Valid() {
  v1::GenerateRequest r;
  r.set_prompt("a red fox in the snow");
  return r;
}

absl::StatusOr<ResolvedRequest> Resolve(const v1::GenerateRequest& r) {
  return ResolveRequest(r, RequestLimits(), RequestDefaults(), [] { return uint64_t{777}; });
}

struct BadCase {
  const char* name;
  void (*mutate)(v1::GenerateRequest*);
  const char* message;  // the exact INVALID_ARGUMENT message
};

class BadRequestTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadRequestTest, RejectedNamingFieldRangeAndValue) {
  v1::GenerateRequest r = Valid();
  GetParam().mutate(&r);
  absl::StatusOr<ResolvedRequest> resolved = Resolve(r);
  ASSERT_FALSE(resolved.ok());
  EXPECT_EQ(resolved.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(resolved.status().message(), GetParam().message);
}

INSTANTIATE_TEST_SUITE_P(
    AcceptanceCases, BadRequestTest,
    ::testing::Values(
        BadCase{"width17", [](v1::GenerateRequest* r) { r->set_width(17); },
                "width: must be a multiple of 16 in [64, 1280], got 17"},
        BadCase{"frames0", [](v1::GenerateRequest* r) { r->set_num_frames(0); },
                "num_frames: must be 4k+1 in [1, 81], got 0"},
        BadCase{"topp1_5", [](v1::GenerateRequest* r) { r->mutable_sparsity()->set_topp(1.5f); },
                "sparsity.topp: must be in (0, 1], got 1.5"},
        BadCase{"topkMinus1",
                [](v1::GenerateRequest* r) { r->mutable_sparsity()->set_topk(-1.0f); },
                "sparsity.topk: must be in (0, 1], got -1"},
        BadCase{"emptyPrompt", [](v1::GenerateRequest* r) { r->clear_prompt(); },
                "prompt: must be non-empty UTF-8 text of at most 2048 bytes, got 0 bytes"},
        BadCase{"megabytePrompt",
                [](v1::GenerateRequest* r) { r->set_prompt(std::string(1 << 20, 'a')); },
                "prompt: must be non-empty UTF-8 text of at most 2048 bytes, got 1048576 bytes"},
        BadCase{"steps10000", [](v1::GenerateRequest* r) { r->set_num_steps(10000); },
                "num_steps: must be in [1, 100], got 10000"},
        // Beyond the acceptance list: every other field has its range too.
        BadCase{"whitespacePrompt", [](v1::GenerateRequest* r) { r->set_prompt(" \t\n"); },
                "prompt: must be non-empty UTF-8 text of at most 2048 bytes, got only "
                "whitespace"},
        BadCase{"badUtf8", [](v1::GenerateRequest* r) { r->set_prompt("caf\xC3"); },
                "prompt: must be non-empty UTF-8 text of at most 2048 bytes, got invalid UTF-8"},
        BadCase{"longNegative",
                [](v1::GenerateRequest* r) { r->set_negative_prompt(std::string(3000, 'n')); },
                "negative_prompt: must be UTF-8 text of at most 2048 bytes, got 3000 bytes"},
        BadCase{"height2000", [](v1::GenerateRequest* r) { r->set_height(2000); },
                "height: must be a multiple of 16 in [64, 1280], got 2000"},
        BadCase{"widthTooSmall", [](v1::GenerateRequest* r) { r->set_width(48); },
                "width: must be a multiple of 16 in [64, 1280], got 48"},
        BadCase{"frames16", [](v1::GenerateRequest* r) { r->set_num_frames(16); },
                "num_frames: must be 4k+1 in [1, 81], got 16"},
        BadCase{"frames85", [](v1::GenerateRequest* r) { r->set_num_frames(85); },
                "num_frames: must be 4k+1 in [1, 81], got 85"},
        BadCase{"fps0", [](v1::GenerateRequest* r) { r->set_fps(0); },
                "fps: must be in [1, 120], got 0"},
        BadCase{"steps0", [](v1::GenerateRequest* r) { r->set_num_steps(0); },
                "num_steps: must be in [1, 100], got 0"},
        BadCase{"guidanceNegative", [](v1::GenerateRequest* r) { r->set_guidance_scale(-2); },
                "guidance_scale: must be in [0, 30], got -2"},
        BadCase{"guidanceNan",
                [](v1::GenerateRequest* r) { r->set_guidance_scale(std::nanf("")); },
                "guidance_scale: must be in [0, 30], got nan"},
        BadCase{"shift0", [](v1::GenerateRequest* r) { r->set_shift(0); },
                "shift: must be in (0, 100], got 0"},
        BadCase{"topk0", [](v1::GenerateRequest* r) { r->mutable_sparsity()->set_topk(0); },
                "sparsity.topk: must be in (0, 1], got 0"},
        BadCase{"denseStepsOverSteps",
                [](v1::GenerateRequest* r) {
                  r->set_num_steps(4);
                  r->mutable_sparsity()->set_dense_steps(5);
                },
                "sparsity.dense_steps: must be in [0, 4], got 5"},
        BadCase{"unknownSampler",
                [](v1::GenerateRequest* r) { r->set_sampler(static_cast<v1::Sampler>(9)); },
                "sampler: must be one of SAMPLER_EULER, SAMPLER_UNIPC, got 9"},
        BadCase{"unknownMode",
                [](v1::GenerateRequest* r) {
                  r->mutable_sparsity()->set_mode(static_cast<v1::AttentionMode>(7));
                },
                "sparsity.mode: must be one of ATTENTION_MODE_DENSE, ATTENTION_MODE_TOPK, "
                "ATTENTION_MODE_TOPP, ATTENTION_MODE_HYBRID, got 7"},
        BadCase{"unknownFormat",
                [](v1::GenerateRequest* r) {
                  r->set_output_format(static_cast<v1::OutputFormat>(5));
                },
                "output_format: must be one of OUTPUT_FORMAT_MP4, OUTPUT_FORMAT_PNG_FRAMES, "
                "got 5"},
        BadCase{"unknownPriority",
                [](v1::GenerateRequest* r) { r->set_priority(static_cast<v1::Priority>(8)); },
                "priority: must be one of PRIORITY_LOW, PRIORITY_NORMAL, PRIORITY_HIGH, got 8"}),
    [](const ::testing::TestParamInfo<BadCase>& info) { return info.param.name; });

TEST(RequestValidationTest, UnsetFieldsTakeDefaultsAndSeedIsDrawn) {
  absl::StatusOr<ResolvedRequest> r = Resolve(Valid());
  ASSERT_TRUE(r.ok()) << r.status();
  const RequestDefaults d;
  EXPECT_EQ(r->engine.prompt, "a red fox in the snow");
  EXPECT_EQ(r->engine.negative_prompt, d.negative_prompt);
  EXPECT_EQ(r->engine.width, 256);
  EXPECT_EQ(r->engine.height, 256);
  EXPECT_EQ(r->engine.num_frames, 17);
  EXPECT_EQ(r->fps, 16);
  EXPECT_EQ(r->engine.num_steps, 4);
  EXPECT_FLOAT_EQ(r->engine.guidance_scale, 5.0f);
  EXPECT_EQ(r->engine.sampler, engine::SamplerKind::kEuler);
  EXPECT_FLOAT_EQ(r->engine.shift, 5.0f);
  EXPECT_EQ(r->output_format, OutputFormat::kMp4);
  EXPECT_EQ(r->priority, JobPriority::kNormal);
  EXPECT_EQ(r->engine.sparsity.mode, engine::AttentionMode::kHybrid);
  EXPECT_FLOAT_EQ(r->engine.sparsity.topk, 0.1f);
  EXPECT_FLOAT_EQ(r->engine.sparsity.topp, 0.9f);
  EXPECT_EQ(r->engine.sparsity.dense_steps, 1);
  EXPECT_TRUE(r->seed_was_random);
  EXPECT_EQ(r->engine.seed, 777u);
  // The echo has every field set, the drawn seed included.
  EXPECT_TRUE(r->resolved.has_seed());
  EXPECT_EQ(r->resolved.seed(), 777u);
  EXPECT_EQ(r->resolved.width(), 256);
  EXPECT_EQ(r->resolved.sparsity().mode(), v1::ATTENTION_MODE_HYBRID);
  EXPECT_EQ(r->resolved.output_format(), v1::OUTPUT_FORMAT_MP4);
}

TEST(RequestValidationTest, SetFieldsWin) {
  v1::GenerateRequest req = Valid();
  req.set_negative_prompt("");
  req.set_width(128);
  req.set_height(64);
  req.set_num_frames(5);
  req.set_fps(24);
  req.set_num_steps(2);
  req.set_guidance_scale(1.0f);
  req.set_seed(0);  // zero is a real seed, not "unset"
  req.set_sampler(v1::SAMPLER_UNIPC);
  req.set_shift(3.0f);
  req.set_output_format(v1::OUTPUT_FORMAT_PNG_FRAMES);
  req.set_priority(v1::PRIORITY_HIGH);
  req.mutable_sparsity()->set_mode(v1::ATTENTION_MODE_TOPK);
  req.mutable_sparsity()->set_topk(1.0f);
  req.mutable_sparsity()->set_dense_steps(0);
  absl::StatusOr<ResolvedRequest> r = Resolve(req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->engine.negative_prompt, "");
  EXPECT_EQ(r->engine.width, 128);
  EXPECT_EQ(r->engine.height, 64);
  EXPECT_EQ(r->engine.num_frames, 5);
  EXPECT_EQ(r->fps, 24);
  EXPECT_EQ(r->engine.num_steps, 2);
  EXPECT_FALSE(r->seed_was_random);
  EXPECT_EQ(r->engine.seed, 0u);
  EXPECT_EQ(r->engine.sampler, engine::SamplerKind::kUniPC);
  EXPECT_EQ(r->output_format, OutputFormat::kPngFrames);
  EXPECT_EQ(r->priority, JobPriority::kHigh);
  EXPECT_EQ(r->engine.sparsity.mode, engine::AttentionMode::kTopK);
  EXPECT_FLOAT_EQ(r->engine.sparsity.topk, 1.0f);
  EXPECT_EQ(r->engine.sparsity.dense_steps, 0);
}

TEST(RequestValidationTest, DefaultDenseStepsClampedToShortRequests) {
  RequestDefaults defaults;
  defaults.sparsity.dense_steps = 3;
  v1::GenerateRequest req = Valid();
  req.set_num_steps(1);
  absl::StatusOr<ResolvedRequest> r =
      ResolveRequest(req, RequestLimits(), defaults, [] { return uint64_t{1}; });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->engine.sparsity.dense_steps, 1);
}

TEST(RequestValidationTest, LimitsComeFromConfig) {
  RequestLimits limits;
  limits.max_width = 512;
  v1::GenerateRequest req = Valid();
  req.set_width(640);
  absl::StatusOr<ResolvedRequest> r =
      ResolveRequest(req, limits, RequestDefaults(), [] { return uint64_t{1}; });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "width: must be a multiple of 16 in [64, 512], got 640");
}

TEST(RequestValidationTest, RandomSeedsDiffer) {
  SeedSource seeds = RandomSeedSource();
  const uint64_t a = seeds();
  const uint64_t b = seeds();
  const uint64_t c = seeds();
  EXPECT_FALSE(a == b && b == c);
}

TEST(RequestValidationTest, MultiByteUtf8IsAccepted) {
  v1::GenerateRequest req = Valid();
  req.set_prompt("un renard roux dans la neige, caf\xC3\xA9, \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\xA6\x8A");
  EXPECT_TRUE(Resolve(req).ok());
  req.set_prompt("overlong \xC0\xAF");
  EXPECT_FALSE(Resolve(req).ok());
  req.set_prompt("surrogate \xED\xA0\x80");
  EXPECT_FALSE(Resolve(req).ok());
}

TEST(RequestValidationTest, DefaultsAsProtoMatchesResolution) {
  const v1::GenerateRequest d = DefaultsAsProto(RequestDefaults());
  EXPECT_EQ(d.width(), 256);
  EXPECT_EQ(d.num_frames(), 17);
  EXPECT_EQ(d.num_steps(), 4);
  EXPECT_EQ(d.sampler(), v1::SAMPLER_EULER);
  EXPECT_EQ(d.sparsity().mode(), v1::ATTENTION_MODE_HYBRID);
  EXPECT_THAT(d.negative_prompt(), HasSubstr("blurry"));
}

}  // namespace
}  // namespace sparge::server
