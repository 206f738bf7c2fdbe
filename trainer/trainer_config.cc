#include "trainer/trainer_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "server/internal/range_checks.h"
#include "server/internal/yaml_config.h"

namespace sparge::trainer {
namespace {

using server::internal::CheckFloatInRange;
using server::internal::CheckFourKPlusOne;
using server::internal::CheckIntInRange;
using server::internal::CheckMultipleInRange;
using server::internal::YamlParseContext;
using server::internal::YamlSection;

absl::StatusOr<engine::AttentionMode> ParseMode(absl::string_view name) {
  for (engine::AttentionMode mode :
       {engine::AttentionMode::kDense, engine::AttentionMode::kTopK, engine::AttentionMode::kTopP,
        engine::AttentionMode::kHybrid}) {
    if (absl::EqualsIgnoreCase(name, engine::ToString(mode))) return mode;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("sparsity.mode: must be dense, topk, topp or hybrid, got '", name, "'"));
}

absl::StatusOr<LossKind> ParseLoss(absl::string_view name) {
  if (name == "distill") return LossKind::kDistill;
  if (name == "flow") return LossKind::kFlow;
  return absl::InvalidArgumentError(
      absl::StrCat("training.loss: must be distill or flow, got '", name, "'"));
}

absl::StatusOr<LrSchedule> ParseSchedule(absl::string_view name) {
  if (name == "constant") return LrSchedule::kConstant;
  if (name == "cosine") return LrSchedule::kCosine;
  return absl::InvalidArgumentError(
      absl::StrCat("optimizer.schedule: must be constant or cosine, got '", name, "'"));
}

absl::StatusOr<SigmaSamplerKind> ParseSigmaSampler(absl::string_view name) {
  if (name == "logit_normal") return SigmaSamplerKind::kLogitNormal;
  if (name == "uniform") return SigmaSamplerKind::kUniform;
  return absl::InvalidArgumentError(absl::StrCat(
      "training.sigma_sampler: must be logit_normal or uniform, got '", name, "'"));
}

void ReadConfig(const YAML::Node& root, YamlParseContext* ctx, TrainerConfig* c) {
  YamlSection top(root, "", ctx);
  top.Read("model", &c->model);
  top.Read("output_dir", &c->output_dir);
  top.Read("device", &c->device);
  top.Read("dtype", &c->dtype);
  top.Read("seed", &c->seed);
  top.Read("weight_seed", &c->weight_seed);

  YamlSection data = top.Sub("data");
  data.Read("prompts", &c->data.prompts);
  data.Read("latents_dir", &c->data.latents_dir);
  data.Read("width", &c->data.width);
  data.Read("height", &c->data.height);
  data.Read("num_frames", &c->data.num_frames);
  data.Read("teacher_steps", &c->data.teacher_steps);
  data.Read("guidance_scale", &c->data.guidance_scale);
  data.Read("shift", &c->data.shift);
  data.Read("negative_prompt", &c->data.negative_prompt);
  data.Read("uncond_prob", &c->data.uncond_prob);
  data.Finish();

  YamlSection sparsity = top.Sub("sparsity");
  sparsity.ReadEnum("mode", &c->sparsity.mode, ParseMode);
  sparsity.Read("topk", &c->sparsity.topk);
  sparsity.Read("topp", &c->sparsity.topp);
  sparsity.Read("block_q", &c->sparsity.block_q);
  sparsity.Read("block_k", &c->sparsity.block_k);
  sparsity.Finish();

  YamlSection training = top.Sub("training");
  training.ReadEnum("loss", &c->training.loss, ParseLoss);
  training.Read("max_steps", &c->training.max_steps);
  training.Read("batch_size", &c->training.batch_size);
  training.Read("grad_accumulation", &c->training.grad_accumulation);
  training.ReadEnum("sigma_sampler", &c->training.sigma_sampler, ParseSigmaSampler);
  training.Read("sigma_mean", &c->training.sigma_mean);
  training.Read("sigma_std", &c->training.sigma_std);
  training.Read("sigma_shift", &c->training.sigma_shift);
  training.Read("activation_checkpointing", &c->training.activation_checkpointing);
  training.Finish();

  YamlSection opt = top.Sub("optimizer");
  opt.Read("lr", &c->optimizer.lr);
  opt.Read("weight_decay", &c->optimizer.weight_decay);
  opt.Read("beta1", &c->optimizer.beta1);
  opt.Read("beta2", &c->optimizer.beta2);
  opt.Read("eps", &c->optimizer.eps);
  opt.Read("warmup_steps", &c->optimizer.warmup_steps);
  opt.ReadEnum("schedule", &c->optimizer.schedule, ParseSchedule);
  opt.Read("min_lr_ratio", &c->optimizer.min_lr_ratio);
  opt.Read("max_grad_norm", &c->optimizer.max_grad_norm);
  opt.Finish();

  YamlSection ckpt = top.Sub("checkpoint");
  ckpt.Read("every_steps", &c->checkpoint.every_steps);
  ckpt.Read("keep", &c->checkpoint.keep);
  ckpt.Read("resume", &c->checkpoint.resume);
  ckpt.Finish();

  YamlSection logging = top.Sub("logging");
  logging.Read("every_steps", &c->log_every_steps);
  logging.Read("eval_every_steps", &c->eval_every_steps);
  logging.Read("eval_samples", &c->eval_samples);
  logging.Finish();
  top.Finish();
}

}  // namespace

const char* ToString(LossKind kind) { return kind == LossKind::kDistill ? "distill" : "flow"; }
const char* ToString(SigmaSamplerKind kind) {
  return kind == SigmaSamplerKind::kLogitNormal ? "logit_normal" : "uniform";
}

double LearningRate(const OptimizerConfig& o, int step, int max_steps) {
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step + 1) / o.warmup_steps;
  if (o.schedule == LrSchedule::kConstant || max_steps <= o.warmup_steps) return o.lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - o.warmup_steps) / (max_steps - o.warmup_steps));
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * cosine);
}

