// sparge-train configuration: plain structs parsed from YAML (config/trainer.yaml documents every
// field and is the source of the defaults below), each range-checked by Validate() with
// INVALID_ARGUMENT "<field>: must be ..., got ...". Torch-free. Plain values; copy freely.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/pipeline.h"

namespace sparge::trainer {

enum class LossKind { kDistill = 0, kFlow = 1 };
enum class SigmaSamplerKind { kLogitNormal = 0, kUniform = 1 };
enum class LrSchedule { kConstant = 0, kCosine = 1 };
const char* ToString(LossKind kind);
const char* ToString(SigmaSamplerKind kind);

struct OptimizerConfig;
// Learning rate of optimizer step `step` (0-based): linear warm-up over warmup_steps, then the
// schedule until max_steps.
double LearningRate(const OptimizerConfig& o, int step, int max_steps);

struct DataConfig {
  std::string prompts;      // file of prompts, one per line
  std::string latents_dir;  // optional <index>.safetensors with "latents"
  int width = 832;
  int height = 480;
  int num_frames = 81;
  int teacher_steps = 30;
  float guidance_scale = 5.0f;
  float shift = 5.0f;
  std::string negative_prompt;
  // Fraction of training samples conditioned on the negative prompt instead of their own (keeps
  // the student faithful on the unconditional branch that classifier-free guidance uses).
  float uncond_prob = 0.1f;
};

struct SparsityConfig {
  engine::AttentionMode mode = engine::AttentionMode::kHybrid;
  float topk = 0.05f;
  float topp = 0.9f;
  int block_q = 128;
  int block_k = 128;  // 128: the fused backward kernel (config/trainer.yaml)
};

struct TrainingConfig {
  LossKind loss = LossKind::kDistill;
  int max_steps = 1000;
  int batch_size = 1;
  int grad_accumulation = 1;
  SigmaSamplerKind sigma_sampler = SigmaSamplerKind::kLogitNormal;
  float sigma_mean = 0.0f;
  float sigma_std = 1.0f;
  float sigma_shift = 3.0f;
  bool activation_checkpointing = true;
};

struct OptimizerConfig {
  double lr = 1e-5;
  double weight_decay = 0.01;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  int warmup_steps = 50;
  // After warm-up: constant, or cosine decay to min_lr_ratio * lr at training.max_steps.
  LrSchedule schedule = LrSchedule::kConstant;
  double min_lr_ratio = 0.1;
  double max_grad_norm = 1.0;
};

struct CheckpointConfig {
  int every_steps = 200;
  int keep = 3;
  bool resume = true;
};

struct TrainerConfig {
  std::string model = "tiny";
  std::string output_dir = "sparge-train-out";
  std::string device = "cpu";
  std::string dtype = "float32";
  uint64_t seed = 0;
  uint64_t weight_seed = 42;
  DataConfig data;
  SparsityConfig sparsity;
  TrainingConfig training;
  OptimizerConfig optimizer;
  CheckpointConfig checkpoint;
  int log_every_steps = 10;
  // Held-out loss (student vs teacher, or the flow target) on eval_samples fixed samples, at the
  // start and every eval_every_steps optimizer steps; 0 disables it.
  int eval_every_steps = 100;
  int eval_samples = 8;

  absl::Status Validate() const;
};

// From YAML text; source_name prefixes errors ("<source>:<line>:<col>: <field>: ...").
absl::StatusOr<TrainerConfig> ParseTrainerConfig(absl::string_view yaml_text,
                                                 absl::string_view source_name);
// From a file; NOT_FOUND when unreadable.
absl::StatusOr<TrainerConfig> LoadTrainerConfig(const std::string& path);

// The settings that define what is being trained (model, data, sparsity, loss, dtype, seed), as
// one line: a resumed run whose line differs warns that its checkpoint came from another setup.
std::string TrainingIdentity(const TrainerConfig& config);

}  // namespace sparge::trainer
