// The tiny-model Pipeline end to end on CPU: creation errors, request fit
// checks, determinism, batched Step == sequential Steps, achieved sparsity, and
// the default request's wall time.
#include "engine/pipeline.h"

#include <torch/cuda.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>

#include "engine/attention/sparse_attention.h"
#include "gtest/gtest.h"

namespace sparge::engine {
namespace {

class PipelineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    PipelineConfig config;
    config.block_q = 16;  // small blocks so that small test videos have several blocks
    config.block_k = 16;
    auto created = Pipeline::Create(config);
    ASSERT_TRUE(created.ok()) << created.status();
    pipeline_ = created->release();
  }
  static void TearDownTestSuite() {
    delete pipeline_;
    pipeline_ = nullptr;
  }

  static GenerationRequest SmallRequest(uint64_t seed) {
    GenerationRequest r;
    r.prompt = "a red fox running through fresh snow";
    r.negative_prompt = "blurry";
    r.width = 64;
    r.height = 64;
    r.num_frames = 5;  // latent 2 x 8 x 8 -> 2 x 4 x 4 = 32 tokens = 2 blocks of 16
    r.num_steps = 3;
    r.seed = seed;
    return r;
  }

  static std::unique_ptr<GenerationJob> MustStart(const GenerationRequest& r) {
    auto job = pipeline_->Start(r);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? std::move(job).value() : nullptr;
  }

  // Runs one job alone to completion; returns its per-step stats.
  static std::vector<StepStats> Denoise(GenerationJob& job) {
    std::vector<StepStats> stats;
    while (!job.denoise_done()) {
      GenerationJob* batch[] = {&job};
      absl::Status s = pipeline_->Step(batch, &stats);
      EXPECT_TRUE(s.ok()) << s;
      if (!s.ok()) break;
    }
    return stats;
  }

  static VideoFrames Generate(const GenerationRequest& r) {
    auto job = MustStart(r);
    if (job == nullptr) return {};
    Denoise(*job);
    auto frames = pipeline_->Decode(*job);
    EXPECT_TRUE(frames.ok()) << frames.status();
    return frames.ok() ? *frames : VideoFrames{};
  }

  static Pipeline* pipeline_;
};

Pipeline* PipelineTest::pipeline_ = nullptr;

int MaxAbsDiff(const VideoFrames& a, const VideoFrames& b) {
  int worst = 0;
  for (size_t i = 0; i < a.rgb.size(); ++i) worst = std::max(worst, std::abs(a.rgb[i] - b.rgb[i]));
  return worst;
}

TEST(PipelineCreateTest, RejectsUnknownModelDeviceAndDtype) {
  PipelineConfig config;
  config.model = "/models/wan-1.3b";
  absl::Status s = Pipeline::Create(config).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tiny"), std::string::npos) << s;

  config = PipelineConfig();
  config.device = "tpu";
  EXPECT_EQ(Pipeline::Create(config).status().code(), absl::StatusCode::kInvalidArgument);
  config.device = "cuda";
  if (!torch::cuda::is_available()) {
    EXPECT_EQ(Pipeline::Create(config).status().code(), absl::StatusCode::kFailedPrecondition);
  }
  config = PipelineConfig();
  config.dtype = "float64";
  EXPECT_EQ(Pipeline::Create(config).status().code(), absl::StatusCode::kInvalidArgument);
  config = PipelineConfig();
  config.block_q = 0;
  EXPECT_EQ(Pipeline::Create(config).status().code(), absl::StatusCode::kInvalidArgument);
}

// model.transformer: a replacement DiT must have the model's architecture, and a missing one is
// an error naming the path (the happy path, a sparge-train checkpoint served, is in
// tests/trainer/sparge_train_cli_test.sh).
TEST(PipelineCreateTest, TransformerOverrideMustMatchTheModel) {
  char tmpl[] = "/tmp/sparge-transformer-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  PipelineConfig config;
  config.transformer = dir + "/missing";
  absl::Status s = Pipeline::Create(config).status();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("missing/config.json"), std::string::npos) << s;

  // A 1.3B-sized DiT config for the tiny model.
  {
    std::ofstream json(dir + "/config.json");
    json << R"({"_class_name": "WanTransformer3DModel", "attention_head_dim": 128,
               "num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960, "text_dim": 4096})";
  }
  config.transformer = dir;
  s = Pipeline::Create(config).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("model.transformer: " + dir + " is a DiT of dim 1536, 30 layers"),
            std::string::npos)
      << s;
  std::remove((dir + "/config.json").c_str());
  ::rmdir(dir.c_str());
}

TEST_F(PipelineTest, DescribesTheTinyModel) {
  const ModelDescription& m = pipeline_->model();
  EXPECT_EQ(m.name, "tiny");
  EXPECT_EQ(m.dim, 128);
  EXPECT_EQ(m.layers, 2);
  EXPECT_EQ(m.heads, 2);
  EXPECT_EQ(m.head_dim, 64);
  EXPECT_EQ(m.text_len, 64);
  EXPECT_EQ(m.block_q, 16);
  EXPECT_GT(m.num_parameters, 100000);
  EXPECT_EQ(pipeline_->device_name(), "cpu");
}

