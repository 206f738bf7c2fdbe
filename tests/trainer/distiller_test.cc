// sparge-train's core on the CPU with the tiny model: config parsing (defaults equal the shipped
// config/trainer.yaml, errors name field and line), activation checkpointing gives the same
// gradients, a dense student equals its teacher (zero loss), distillation lowers the held-out loss
// of a sparse student, a resumed run continues bit for bit, and a checkpoint loads as a model.
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "engine/attention/sparse_attention.h"
#include "engine/models/activation_checkpoint.h"
#include "engine/models/model_loader.h"
#include "engine/models/wan_dit.h"
#include "gtest/gtest.h"
#include "server/job_files.h"
#include "trainer/distiller.h"
#include "trainer/trainer_config.h"

namespace sparge::trainer {
namespace {

std::string SourceDir() {
  const char* dir = std::getenv("SPARGE_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

class TempDir {
 public:
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/sparge-train-test-XXXXXX");
    path_ = ::mkdtemp(tmpl.data());
  }
  // POSIX, not std::filesystem: libtorch.so exports std::filesystem symbols that crash when called.
  ~TempDir() { (void)server::RemoveTree(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(TrainerConfigTest, ShippedFileHoldsTheDefaults) {
  const std::string text = absl::StrReplaceAll(
      ReadFile(SourceDir() + "/config/trainer.yaml"), {{"prompts: \"\"", "prompts: p.txt"}});
  absl::StatusOr<TrainerConfig> parsed = ParseTrainerConfig(text, "trainer.yaml");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  TrainerConfig defaults;
  defaults.data.prompts = "p.txt";
  EXPECT_EQ(TrainingIdentity(*parsed), TrainingIdentity(defaults));
  EXPECT_EQ(parsed->output_dir, defaults.output_dir);
  EXPECT_EQ(parsed->device, defaults.device);
  EXPECT_EQ(parsed->data.uncond_prob, defaults.data.uncond_prob);
  EXPECT_EQ(parsed->data.shift, defaults.data.shift);
  EXPECT_EQ(parsed->training.max_steps, defaults.training.max_steps);
  EXPECT_EQ(parsed->training.sigma_sampler, defaults.training.sigma_sampler);
  EXPECT_EQ(parsed->training.sigma_shift, defaults.training.sigma_shift);
  EXPECT_EQ(parsed->training.activation_checkpointing, defaults.training.activation_checkpointing);
  EXPECT_EQ(parsed->optimizer.lr, defaults.optimizer.lr);
  EXPECT_EQ(parsed->optimizer.weight_decay, defaults.optimizer.weight_decay);
  EXPECT_EQ(parsed->optimizer.warmup_steps, defaults.optimizer.warmup_steps);
  EXPECT_EQ(parsed->optimizer.schedule, defaults.optimizer.schedule);
  EXPECT_EQ(parsed->optimizer.min_lr_ratio, defaults.optimizer.min_lr_ratio);
  EXPECT_EQ(parsed->optimizer.max_grad_norm, defaults.optimizer.max_grad_norm);
  EXPECT_EQ(parsed->checkpoint.every_steps, defaults.checkpoint.every_steps);
  EXPECT_EQ(parsed->checkpoint.keep, defaults.checkpoint.keep);
  EXPECT_EQ(parsed->log_every_steps, defaults.log_every_steps);
  EXPECT_EQ(parsed->eval_every_steps, defaults.eval_every_steps);
  EXPECT_EQ(parsed->eval_samples, defaults.eval_samples);
}

TEST(TrainerConfigTest, ErrorsNameTheFieldAndLine) {
  auto error = [](const std::string& yaml) {
    absl::StatusOr<TrainerConfig> c = ParseTrainerConfig(yaml, "t.yaml");
    EXPECT_FALSE(c.ok());
    return std::string(c.status().message());
  };
  EXPECT_EQ(error("data:\n  prompts: p\ntraining:\n  lr: 1\n"),
            "t.yaml:4:3: training.lr: unknown key 'lr' (known keys here: loss, max_steps, "
            "batch_size, grad_accumulation, sigma_sampler, sigma_mean, sigma_std, sigma_shift, "
            "activation_checkpointing)");
  EXPECT_EQ(error("data:\n  prompts: p\nsparsity:\n  topk: 0\n"),
            "t.yaml:4:3: sparsity.topk: must be in (0, 1], got 0");
  EXPECT_EQ(error("data:\n  prompts: p\n  num_frames: 8\n"),
            "t.yaml:3:3: data.num_frames: must be 4k+1 in [1, 321], got 8");
  EXPECT_EQ(error("data:\n  prompts: p\ntraining:\n  loss: l2\n"),
            "t.yaml:4:9: training.loss: must be distill or flow, got 'l2'");
  EXPECT_EQ(error("model: tiny\n"),
            "t.yaml: data.prompts: must name a prompts file (one prompt per line)");
  EXPECT_EQ(error("data:\n  prompts: p\ndtype: float16\n"),
            "t.yaml:3:1: dtype: must be float32 or bfloat16, got 'float16'");
}

TEST(TrainerConfigTest, LearningRateSchedules) {
  OptimizerConfig o;
  o.lr = 1e-4;
  o.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(LearningRate(o, 0, 100), 1e-5);
  EXPECT_DOUBLE_EQ(LearningRate(o, 9, 100), 1e-4);
  EXPECT_DOUBLE_EQ(LearningRate(o, 99, 100), 1e-4);  // constant
  o.schedule = LrSchedule::kCosine;
  o.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(LearningRate(o, 10, 100), 1e-4);
  EXPECT_NEAR(LearningRate(o, 55, 100), 0.55e-4, 1e-12);  // half way: the mean of lr and min
  EXPECT_NEAR(LearningRate(o, 100, 100), 1e-5, 1e-12);
  EXPECT_GT(LearningRate(o, 30, 100), LearningRate(o, 31, 100));
  o.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(LearningRate(o, 0, 100), 1e-4);
  EXPECT_EQ(ParseTrainerConfig("data:\n  prompts: p\noptimizer:\n  schedule: linear\n", "t")
                .status()
                .message(),
            "t:4:13: optimizer.schedule: must be constant or cosine, got 'linear'");
}

// The tiny model's DiT with random inputs of a 128-token video (8 x 8 patches x 2 latent frames).
struct TinyInputs {
  at::Tensor latents = at::randn({2, 16, 2, 16, 16});
  at::Tensor t = at::tensor({300.0f, 800.0f});
  at::Tensor context = at::randn({2, 12, 64});
};

std::map<std::string, at::Tensor> Gradients(bool checkpointing, const TinyInputs& in,
                                            engine::AttentionMode mode) {
  engine::WanDiT dit(engine::TinyWanConfig().dit, 16, 16);
  dit->InitializeWeights(7);
  dit->ToInference(torch::kCPU, torch::kFloat);
  dit->SetActivationCheckpointing(checkpointing);
  engine::AttentionKnobs knobs;
  knobs.mode = mode;
  knobs.topk = 0.25f;
  knobs.topp = 0.5f;
  engine::DiTOutput out = dit->Forward(in.latents, in.t, in.context, {knobs, knobs});
  out.velocity.square().mean().backward();
  std::map<std::string, at::Tensor> grads;
  for (const auto& p : dit->named_parameters()) grads[p.key()] = p.value().grad().clone();
  return grads;
}

TEST(ActivationCheckpointTest, SameGradientsAsTheStoredGraph) {
  torch::manual_seed(3);
  TinyInputs in;
  for (engine::AttentionMode mode : {engine::AttentionMode::kDense, engine::AttentionMode::kHybrid}) {
    const auto stored = Gradients(false, in, mode);
    const auto recomputed = Gradients(true, in, mode);
    ASSERT_EQ(stored.size(), recomputed.size());
    for (const auto& [name, g] : stored) {
      ASSERT_TRUE(g.defined()) << name;
      ASSERT_TRUE(recomputed.at(name).defined()) << name;
      EXPECT_TRUE(at::allclose(g, recomputed.at(name), 1e-5, 1e-7))
          << name << " differs by " << (g - recomputed.at(name)).abs().max().item<float>();
    }
  }
}

TEST(ActivationCheckpointTest, InputGradientsFlowThroughTheRecomputation) {
  at::Tensor w = torch::randn({4, 4}, torch::requires_grad());
  at::Tensor x = torch::randn({3, 4}, torch::requires_grad());
  auto fn = [w](const std::vector<at::Tensor>& in) { return at::tanh(in[0].matmul(w)); };
  at::Tensor y = engine::CheckpointedCall(fn, {x});
  y.sum().backward();
  at::Tensor gx = x.grad().clone(), gw = w.grad().clone();
  x.mutable_grad().reset();
  w.mutable_grad().reset();
  fn({x}).sum().backward();
  EXPECT_TRUE(at::allclose(gx, x.grad()));
  EXPECT_TRUE(at::allclose(gw, w.grad()));
}

// A tiny-model run in `dir`: 4 prompts at 128x128x5 (128 DiT tokens), 2-step teacher sampling.
TrainerConfig TinyConfig(const std::string& dir) {
  std::ofstream(dir + "/prompts.txt") << "# prompts\na red fox in snow\n\nwaves on a beach\n"
                                         "a city at night\na bowl of fruit\n";
  TrainerConfig c;
  c.model = "tiny";
  c.output_dir = dir + "/out";
  c.data.prompts = dir + "/prompts.txt";
  c.data.width = 128;
  c.data.height = 128;
  c.data.num_frames = 5;
  c.data.teacher_steps = 2;
  c.data.negative_prompt = "blurry";
  c.data.uncond_prob = 0.25f;
  c.sparsity.mode = engine::AttentionMode::kHybrid;
  c.sparsity.topk = 0.25f;
  c.sparsity.topp = 0.5f;
  c.sparsity.block_q = 16;
  c.sparsity.block_k = 16;
  c.training.batch_size = 2;
  c.training.max_steps = 40;
  c.optimizer.lr = 3e-4;
  c.optimizer.warmup_steps = 2;
  c.optimizer.weight_decay = 0.0;
  c.checkpoint.every_steps = 0;
  c.log_every_steps = 10;
  c.eval_every_steps = 0;
  return c;
}

TEST(DistillerTest, DenseStudentEqualsItsTeacher) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.sparsity.mode = engine::AttentionMode::kDense;
  auto d = Distiller::Create(c, nullptr);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_TRUE((*d)->PrepareData().ok());
  EXPECT_EQ((*d)->num_prompts(), 4);
  absl::StatusOr<double> loss = (*d)->EvalLoss(4);
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_EQ(*loss, 0.0);
  // The flow-matching loss of the same model is far from zero.
  c.training.loss = LossKind::kFlow;
  auto flow = Distiller::Create(c, nullptr);
  ASSERT_TRUE(flow.ok());
  ASSERT_TRUE((*flow)->PrepareData().ok());
  EXPECT_GT(*(*flow)->EvalLoss(4), 0.1);
}

TEST(DistillerTest, DistillationLowersTheSparseStudentsLoss) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.sparsity.topk = 0.125f;  // 1 of 8 key blocks: a student far from its teacher
  c.sparsity.topp = 0.1f;
  c.optimizer.lr = 1e-4;
  auto d = Distiller::Create(c, nullptr);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_TRUE((*d)->PrepareData().ok());
  const double before = *(*d)->EvalLoss(8);
  EXPECT_GT(before, 0.0);
  StepStats last;
  for (int i = 0; i < 40; ++i) {
    absl::StatusOr<StepStats> s = (*d)->TrainStep();
    ASSERT_TRUE(s.ok()) << s.status();
    last = *s;
  }
  const double after = *(*d)->EvalLoss(8);
  EXPECT_EQ(last.step, 40);
  EXPECT_NEAR(last.sparsity, 0.875, 1e-6);  // 1 of 8 key blocks kept
  EXPECT_GT(last.grad_norm, 0.0);
  EXPECT_EQ(last.samples, 2);
  // The teacher is frozen: its parameters have no gradient and did not move.
  for (const auto& p : (*d)->teacher().parameters()) EXPECT_FALSE(p.grad().defined());
  // Measured: 0.0235 -> 0.0170 on held-out samples (lr 1e-4, 40 steps of 2 samples).
  EXPECT_LT(after, 0.85 * before) << "before " << before << " after " << after;
}

// Trains `c` straight to c.training.max_steps in c.output_dir, and again in <output_dir>2 in two
// invocations (half the steps, then a resumed second half); expects the same weights. Returns the
// straight run.
std::unique_ptr<Distiller> ExpectResumeIsExact(const TrainerConfig& c) {
  auto straight = Distiller::Create(c, nullptr);
  EXPECT_TRUE(straight.ok()) << straight.status();
  if (!straight.ok()) return nullptr;
  EXPECT_TRUE((*straight)->PrepareData().ok());
  EXPECT_TRUE((*straight)->Run(nullptr).ok());

  TrainerConfig c2 = c;
  c2.output_dir = c.output_dir + "2";
  c2.training.max_steps = c.training.max_steps / 2;
  {
    auto first = Distiller::Create(c2, nullptr);
    EXPECT_TRUE(first.ok() && (*first)->PrepareData().ok() && (*first)->Run(nullptr).ok());
  }
  c2.training.max_steps = c.training.max_steps;
  auto second = Distiller::Create(c2, nullptr);
  EXPECT_TRUE(second.ok() && (*second)->PrepareData().ok());
  if (!second.ok()) return nullptr;
  absl::StatusOr<int> resumed = (*second)->Resume();
  EXPECT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(resumed.value_or(-1), c.training.max_steps / 2);
  EXPECT_TRUE((*second)->Run(nullptr).ok());
  auto a = (*straight)->student().named_parameters();
  auto b = (*second)->student().named_parameters();
  for (const auto& p : a) EXPECT_TRUE(at::equal(p.value(), b[p.key()])) << p.key();
  return std::move(*straight);
}

TEST(DistillerTest, ResumedRunContinuesExactly) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.training.max_steps = 6;
  ExpectResumeIsExact(c);
  ASSERT_TRUE(server::PathExists(c.output_dir + "/step-0000006/transformer/config.json"));
  // The log has one record per logging interval and at the end.
  std::ifstream log(c.output_dir + "2/train_log.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(log, line)) ++lines;
  EXPECT_EQ(lines, 2);  // step 3 (end of the first run), step 6
}

// bfloat16: fp32 master weights drive bf16 working copies; a resumed run restores the masters
// (trainer_state/master.safetensors), not the rounded weights, and continues exactly.
TEST(DistillerTest, Bfloat16RunKeepsFp32MastersAcrossResume) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.dtype = "bfloat16";
  c.training.max_steps = 4;
  std::unique_ptr<Distiller> straight = ExpectResumeIsExact(c);
  ASSERT_NE(straight, nullptr);
  auto a = straight->student().named_parameters();
  EXPECT_EQ(a["blocks.0.attn1.to_q.weight"].scalar_type(), at::kBFloat16);
  // The masters hold more than the bf16 weights: at least one differs from its rounded copy.
  auto masters = engine::Checkpoint::Open(c.output_dir +
                                          "/step-0000004/trainer_state/master.safetensors");
  ASSERT_TRUE(masters.ok()) << masters.status();
  at::Tensor master = *(*masters)->Get("blocks.0.attn1.to_q.weight");
  EXPECT_EQ(master.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(master.to(at::kBFloat16), a["blocks.0.attn1.to_q.weight"]));
  EXPECT_FALSE(at::equal(master, master.to(at::kBFloat16).to(at::kFloat)));
}

TEST(DistillerTest, CheckpointLoadsAsAModel) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.training.max_steps = 2;
  c.checkpoint.every_steps = 1;
  c.checkpoint.keep = 1;
  auto d = Distiller::Create(c, nullptr);
  ASSERT_TRUE(d.ok());
  ASSERT_TRUE((*d)->PrepareData().ok());
  ASSERT_TRUE((*d)->Run(nullptr).ok());
  EXPECT_FALSE(server::PathExists(c.output_dir + "/step-0000001"));  // keep: 1
  const std::string dir2 = c.output_dir + "/step-0000002/transformer";
  absl::StatusOr<engine::WanDiT> loaded = engine::LoadDiT(dir2, torch::kCPU, torch::kFloat, 16, 16);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  torch::NoGradGuard no_grad;
  TinyInputs in;
  std::vector<engine::AttentionKnobs> dense(2);
  at::Tensor want = (*d)->student().Forward(in.latents, in.t, in.context, dense).velocity;
  at::Tensor got = (*loaded)->Forward(in.latents, in.t, in.context, dense).velocity;
  EXPECT_TRUE(at::equal(want, got));
}

TEST(DistillerTest, HeldOutLossIsLogged) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.training.max_steps = 2;
  c.eval_every_steps = 1;
  c.eval_samples = 3;
  auto d = Distiller::Create(c, nullptr);
  ASSERT_TRUE(d.ok());
  ASSERT_TRUE((*d)->PrepareData().ok());
  const double at_start = *(*d)->EvalLoss(3);
  ASSERT_TRUE((*d)->Run(nullptr).ok());
  std::ifstream log(c.output_dir + "/train_log.jsonl");
  std::string line;
  std::vector<std::string> evals;
  while (std::getline(log, line)) {
    if (line.find("eval_loss") != std::string::npos) evals.push_back(line);
  }
  ASSERT_EQ(evals.size(), 3u);  // steps 0, 1, 2
  EXPECT_EQ(evals[0].rfind("{\"step\": 0, \"eval_loss\": ", 0), 0u) << evals[0];
  EXPECT_NE(evals[0].find(absl::StrFormat("%.9g", at_start)), std::string::npos) << evals[0];
}

TEST(DistillerTest, BadLatentsAreRejectedUpFront) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.data.latents_dir = dir.path() + "/latents";
  ASSERT_TRUE(server::MakeDirectories(c.data.latents_dir).ok());
  ASSERT_TRUE(engine::WriteSafetensors(c.data.latents_dir + "/2.safetensors",
                                       {{"latents", at::zeros({16, 2, 8, 8})}})
                  .ok());
  auto d = Distiller::Create(c, nullptr);
  ASSERT_TRUE(d.ok());
  absl::Status s = (*d)->PrepareData();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("2.safetensors: \"latents\" has shape [16, 2, 8, 8], the data size "
                             "asks for [16, 2, 16, 16]"),
            std::string::npos)
      << s;
}

