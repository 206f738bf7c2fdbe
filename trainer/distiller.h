// Velocity-distillation fine-tuning (SpargeAttention2 section 4, shared/design/SPARSE_ATTENTION.md
// section 4): a frozen dense teacher and a student with the same initial weights whose
// self-attention is block-sparse (the sparsity knobs of the config); per sample a clean latent x0,
// its text condition c, noise e and a training sigma give x_t = (1 - sigma) x0 + sigma e at
// timestep 1000 sigma, and the student learns mean (v_student(x_t) - v_teacher(x_t))^2 (or the
// plain flow-matching loss against e - x0, for comparison). AdamW with fp32 master weights under
// bf16, gradient accumulation, global-norm clipping, linear warm-up, data parallelism through a
// Communicator, and checkpoints that sparge-server can serve.
//
// Usage: auto d = Distiller::Create(config, comm); d->PrepareData(); d->Resume(); then
// d->TrainStep() until d->step() == max_steps (Run() does all of it with logging and saving).
// Not thread-safe: one thread owns a Distiller.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/models/model_config.h"
#include "engine/models/wan_dit.h"
#include "trainer/trainer_config.h"

namespace sparge::trainer {

class Communicator;

// What one optimizer step did (averaged over ranks where it matters).
struct StepStats {
  int step = 0;                 // optimizer steps done after this one
  double loss = 0.0;            // mean over the step's samples (all ranks)
  double grad_norm = 0.0;       // global L2 norm before clipping
  double lr = 0.0;              // learning rate used
  double sparsity = 0.0;        // student's achieved self-attention sparsity, mean over samples
  double mean_sigma = 0.0;      // of this rank's samples
  double seconds = 0.0;         // wall time of the step
  int64_t samples = 0;          // samples of the step, all ranks
  int64_t peak_memory_bytes = 0;  // peak allocated on the device since the last step (CUDA)
};

class Distiller {
 public:
  // Builds the text encoder, the teacher and the student on the configured device (for CUDA with
  // a multi-process run, the GPU of the communicator's local rank). comm may be null (one
  // process) and must outlive the Distiller.
  static absl::StatusOr<std::unique_ptr<Distiller>> Create(const TrainerConfig& config,
                                                           Communicator* comm);
  ~Distiller();

  // Reads the prompts, encodes them (then frees the text encoder) and makes every prompt's clean
  // latent available: from data.latents_dir, from the cache under output_dir/cache/, or generated
  // by the dense teacher (each rank generates its share; all then read the cache).
  absl::Status PrepareData();

  // Continues from output_dir's newest complete checkpoint when checkpoint.resume is set; returns
  // the optimizer step reached (0 for a fresh start).
  absl::StatusOr<int> Resume();

  // One optimizer step (grad_accumulation micro-batches of batch_size samples per rank).
  absl::StatusOr<StepStats> TrainStep();

  // Writes output_dir/step-NNNNNNN/ (rank 0; every rank must call it) and prunes old ones.
  // Returns the checkpoint directory.
  absl::StatusOr<std::string> SaveCheckpoint();

  // The training loop: steps until max_steps (or until *stop becomes true, then a checkpoint and
  // CANCELLED), logging every logging.every_steps to stderr and output_dir/train_log.jsonl, a
  // progress line on a terminal, checkpoints every checkpoint.every_steps and at the end.
  absl::Status Run(const std::atomic<bool>* stop);

  // Loss of the student against the teacher (distill) or the flow target on `count` fixed
  // evaluation samples (seeded apart from training), without gradients. With several ranks, each
  // evaluates every world_size-th sample and all get the mean (every rank must call it).
  absl::StatusOr<double> EvalLoss(int count);

  int step() const { return step_; }
  int num_prompts() const;
  engine::WanDiTImpl& student() { return *student_; }
  engine::WanDiTImpl& teacher() { return *teacher_; }
  const TrainerConfig& config() const { return config_; }
  torch::Device device() const { return device_; }

 private:
  struct Sample;
  Distiller(TrainerConfig config, Communicator* comm, torch::Device device,
            torch::ScalarType dtype);
  absl::Status Build();
  absl::StatusOr<at::Tensor> CleanLatent(int index) const;
  std::string CachePath(int index) const;
  absl::StatusOr<at::Tensor> GenerateLatent(int index);
  // The sample with global number g: prompt index, condition choice, noise and sigma, all a pure
  // function of (seed, g), so that resumed and multi-rank runs see the data a single run sees.
  absl::StatusOr<Sample> MakeSample(int64_t g, uint64_t stream) const;
  absl::StatusOr<double> SampleLoss(const std::vector<Sample>& batch, bool grad,
                                    double* sparsity);
  double LearningRate(int step) const;
  absl::Status LoadCheckpoint(const std::string& dir);
  absl::Status WriteTransformer(const std::string& dir) const;

  TrainerConfig config_;
  Communicator* comm_;
  torch::Device device_;
  torch::ScalarType dtype_;
  engine::WanModelConfig model_config_;
  std::string model_dir_;  // empty for the built-in models
  engine::WanDiT teacher_{nullptr};
  engine::WanDiT student_{nullptr};
  std::vector<std::string> prompts_;
  at::Tensor context_;   // [N, text_len, text_dim] on the CPU, in dtype
  at::Tensor negative_;  // [1, text_len, text_dim]
  std::vector<std::pair<std::string, at::Tensor>> params_;  // student's trainable parameters
  std::vector<at::Tensor> masters_;  // fp32 master copies (the parameter itself when fp32)
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  int step_ = 0;
  // Kept from PrepareData for the teacher's x0 generation.
  struct TextEncoderHolder;
  std::unique_ptr<TextEncoderHolder> text_;
};

}  // namespace sparge::trainer