TEST_F(PipelineTest, RejectsRequestsThatDoNotFitTheModel) {
  GenerationRequest r = SmallRequest(1);
  r.width = 72;  // not a multiple of 16
  EXPECT_EQ(pipeline_->Start(r).status().code(), absl::StatusCode::kInvalidArgument);
  r = SmallRequest(1);
  r.num_frames = 6;
  EXPECT_EQ(pipeline_->Start(r).status().code(), absl::StatusCode::kInvalidArgument);
  r = SmallRequest(1);
  r.sparsity.mode = AttentionMode::kTopP;
  r.sparsity.topp = 1.5f;
  absl::Status s = pipeline_->Start(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("topp"), std::string::npos);
}

TEST_F(PipelineTest, SameSeedSameFramesDifferentSeedDiffers) {
  const VideoFrames a = Generate(SmallRequest(11));
  const VideoFrames b = Generate(SmallRequest(11));
  const VideoFrames c = Generate(SmallRequest(12));
  ASSERT_EQ(a.num_frames, 5);
  ASSERT_EQ(a.height, 64);
  ASSERT_EQ(a.width, 64);
  ASSERT_EQ(a.rgb.size(), 5u * 64 * 64 * 3);
  EXPECT_EQ(a.rgb, b.rgb);
  ASSERT_EQ(c.rgb.size(), a.rgb.size());
  EXPECT_GT(MaxAbsDiff(a, c), 10);
  // Not a constant image.
  EXPECT_NE(*std::min_element(a.rgb.begin(), a.rgb.end()),
            *std::max_element(a.rgb.begin(), a.rgb.end()));
}

TEST_F(PipelineTest, BatchedStepEqualsSequentialSteps) {
  GenerationRequest r1 = SmallRequest(21);
  GenerationRequest r2 = SmallRequest(22);
  r2.prompt = "a lighthouse at dusk";
  r2.guidance_scale = 3.0f;
  r2.sampler = SamplerKind::kUniPC;
  r2.sparsity.mode = AttentionMode::kHybrid;
  r2.sparsity.topk = 0.5f;
  r2.sparsity.topp = 0.5f;
  r2.sparsity.dense_steps = 1;

  auto s1 = MustStart(r1), s2 = MustStart(r2);
  std::vector<StepStats> seq1 = Denoise(*s1), seq2 = Denoise(*s2);

  auto b1 = MustStart(r1), b2 = MustStart(r2);
  ASSERT_EQ(b1->BatchKey(), b2->BatchKey());
  std::vector<StepStats> batched;
  while (!b1->denoise_done()) {
    GenerationJob* batch[] = {b1.get(), b2.get()};
    ASSERT_TRUE(pipeline_->Step(batch, &batched).ok());
  }
  ASSERT_EQ(batched.size(), 2u * 3u);
  for (int step = 0; step < 3; ++step) {
    EXPECT_EQ(batched[2 * step].step, step);
    EXPECT_NEAR(batched[2 * step].achieved_sparsity, seq1[step].achieved_sparsity, 1e-6);
    EXPECT_NEAR(batched[2 * step + 1].achieved_sparsity, seq2[step].achieved_sparsity, 1e-6);
  }
  auto f_s1 = pipeline_->Decode(*s1), f_b1 = pipeline_->Decode(*b1);
  auto f_s2 = pipeline_->Decode(*s2), f_b2 = pipeline_->Decode(*b2);
  ASSERT_TRUE(f_s1.ok() && f_b1.ok() && f_s2.ok() && f_b2.ok());
  // Batched GEMMs may round differently in the last bit; frames agree to one
  // level.
  EXPECT_LE(MaxAbsDiff(*f_s1, *f_b1), 1);
  EXPECT_LE(MaxAbsDiff(*f_s2, *f_b2), 1);
  EXPECT_GT(MaxAbsDiff(*f_s1, *f_s2), 10);
}

TEST_F(PipelineTest, SparseModeReportsSparsityDenseReportsZero) {
  GenerationRequest dense = SmallRequest(31);
  dense.width = dense.height = 128;  // 2 x 8 x 8 = 128 tokens = 8 blocks
  GenerationRequest sparse = dense;
  sparse.sparsity.mode = AttentionMode::kTopK;
  sparse.sparsity.topk = 0.25f;
  sparse.sparsity.dense_steps = 1;
  auto dj = MustStart(dense), sj = MustStart(sparse);
  for (const StepStats& s : Denoise(*dj)) EXPECT_EQ(s.achieved_sparsity, 0.0f);
  std::vector<StepStats> stats = Denoise(*sj);
  ASSERT_EQ(stats.size(), 3u);
  EXPECT_EQ(stats[0].achieved_sparsity, 0.0f);  // dense_steps = 1
  EXPECT_NEAR(stats[1].achieved_sparsity, 0.75f, 1e-5);
  EXPECT_NEAR(stats[2].achieved_sparsity, 0.75f, 1e-5);
  EXPECT_GT(stats[1].seconds, 0.0);
}