TEST(DistillerTest, MissingPromptsFileIsNotFound) {
  TempDir dir;
  TrainerConfig c = TinyConfig(dir.path());
  c.data.prompts = dir.path() + "/nope.txt";
  auto d = Distiller::Create(c, nullptr);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ((*d)->PrepareData().code(), absl::StatusCode::kNotFound);
}

// On a GPU the student's sparse self-attention trains through the CUDA kernels (the autograd op
// sparge::block_sparse_attention); its gradients must match the fp32 reference on the same mask.
TEST(TrainerGpuTest, SparseSelfAttentionGradientsMatchTheReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  ASSERT_EQ(engine::SparseAttentionBackendName(c10::kCUDA), "sparge-ops");
  torch::manual_seed(11);
  const int64_t B = 2, L = 1000, H = 2, D = 128;
  // Block-constant offsets keep the pooled scores far apart, so that rounding cannot flip a
  // selection between the two mask predictors.
  auto blocky = [&](int64_t block) {
    const int64_t n = (L + block - 1) / block;
    at::Tensor offsets = at::randn({B, n, 1, H, D}).expand({B, n, block, H, D}).reshape(
        {B, n * block, H, D});
    return (at::randn({B, L, H, D}) + 2.0 * offsets.narrow(1, 0, L)) * 0.3;
  };
  at::Tensor q = blocky(128), k = blocky(64), v = at::randn({B, L, H, D});
  at::Tensor go = at::randn({B, L, H, D});
  engine::AttentionKnobs knobs;
  knobs.mode = engine::AttentionMode::kHybrid;
  knobs.topk = 0.3f;
  knobs.topp = 0.6f;
  std::vector<engine::AttentionKnobs> all(B, knobs);
  auto grads = [&](const torch::Device& dev, at::ScalarType dtype, at::Tensor* sparsity) {
    at::Tensor qd = q.to(dev, dtype).requires_grad_(), kd = k.to(dev, dtype).requires_grad_(),
               vd = v.to(dev, dtype).requires_grad_();
    at::Tensor out = engine::SelfAttention(qd, kd, vd, all, 128, 64, sparsity);
    out.backward(go.to(dev, dtype));
    return std::vector<at::Tensor>{out.to(at::kCPU, at::kFloat), qd.grad().to(at::kCPU, at::kFloat),
                                   kd.grad().to(at::kCPU, at::kFloat),
                                   vd.grad().to(at::kCPU, at::kFloat)};
  };
  at::Tensor sparsity_gpu_t, sparsity_cpu_t;
  // The mask is predicted from bf16 inputs on the GPU: give the reference the same rounded inputs.
  q = q.to(at::kBFloat16).to(at::kFloat);
  k = k.to(at::kBFloat16).to(at::kFloat);
  v = v.to(at::kBFloat16).to(at::kFloat);
  const auto gpu = grads(torch::Device(torch::kCUDA), at::kBFloat16, &sparsity_gpu_t);
  const auto ref = grads(torch::Device(torch::kCPU), at::kFloat, &sparsity_cpu_t);
  ASSERT_TRUE(sparsity_gpu_t.is_cuda());
  const at::Tensor sparsity_gpu = sparsity_gpu_t.cpu(), sparsity_cpu = sparsity_cpu_t.cpu();
  ASSERT_EQ(sparsity_gpu.numel(), sparsity_cpu.numel());
  for (int64_t i = 0; i < sparsity_gpu.numel(); ++i) {
    EXPECT_NEAR(sparsity_gpu[i].item<float>(), sparsity_cpu[i].item<float>(), 1e-6)
        << "masks differ for element " << i;
    EXPECT_GT(sparsity_gpu[i].item<float>(), 0.2);
  }
  const char* names[] = {"out", "dq", "dk", "dv"};
  for (int i = 0; i < 4; ++i) {
    const double scale = ref[i].abs().max().item<double>();
    const double err = (gpu[i] - ref[i]).abs().max().item<double>();
    std::printf("%s: max abs error %.3g (scale %.3g)\n", names[i], err, scale);
    EXPECT_LT(err, 2e-2 * scale) << names[i];
  }
}

}  // namespace
}  // namespace sparge::trainer
