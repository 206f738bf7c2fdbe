// Flow-matching samplers for Wan2.1 (shared/design/WAN21.md section 5): sigma
// schedules, the FlowMatchEuler and UniPC (bh2, order 2, predict-x0) steppers
// with diffusers semantics, and classifier-free guidance. Usage: auto s =
// FlowSampler::Create(kind, steps, shift); then per step feed s->timestep() to
// the model and call x = s->Step(v, x). A FlowSampler is per-job state and not
// thread-safe; the free functions are pure.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "engine/pipeline.h"

namespace sparge::engine {

inline constexpr int kNumTrainTimesteps = 1000;

// Timestep shift: sigma' = s * sigma / (1 + (s - 1) * sigma).
double ShiftSigma(double sigma, double shift);

struct SigmaSchedule {
  std::vector<float> sigmas;     // num_steps + 1 values, decreasing, the last one 0
  std::vector<float> timesteps;  // num_steps model inputs t (float; integer-valued for UniPC)
};

// diffusers FlowMatchEulerDiscreteScheduler(shift) after
// set_timesteps(num_steps): the training table's range [1, shift(1/1000)]
// spaced linearly, then shifted a second time; t = 1000 sigma.
SigmaSchedule FlowMatchEulerSchedule(int num_steps, double shift);

// diffusers UniPCMultistepScheduler(use_flow_sigmas, flow_shift=shift,
// final_sigmas_type="zero"): sigma_i = shift(1 - alpha_{N-i}) with alpha =
// linspace(1, 1/1000, N + 1), so sigma_0 = shift(0.999); final sigma 0; t_i =
// trunc(1000 sigma_i) computed in float64.
SigmaSchedule UniPCFlowSchedule(int num_steps, double shift);

// Classifier-free guidance: uncond + scale * (cond - uncond).
at::Tensor CombineGuidance(const at::Tensor& cond, const at::Tensor& uncond, float scale);

// Per-job sampler state. Step() consumes the model's velocity prediction at the
// current sigma.
class FlowSampler {
 public:
  // num_steps >= 1, shift > 0 (callers validate).
  static std::unique_ptr<FlowSampler> Create(SamplerKind kind, int num_steps, double shift);
  virtual ~FlowSampler() = default;

  int num_steps() const { return static_cast<int>(schedule_.timesteps.size()); }
  int steps_done() const { return step_index_; }
  bool done() const { return step_index_ >= num_steps(); }
  // Model timestep and sigma of the next step.
  float timestep() const { return schedule_.timesteps[step_index_]; }
  float sigma() const { return schedule_.sigmas[step_index_]; }
  const SigmaSchedule& schedule() const { return schedule_; }

  // Returns the sample at the next sigma (float32) given the current sample and
  // the velocity.
  virtual at::Tensor Step(const at::Tensor& velocity, const at::Tensor& sample) = 0;

 protected:
  explicit FlowSampler(SigmaSchedule schedule) : schedule_(std::move(schedule)) {}
  SigmaSchedule schedule_;
  int step_index_ = 0;
};

// x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i.
class FlowMatchEulerSampler : public FlowSampler {
 public:
  FlowMatchEulerSampler(int num_steps, double shift);
  at::Tensor Step(const at::Tensor& velocity, const at::Tensor& sample) override;
};

// UniPC multistep (B(h) = expm1(-h), order 2, predictor + corrector on x0
// predictions, lower_order_final), as in diffusers UniPCMultistepScheduler with
// flow_prediction.
class UniPCSampler : public FlowSampler {
 public:
  UniPCSampler(int num_steps, double shift);
  at::Tensor Step(const at::Tensor& velocity, const at::Tensor& sample) override;

 private:
  // log(alpha) - log(sigma) for sigma in (0, 1).
  double Lambda(int index) const;
  at::Tensor Correct(const at::Tensor& m_now, const at::Tensor& sample) const;
  at::Tensor Predict(const at::Tensor& sample, int order) const;

  at::Tensor m_prev_;       // x0 prediction at step i-1
  at::Tensor m_prev2_;      // x0 prediction at step i-2
  at::Tensor last_sample_;  // corrected sample that entered the previous predictor
  int last_order_ = 0;      // order of the previous predictor
  int warm_steps_ = 0;      // predictions collected so far, capped at the solver order
};

}  // namespace sparge::engine