TEST_F(PipelineTest, StepReportsAttentionTimeWithinStepTime) {
  auto job = MustStart(SmallRequest(41));
  std::vector<StepStats> stats = Denoise(*job);
  ASSERT_FALSE(stats.empty());
  for (const StepStats& s : stats) {
    EXPECT_GT(s.attention_seconds, 0.0);
    // The step also runs the text cross-attention, FFNs and the sampler outside SelfAttention.
    EXPECT_LT(s.attention_seconds, s.seconds);
  }
  // The timer is only active inside Step(): a direct call afterwards records nothing.
  EXPECT_EQ(AttentionTimer::Current(), nullptr);
}

TEST_F(PipelineTest, StepAndDecodeCheckJobState) {
  auto job = MustStart(SmallRequest(41));
  EXPECT_EQ(pipeline_->Decode(*job).status().code(), absl::StatusCode::kFailedPrecondition);
  GenerationRequest other = SmallRequest(42);
  other.width = 128;
  auto job2 = MustStart(other);
  std::vector<StepStats> stats;
  GenerationJob* mixed[] = {job.get(), job2.get()};
  EXPECT_EQ(pipeline_->Step(mixed, &stats).code(), absl::StatusCode::kInvalidArgument);
  Denoise(*job);
  GenerationJob* done[] = {job.get()};
  EXPECT_EQ(pipeline_->Step(done, &stats).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_GT(job->state_bytes(), 0);
}

TEST(PipelineDtypeTest, Bfloat16RunsAndStaysCloseToFloat32) {
  PipelineConfig config;
  config.dtype = "bfloat16";
  auto bf16 = Pipeline::Create(config);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ((*bf16)->model().dtype, "bfloat16");
  auto fp32 = Pipeline::Create(PipelineConfig());
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  GenerationRequest r;
  r.prompt = "a paper boat on a puddle";
  r.width = r.height = 64;
  r.num_frames = 5;
  r.num_steps = 2;
  r.sparsity.mode = AttentionMode::kHybrid;
  std::vector<VideoFrames> videos;
  for (Pipeline* p : {bf16->get(), fp32->get()}) {
    auto job = p->Start(r);
    ASSERT_TRUE(job.ok()) << job.status();
    std::vector<StepStats> stats;
    while (!(*job)->denoise_done()) {
      GenerationJob* batch[] = {job->get()};
      ASSERT_TRUE(p->Step(batch, &stats).ok());
    }
    auto frames = p->Decode(**job);
    ASSERT_TRUE(frames.ok()) << frames.status();
    videos.push_back(*frames);
  }
  ASSERT_EQ(videos[0].rgb.size(), videos[1].rgb.size());
  double mean_abs = 0;
  for (size_t i = 0; i < videos[0].rgb.size(); ++i) {
    mean_abs += std::abs(videos[0].rgb[i] - videos[1].rgb[i]);
  }
  mean_abs /= videos[0].rgb.size();
  EXPECT_LT(mean_abs, 8.0);  // same weights and noise; bf16 rounding only
}

TEST_F(PipelineTest, WarmupRuns) { EXPECT_TRUE(pipeline_->Warmup().ok()); }

// The issue's default request: 256x256, 17 frames, 4 steps, CFG. Records its
// wall time.
TEST(PipelineDefaultRequestTest, EndToEndWallTime) {
  auto pipeline = Pipeline::Create(PipelineConfig());
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  for (AttentionMode mode : {AttentionMode::kDense, AttentionMode::kHybrid}) {
    GenerationRequest r;
    r.prompt = "a sailing boat on a calm sea at sunrise";
    r.sparsity.mode = mode;
    const auto start = std::chrono::steady_clock::now();
    auto job = (*pipeline)->Start(r);
    ASSERT_TRUE(job.ok()) << job.status();
    std::vector<StepStats> stats;
    while (!(*job)->denoise_done()) {
      GenerationJob* batch[] = {job->get()};
      ASSERT_TRUE((*pipeline)->Step(batch, &stats).ok());
    }
    const auto denoised = std::chrono::steady_clock::now();
    auto frames = (*pipeline)->Decode(**job);
    ASSERT_TRUE(frames.ok()) << frames.status();
    const auto end = std::chrono::steady_clock::now();
    EXPECT_EQ(frames->num_frames, 17);
    EXPECT_EQ(frames->width, 256);
    const double total = std::chrono::duration<double>(end - start).count();
    const double denoise = std::chrono::duration<double>(denoised - start).count();
    ::testing::Test::RecordProperty(std::string(ToString(mode)) + "_seconds",
                                    std::to_string(total));
    std::printf(
        "default request (%s): %.2f s total, %.2f s text+denoise, %.2f "
        "s decode\n",
        ToString(mode), total, denoise, total - denoise);
    EXPECT_LT(total, 60.0);
  }
}

}  // namespace
}  // namespace sparge::engine
