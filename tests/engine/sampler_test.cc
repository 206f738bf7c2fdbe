// Flow samplers: shift map, schedules against diffusers' numbers (WAN21.md
// section 5.3, checked with diffusers 0.35.1), Euler exactness, UniPC's final
// step and accuracy, CFG.
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "engine/sampling/flow_samplers.h"
#include "gtest/gtest.h"

namespace sparge::engine {
namespace {

TEST(SamplerTest, ShiftMap) {
  EXPECT_DOUBLE_EQ(ShiftSigma(0.5, 5.0), 2.5 / 3.0);
  EXPECT_DOUBLE_EQ(ShiftSigma(0.3, 1.0), 0.3);
  EXPECT_DOUBLE_EQ(ShiftSigma(0.0, 7.0), 0.0);
  EXPECT_DOUBLE_EQ(ShiftSigma(1.0, 7.0), 1.0);
  EXPECT_GT(ShiftSigma(0.2, 3.0),
            0.2);  // shift > 1 spends more steps at high noise
}

TEST(SamplerTest, UniPCScheduleMatchesDiffusersForFiftyStepsShiftFive) {
  SigmaSchedule s = UniPCFlowSchedule(50, 5.0);
  ASSERT_EQ(s.sigmas.size(), 51u);
  ASSERT_EQ(s.timesteps.size(), 50u);
  // diffusers UniPCMultistepScheduler(use_flow_sigmas,
  // flow_shift=5).set_timesteps(50).
  EXPECT_NEAR(s.sigmas[0], 0.9997998, 1e-6);
  EXPECT_NEAR(s.sigmas[1], 0.9957324, 1e-6);
  EXPECT_NEAR(s.sigmas[2], 0.9915305, 1e-6);
  EXPECT_NEAR(s.sigmas[47], 0.2417403, 1e-6);
  EXPECT_NEAR(s.sigmas[48], 0.1722651, 1e-6);
  EXPECT_NEAR(s.sigmas[49], 0.09250686, 1e-6);
  EXPECT_EQ(s.sigmas[50], 0.0f);
  EXPECT_EQ(s.timesteps[0], 999.0f);
  EXPECT_EQ(s.timesteps[1], 995.0f);
  EXPECT_EQ(s.timesteps[2], 991.0f);
  EXPECT_EQ(s.timesteps[47], 241.0f);
  EXPECT_EQ(s.timesteps[48], 172.0f);
  EXPECT_EQ(s.timesteps[49], 92.0f);
  for (size_t i = 1; i < s.sigmas.size(); ++i) EXPECT_LT(s.sigmas[i], s.sigmas[i - 1]);
}

TEST(SamplerTest, UniPCScheduleFourStepsShiftThree) {
  SigmaSchedule s = UniPCFlowSchedule(4, 3.0);
  const std::vector<float> sigmas = {0.9996664524078369f, 0.8996397852897644f, 0.7496247887611389f,
                                     0.4996665418148041f, 0.0f};
  const std::vector<float> timesteps = {999, 899, 749, 499};
  for (int i = 0; i < 5; ++i) EXPECT_FLOAT_EQ(s.sigmas[i], sigmas[i]) << i;
  for (int i = 0; i < 4; ++i) EXPECT_EQ(s.timesteps[i], timesteps[i]) << i;
}

TEST(SamplerTest, EulerScheduleShiftsTwiceLikeDiffusers) {
  // FlowMatchEulerDiscreteScheduler(shift=5).set_timesteps(4).
  SigmaSchedule s = FlowMatchEulerSchedule(4, 5.0);
  const std::vector<float> sigmas = {1.0f, 0.9097071290016174f, 0.7173174619674683f,
                                     0.0244140662252903f, 0.0f};
  const std::vector<float> timesteps = {1000.0f, 909.7071533203125f, 717.3174438476562f,
                                        24.414066314697266f};
  for (int i = 0; i < 5; ++i) EXPECT_FLOAT_EQ(s.sigmas[i], sigmas[i]) << i;
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(s.timesteps[i], timesteps[i]) << i;
  // shift 7, 2 steps (the diffusers Wan pipeline test configuration).
  s = FlowMatchEulerSchedule(2, 7.0);
  EXPECT_FLOAT_EQ(s.sigmas[0], 1.0f);
  EXPECT_FLOAT_EQ(s.sigmas[1], 0.046755723655223846f);
  EXPECT_FLOAT_EQ(s.timesteps[1], 46.75572204589844f);
  // 50 steps, shift 5.
  s = FlowMatchEulerSchedule(50, 5.0);
  EXPECT_FLOAT_EQ(s.sigmas[1], 0.9958716034889221f);
  EXPECT_FLOAT_EQ(s.sigmas[49], 0.0244140662252903f);
  EXPECT_FLOAT_EQ(s.timesteps[1], 995.87158203125f);
}

TEST(SamplerTest, EulerIsExactOnConstantVelocity) {
  FlowMatchEulerSampler sampler(7, 3.0);
  at::Tensor x = at::tensor({1.0f, -2.0f, 0.5f});
  const at::Tensor x_start = x.clone();
  const at::Tensor v = at::tensor({0.25f, 1.0f, -3.0f});
  const float sigma0 = sampler.sigma();
  while (!sampler.done()) x = sampler.Step(v, x);
  // x(0) = x(sigma0) - sigma0 * v.
  EXPECT_TRUE(at::allclose(x, x_start - v * sigma0, 1e-6, 1e-6));
}

// The probability-flow velocity for 1-D Gaussian data x0 ~ N(0, s^2): the exact
// ODE maps x(1) to s * x(1), which lets us compare solver accuracy.
at::Tensor GaussianVelocity(const at::Tensor& x, double sigma, double s) {
  const double var = (1 - sigma) * (1 - sigma) * s * s + sigma * sigma;
  return (x.to(at::kDouble) * ((sigma - (1 - sigma) * s * s) / var)).to(at::kFloat);
}

at::Tensor Solve(FlowSampler& sampler, at::Tensor x) {
  while (!sampler.done()) x = sampler.Step(GaussianVelocity(x, sampler.sigma(), 0.5), x);
  return x;
}

TEST(SamplerTest, UniPCAndEulerMatchDiffusersTrajectories) {
  // Reference values: diffusers 0.35.1 schedulers driven by the same velocity
  // field (float32).
  const at::Tensor x1 = at::tensor({1.0f, -0.5f, 2.0f});
  UniPCSampler unipc6(6, 3.0);
  FlowMatchEulerSampler euler6(6, 3.0);
  UniPCSampler unipc10(10, 3.0);
  FlowMatchEulerSampler euler10(10, 3.0);
  EXPECT_TRUE(at::allclose(
      Solve(unipc6, x1),
      at::tensor({0.3104761838912964f, -0.1552380919456482f, 0.6209523677825928f}), 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(
      Solve(euler6, x1),
      at::tensor({0.26278477907180786f, -0.13139238953590393f, 0.5255695581436157f}), 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(
      Solve(unipc10, x1),
      at::tensor({0.41077661514282227f, -0.20538830757141113f, 0.8215532302856445f}), 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(
      Solve(euler10, x1),
      at::tensor({0.3591601848602295f, -0.17958009243011475f, 0.718320369720459f}), 1e-5, 1e-6));
}

TEST(SamplerTest, UniPCConvergesBetterThanEuler) {
  const at::Tensor x1 = at::tensor({1.0f, -0.5f, 2.0f});
  const at::Tensor exact = x1 * 0.5f;
  for (int steps : {4, 8, 16}) {
    UniPCSampler unipc(steps, 1.0);
    FlowMatchEulerSampler euler(steps, 1.0);
    const float unipc_err = (Solve(unipc, x1) - exact).abs().max().item<float>();
    const float euler_err = (Solve(euler, x1) - exact).abs().max().item<float>();
    EXPECT_LT(unipc_err, euler_err) << steps << " steps";
  }
}

TEST(SamplerTest, UniPCFinalStepReturnsTheX0Prediction) {
  UniPCSampler sampler(3, 5.0);
  at::Tensor x = at::tensor({0.3f, -1.2f});
  at::Tensor v;
  float sigma = 0.0f;
  at::Tensor last_input;
  const std::vector<at::Tensor> velocities = {at::tensor({1.0f, 2.0f}), at::tensor({-0.5f, 0.7f}),
                                              at::tensor({0.2f, -0.9f})};
  for (const at::Tensor& vel : velocities) {
    last_input = x;
    sigma = sampler.sigma();
    v = vel;
    x = sampler.Step(vel, x);
  }
  EXPECT_TRUE(sampler.done());
  EXPECT_TRUE(at::equal(x, last_input - v * sigma));
}

TEST(SamplerTest, SingleStepSamplersLandOnX0) {
  at::Tensor x = at::tensor({0.4f, 0.1f});
  at::Tensor v = at::tensor({2.0f, -1.0f});
  UniPCSampler unipc(1, 5.0);
  EXPECT_TRUE(at::allclose(unipc.Step(v, x), x - v * unipc.schedule().sigmas[0]));
  FlowMatchEulerSampler euler(1, 5.0);
  EXPECT_TRUE(at::allclose(euler.Step(v, x), x - v * 1.0f));
}

TEST(SamplerTest, CreateHonoursKindAndTimestepsAdvance) {
  auto unipc = FlowSampler::Create(SamplerKind::kUniPC, 4, 3.0);
  auto euler = FlowSampler::Create(SamplerKind::kEuler, 4, 3.0);
  EXPECT_EQ(unipc->timestep(), 999.0f);
  EXPECT_EQ(euler->timestep(), 1000.0f);
  at::Tensor x = at::zeros({2});
  x = unipc->Step(at::ones({2}), x);
  EXPECT_EQ(unipc->steps_done(), 1);
  EXPECT_EQ(unipc->timestep(), 899.0f);
}

TEST(SamplerTest, ClassifierFreeGuidance) {
  at::Tensor cond = at::tensor({1.0f, 2.0f}), uncond = at::tensor({0.5f, -1.0f});
  EXPECT_TRUE(at::allclose(CombineGuidance(cond, uncond, 5.0f), at::tensor({3.0f, 14.0f})));
  EXPECT_TRUE(at::equal(CombineGuidance(cond, uncond, 1.0f), cond));
}

}  // namespace
}  // namespace sparge::engine