absl::Status TrainerConfig::Validate() const {
  if (model.empty()) return absl::InvalidArgumentError("model: must not be empty");
  if (output_dir.empty()) return absl::InvalidArgumentError("output_dir: must not be empty");
  if (dtype != "float32" && dtype != "bfloat16") {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype: must be float32 or bfloat16, got '", dtype, "'"));
  }
  if (data.prompts.empty()) {
    return absl::InvalidArgumentError(
        "data.prompts: must name a prompts file (one prompt per line)");
  }
  SPARGE_RETURN_IF_ERROR(CheckMultipleInRange("data.width", data.width, 16, 16, 4096));
  SPARGE_RETURN_IF_ERROR(CheckMultipleInRange("data.height", data.height, 16, 16, 4096));
  SPARGE_RETURN_IF_ERROR(CheckFourKPlusOne("data.num_frames", data.num_frames, 1, 321));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("data.teacher_steps", data.teacher_steps, 1, 1000));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("data.guidance_scale", data.guidance_scale, 0.0, 100.0));
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("data.shift", data.shift, 0.0, 100.0, true));
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("data.uncond_prob", data.uncond_prob, 0.0, 1.0));
  if (sparsity.mode == engine::AttentionMode::kTopK ||
      sparsity.mode == engine::AttentionMode::kHybrid) {
    SPARGE_RETURN_IF_ERROR(CheckFloatInRange("sparsity.topk", sparsity.topk, 0.0, 1.0, true));
  }
  if (sparsity.mode == engine::AttentionMode::kTopP ||
      sparsity.mode == engine::AttentionMode::kHybrid) {
    SPARGE_RETURN_IF_ERROR(CheckFloatInRange("sparsity.topp", sparsity.topp, 0.0, 1.0, true));
  }
  SPARGE_RETURN_IF_ERROR(CheckMultipleInRange("sparsity.block_q", sparsity.block_q, 16, 16, 1024));
  SPARGE_RETURN_IF_ERROR(CheckMultipleInRange("sparsity.block_k", sparsity.block_k, 16, 16, 1024));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("training.max_steps", training.max_steps, 1, 100000000));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("training.batch_size", training.batch_size, 1, 1024));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("training.grad_accumulation", training.grad_accumulation, 1, 1024));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("training.sigma_mean", training.sigma_mean, -10.0, 10.0));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("training.sigma_std", training.sigma_std, 0.0, 10.0, true));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("training.sigma_shift", training.sigma_shift, 0.0, 100.0, true));
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("optimizer.lr", optimizer.lr, 0.0, 1.0, true));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("optimizer.weight_decay", optimizer.weight_decay, 0.0, 1.0));
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("optimizer.beta1", optimizer.beta1, 0.0, 1.0));
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("optimizer.beta2", optimizer.beta2, 0.0, 1.0));
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("optimizer.eps", optimizer.eps, 0.0, 1.0, true));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("optimizer.warmup_steps", optimizer.warmup_steps, 0, 100000000));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("optimizer.min_lr_ratio", optimizer.min_lr_ratio, 0.0, 1.0));
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("optimizer.max_grad_norm", optimizer.max_grad_norm, 0.0, 1e9));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("checkpoint.every_steps", checkpoint.every_steps, 0, 100000000));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("checkpoint.keep", checkpoint.keep, 0, 1000000));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("logging.every_steps", log_every_steps, 1, 100000000));
  SPARGE_RETURN_IF_ERROR(
      CheckIntInRange("logging.eval_every_steps", eval_every_steps, 0, 100000000));
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("logging.eval_samples", eval_samples, 1, 100000));
  return absl::OkStatus();
}

absl::StatusOr<TrainerConfig> ParseTrainerConfig(absl::string_view yaml_text,
                                                 absl::string_view source_name) {
  TrainerConfig config;
  SPARGE_RETURN_IF_ERROR(server::internal::ParseYamlConfig(
      yaml_text, source_name,
      [&config](const YAML::Node& root, YamlParseContext* ctx) { ReadConfig(root, ctx, &config); },
      [&config] { return config.Validate(); }));
  return config;
}

absl::StatusOr<TrainerConfig> LoadTrainerConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read config file ", path));
  std::stringstream text;
  text << in.rdbuf();
  return ParseTrainerConfig(text.str(), path);
}

std::string TrainingIdentity(const TrainerConfig& c) {
  return absl::StrCat(
      "model=", c.model, " dtype=", c.dtype, " seed=", c.seed, " weight_seed=", c.weight_seed,
      " prompts=", c.data.prompts, " latents_dir=", c.data.latents_dir, " size=", c.data.width,
      "x", c.data.height, "x", c.data.num_frames, " teacher_steps=", c.data.teacher_steps,
      " guidance=", c.data.guidance_scale, " mode=", engine::ToString(c.sparsity.mode),
      " topk=", c.sparsity.topk, " topp=", c.sparsity.topp, " blocks=", c.sparsity.block_q, "x",
      c.sparsity.block_k, " loss=", ToString(c.training.loss),
      " batch=", c.training.batch_size, "x", c.training.grad_accumulation);
}

}  // namespace sparge::trainer
