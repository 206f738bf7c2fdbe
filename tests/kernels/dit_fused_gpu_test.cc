// The fused DiT block ops on CUDA (kernels/dit_fused.cu via engine/ops) against their CPU
// implementations, which are the engine's eager formulas. Skipped without a GPU.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <optional>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool HaveGpu() { return torch::cuda::is_available(); }
#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

Tensor LayerNormModulate(const Tensor& x, const OptTensor& mul, const OptTensor& add) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparge::layer_norm_modulate", "")
                       .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, double)>();
  return op.call(x, mul, add, 1e-6);
}
Tensor GatedResidual(const Tensor& x, const Tensor& r, const OptTensor& gate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparge::gated_residual", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&)>();
  return op.call(x, r, gate);
}
Tensor RmsNormRope(const Tensor& x, const Tensor& w, const OptTensor& cos, const OptTensor& sin,
                   int64_t head_dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparge::rms_norm_rope", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&,
                                     const OptTensor&, int64_t, double)>();
  return op.call(x, w, cos, sin, head_dim, 1e-6);
}

OptTensor Cuda(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->cuda()) : std::nullopt;
}

// The GPU result may differ from the CPU one by one rounding step of a half-precision value of
// normalized magnitude (different reduction order / rsqrt; RoPE then mixes two such values), in
// rare elements; anything else is a bug.
void ExpectClose(const Tensor& gpu, const Tensor& cpu, bool exact) {
  ASSERT_EQ(gpu.sizes(), cpu.sizes());
  ASSERT_EQ(gpu.scalar_type(), cpu.scalar_type());
  Tensor g = gpu.cpu().to(at::kFloat), c = cpu.to(at::kFloat);
  ASSERT_TRUE(g.isfinite().all().item<bool>());
  const double ulp = cpu.scalar_type() == at::kBFloat16 ? 1.0 / 128 : 1.0 / 1024;
  Tensor err = (g - c).abs();
  Tensor bound = (c.abs() + 1) * ulp;
  if (exact) {
    EXPECT_EQ(err.max().item<double>(), 0.0);
    return;
  }
  EXPECT_TRUE((err <= bound).all().item<bool>()) << "max err " << err.max().item<double>();
  EXPECT_LT((err > 0).to(at::kFloat).mean().item<double>(), 0.01);
}

class DitFusedGpu : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(DitFusedGpu, LayerNormModulateMatchesCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(1);
  for (int64_t C : {64, 1536, 5120, 8200}) {
    Tensor x = (at::randn({2, 37, C}) * 3 + 0.5).to(GetParam());
    Tensor mul = at::randn({2, C}) * 0.1 + 1, add = at::randn({2, C}) * 0.1;
    Tensor shared_w = at::randn({C}), shared_b = at::randn({C});
    ExpectClose(LayerNormModulate(x.cuda(), mul.cuda(), add.cuda()),
                LayerNormModulate(x, mul, add), false);
    ExpectClose(LayerNormModulate(x.cuda(), shared_w.cuda(), shared_b.cuda()),
                LayerNormModulate(x, shared_w, shared_b), false);
    ExpectClose(LayerNormModulate(x.cuda(), std::nullopt, std::nullopt),
                LayerNormModulate(x, std::nullopt, std::nullopt), false);
  }
  // A column slice (row stride > C) of a wider activation.
  Tensor wide = at::randn({1, 50, 3072}).to(GetParam());
  Tensor slice = wide.narrow(2, 1536, 1536);
  Tensor mul = at::randn({1, 1536});
  ExpectClose(LayerNormModulate(wide.cuda().narrow(2, 1536, 1536), mul.cuda(), std::nullopt),
              LayerNormModulate(slice, mul, std::nullopt), false);
}

TEST_P(DitFusedGpu, GatedResidualMatchesCpuExactly) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(2);
  Tensor x = at::randn({3, 129, 1536}).to(GetParam());
  Tensor r = at::randn({3, 129, 1536}).to(GetParam());
  Tensor gate = at::randn({3, 1536});
  ExpectClose(GatedResidual(x.cuda(), r.cuda(), gate.cuda()), GatedResidual(x, r, gate), true);
  ExpectClose(GatedResidual(x.cuda(), r.cuda(), std::nullopt), GatedResidual(x, r, std::nullopt),
              true);
  // The gate changes the result: the test can fail.
  EXPECT_FALSE(GatedResidual(x, r, gate).equal(GatedResidual(x, r, std::nullopt)));
}

TEST_P(DitFusedGpu, RmsNormRopeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  at::manual_seed(3);
  for (int64_t head_dim : {64, 128}) {
    const int64_t L = 77, C = 12 * head_dim;
    Tensor x = (at::randn({2, L, C}) * 2).to(GetParam());
    Tensor w = (at::randn({C}) * 0.2 + 1).to(GetParam());
    Tensor phi = at::rand({L, head_dim / 2}) * 6.28;
    Tensor cos = at::cos(phi), sin = at::sin(phi);
    ExpectClose(RmsNormRope(x.cuda(), w.cuda(), cos.cuda(), sin.cuda(), head_dim),
                RmsNormRope(x, w, cos, sin, head_dim), false);
    ExpectClose(RmsNormRope(x.cuda(), w.cuda(), std::nullopt, std::nullopt, head_dim),
                RmsNormRope(x, w, std::nullopt, std::nullopt, head_dim), false);
  }
}

TEST(DitFusedGpuErrors, BadInputsAreRejected) {
  SKIP_WITHOUT_GPU();
  Tensor x = at::randn({1, 4, 1536}, at::device(at::kCUDA).dtype(at::kBFloat16));
  EXPECT_THROW(LayerNormModulate(x.to(at::kFloat), std::nullopt, std::nullopt), c10::Error);
  EXPECT_THROW(LayerNormModulate(x, at::ones({3, 1536}, at::kCUDA), std::nullopt), c10::Error);
  EXPECT_THROW(GatedResidual(x, x.narrow(1, 0, 2), std::nullopt), c10::Error);
  EXPECT_THROW(RmsNormRope(x, at::ones({1536}, at::kCUDA), at::ones({4, 64}, at::kCUDA),
                           std::nullopt, 128),
               c10::Error);
  Tensor odd = at::randn({1, 4, 20}, at::device(at::kCUDA).dtype(at::kBFloat16));
  EXPECT_THROW(LayerNormModulate(odd, std::nullopt, std::nullopt), c10::Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, DitFusedGpu, ::testing::Values(at::kBFloat16, at::kHalf));

}  // namespace
