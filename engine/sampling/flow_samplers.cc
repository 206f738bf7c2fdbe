#include "engine/sampling/flow_samplers.h"

#include <algorithm>
#include <cmath>

namespace sparge::engine {
namespace {

// numpy.linspace(start, stop, num) in float64, element for element: i * step +
// start, with the endpoint written exactly.
std::vector<double> NumpyLinspace(double start, double stop, int num) {
  std::vector<double> y(num);
  if (num == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / (num - 1);
  for (int i = 0; i < num; ++i) y[i] = static_cast<double>(i) * step + start;
  y[num - 1] = stop;
  return y;
}

// The shift map as torch evaluates it on a float32 tensor with Python-float
// scalars.
float ShiftSigmaFloat32(float sigma, double shift) {
  const float numerator = sigma * static_cast<float>(shift);
  const float denominator = 1.0f + sigma * static_cast<float>(shift - 1.0);
  return numerator / denominator;
}

}  // namespace

double ShiftSigma(double sigma, double shift) {
  return shift * sigma / (1.0 + (shift - 1.0) * sigma);
}

SigmaSchedule FlowMatchEulerSchedule(int num_steps, double shift) {
  TORCH_CHECK(num_steps >= 1, "num_steps must be >= 1");
  // The scheduler's training table is float32: sigma_k = shift(k / 1000), k =
  // 1000..1.
  const float sigma_max = ShiftSigmaFloat32(1000.0f / kNumTrainTimesteps, shift);
  const float sigma_min = ShiftSigmaFloat32(1.0f / kNumTrainTimesteps, shift);
  const std::vector<double> t =
      NumpyLinspace(static_cast<double>(sigma_max) * kNumTrainTimesteps,
                    static_cast<double>(sigma_min) * kNumTrainTimesteps, num_steps);
  SigmaSchedule schedule;
  for (int i = 0; i < num_steps; ++i) {
    // set_timesteps shifts the already shifted range again (diffusers
    // behaviour, kept for parity).
    const float sigma = static_cast<float>(ShiftSigma(t[i] / kNumTrainTimesteps, shift));
    schedule.sigmas.push_back(sigma);
    schedule.timesteps.push_back(sigma * static_cast<float>(kNumTrainTimesteps));
  }
  schedule.sigmas.push_back(0.0f);
  return schedule;
}

SigmaSchedule UniPCFlowSchedule(int num_steps, double shift) {
  TORCH_CHECK(num_steps >= 1, "num_steps must be >= 1");
  const std::vector<double> alphas = NumpyLinspace(1.0, 1.0 / kNumTrainTimesteps, num_steps + 1);
  SigmaSchedule schedule;
  for (int i = 0; i < num_steps; ++i) {
    // Flipped order: step i uses alpha_{N - i}; alpha_0 = 1 (sigma 0) is
    // dropped.
    const double sigma = ShiftSigma(1.0 - alphas[num_steps - i], shift);
    schedule.sigmas.push_back(static_cast<float>(sigma));
    schedule.timesteps.push_back(
        static_cast<float>(static_cast<int64_t>(sigma * kNumTrainTimesteps)));
  }
  schedule.sigmas.push_back(0.0f);
  return schedule;
}

at::Tensor CombineGuidance(const at::Tensor& cond, const at::Tensor& uncond, float scale) {
  return uncond + (cond - uncond) * scale;
}

std::unique_ptr<FlowSampler> FlowSampler::Create(SamplerKind kind, int num_steps, double shift) {
  switch (kind) {
    case SamplerKind::kUniPC:
      return std::make_unique<UniPCSampler>(num_steps, shift);
    case SamplerKind::kEuler:
      break;
  }
  return std::make_unique<FlowMatchEulerSampler>(num_steps, shift);
}

FlowMatchEulerSampler::FlowMatchEulerSampler(int num_steps, double shift)
    : FlowSampler(FlowMatchEulerSchedule(num_steps, shift)) {}

at::Tensor FlowMatchEulerSampler::Step(const at::Tensor& velocity, const at::Tensor& sample) {
  TORCH_CHECK(!done(), "sampler already finished");
  const float dt = schedule_.sigmas[step_index_ + 1] - schedule_.sigmas[step_index_];
  ++step_index_;
  return sample.to(at::kFloat) + velocity.to(at::kFloat) * dt;
}

UniPCSampler::UniPCSampler(int num_steps, double shift)
    : FlowSampler(UniPCFlowSchedule(num_steps, shift)) {}

double UniPCSampler::Lambda(int index) const {
  const double sigma = schedule_.sigmas[index];
  return std::log(1.0 - sigma) - std::log(sigma);
}

at::Tensor UniPCSampler::Correct(const at::Tensor& m_now, const at::Tensor& sample) const {
  // UniC from sigma_{i-1} to sigma_i, reusing the new model output m_now.
  const int i = step_index_;
  const double sigma_t = schedule_.sigmas[i], sigma_s = schedule_.sigmas[i - 1];
  const double alpha_t = 1.0 - sigma_t;
  const double h = Lambda(i) - Lambda(i - 1);
  const double hh = -h;
  const double h_phi_1 = std::expm1(hh);
  const double b_h = h_phi_1;  // bh2
  at::Tensor x = last_sample_ * static_cast<float>(sigma_t / sigma_s) -
                 m_prev_ * static_cast<float>(alpha_t * h_phi_1);
  at::Tensor d1_t = m_now - m_prev_;
  if (last_order_ == 1) {
    return x - d1_t * static_cast<float>(alpha_t * b_h * 0.5);
  }
  // Order 2: rho solves [[1, 1], [r, 1]] rho = [g1, g2].
  const double r = (Lambda(i - 2) - Lambda(i - 1)) / h;
  const double phi_2 = h_phi_1 / hh - 1.0;
  const double g1 = phi_2 / b_h;
  const double g2 = (phi_2 / hh - 0.5) * 2.0 / b_h;
  const double rho0 = (g1 - g2) / (1.0 - r);
  const double rho1 = g1 - rho0;
  at::Tensor d1 = (m_prev2_ - m_prev_) / static_cast<float>(r);
  return x - (d1 * static_cast<float>(rho0) + d1_t * static_cast<float>(rho1)) *
                 static_cast<float>(alpha_t * b_h);
}

at::Tensor UniPCSampler::Predict(const at::Tensor& sample, int order) const {
  const int i = step_index_;
  const double sigma_t = schedule_.sigmas[i + 1], sigma_s = schedule_.sigmas[i];
  // sigma 0 means lambda = +inf and e^{-h} = 0: the first-order update lands
  // exactly on the x0 prediction. (lower_order_final guarantees order 1 here.)
  if (sigma_t == 0.0) return m_prev_;
  const double alpha_t = 1.0 - sigma_t;
  const double h = Lambda(i + 1) - Lambda(i);
  const double h_phi_1 = std::expm1(-h);
  const double b_h = h_phi_1;
  at::Tensor x = sample * static_cast<float>(sigma_t / sigma_s) -
                 m_prev_ * static_cast<float>(alpha_t * h_phi_1);
  if (order == 1) return x;
  const double r = (Lambda(i - 1) - Lambda(i)) / h;
  at::Tensor d1 = (m_prev2_ - m_prev_) / static_cast<float>(r);
  return x - d1 * static_cast<float>(alpha_t * b_h * 0.5);
}

at::Tensor UniPCSampler::Step(const at::Tensor& velocity, const at::Tensor& sample) {
  TORCH_CHECK(!done(), "sampler already finished");
  constexpr int kSolverOrder = 2;
  const int i = step_index_;
  at::Tensor x = sample.to(at::kFloat);
  at::Tensor m = x - velocity.to(at::kFloat) * schedule_.sigmas[i];
  if (i > 0 && last_sample_.defined()) x = Correct(m, x);
  m_prev2_ = m_prev_;
  m_prev_ = m;
  const int order = std::min({kSolverOrder, num_steps() - i, warm_steps_ + 1});
  last_sample_ = x;
  at::Tensor next = Predict(x, order);
  last_order_ = order;
  warm_steps_ = std::min(warm_steps_ + 1, kSolverOrder);
  ++step_index_;
  return next;
}

}  // namespace sparge::engine
