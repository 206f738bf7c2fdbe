// CUDA implementations of the fused DiT block ops (schemas in dit_fused_ops.cc): checks, output
// on Torch's caching allocator and current stream, then the launchers of kernels/dit_fused.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "kernels/dit_fused.h"

namespace sparge::ops {
namespace {

using at::Tensor;
namespace k = sparge::kernels;

k::DType FusedDType(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "CUDA fused DiT ops take bfloat16 or float16, got ", x.scalar_type());
  return x.scalar_type() == at::kBFloat16 ? k::DType::kBF16 : k::DType::kFP16;
}

// [B, L, C] with unit stride over C and rows evenly strided (a contiguous tensor or a
// column slice of one); anything else is made contiguous.
Tensor Rows(const Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "fused DiT ops take [B, L, C] activations, got ", x.sizes());
  const bool ok = x.stride(2) == 1 && x.stride(0) == x.size(1) * x.stride(1);
  return ok ? x : x.contiguous();
}

// A modulation row [B or 1, ..., C] as contiguous fp32 on x's device; *batch_stride = C, or 0
// when it broadcasts over the batch.
Tensor ModRows(const Tensor& t, const Tensor& x, int64_t* batch_stride) {
  const int64_t B = x.size(0), C = x.size(2);
  Tensor m = t.to(x.device(), at::kFloat).contiguous();
  TORCH_CHECK(m.size(-1) == C && (m.numel() == C || m.numel() == B * C),
              "modulation must have C=", C, " features per batch element (B=", B, "), got ",
              t.sizes());
  *batch_stride = m.numel() == C ? 0 : C;
  return m;
}

void Check(const char* why, const char* op) { TORCH_CHECK(why == nullptr, op, ": ", why); }

Tensor LayerNormModulateCuda(const Tensor& x_in, const std::optional<Tensor>& mul,
                             const std::optional<Tensor>& add, double eps) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = Rows(x_in);
  k::LayerNormModulateParams p;
  p.dtype = FusedDType(x);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t stride_mul = 0, stride_add = 0;
  Tensor m, a;
  if (mul.has_value()) m = ModRows(*mul, x, &stride_mul);
  if (add.has_value()) a = ModRows(*add, x, &stride_add);
  TORCH_CHECK(!mul.has_value() || !add.has_value() || stride_mul == stride_add,
              "layer_norm_modulate: mul and add must both be per batch element or both shared");
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.rows = x.size(0) * x.size(1);
  p.x_row_stride = x.stride(1);
  p.rows_per_batch = x.size(1);
  p.cols = static_cast<int>(x.size(2));
  p.mul = mul.has_value() ? m.data_ptr<float>() : nullptr;
  p.add = add.has_value() ? a.data_ptr<float>() : nullptr;
  p.mod_batch_stride = mul.has_value() ? stride_mul : stride_add;
  p.eps = static_cast<float>(eps);
  Check(k::CanImplementLayerNormModulate(p), "layer_norm_modulate");
  C10_CUDA_CHECK(k::LaunchLayerNormModulate(p, at::cuda::getCurrentCUDAStream()));
  return y;
}

Tensor GatedResidualCuda(const Tensor& x_in, const Tensor& r_in,
                         const std::optional<Tensor>& gate) {
  c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(x_in.dim() == 3 && r_in.sizes() == x_in.sizes() &&
                  r_in.scalar_type() == x_in.scalar_type(),
              "gated_residual: x and r must be equal [B, L, C] of one dtype, got ", x_in.sizes(),
              " and ", r_in.sizes());
  const Tensor x = x_in.contiguous(), r = r_in.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  k::GatedResidualParams p;
  p.dtype = FusedDType(x);
  Tensor g;
  if (gate.has_value()) g = ModRows(*gate, x, &p.gate_batch_stride);
  p.x = x.data_ptr();
  p.r = r.data_ptr();
  p.y = y.data_ptr();
  p.rows = x.size(0) * x.size(1);
  p.rows_per_batch = x.size(1);
  p.cols = static_cast<int>(x.size(2));
  p.gate = gate.has_value() ? g.data_ptr<float>() : nullptr;
  Check(k::CanImplementGatedResidual(p), "gated_residual");
  C10_CUDA_CHECK(k::LaunchGatedResidual(p, at::cuda::getCurrentCUDAStream()));
  return y;
}

Tensor RmsNormRopeCuda(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& cos,
                       const std::optional<Tensor>& sin, int64_t head_dim, double eps) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = Rows(x_in);
  const int64_t C = x.size(2);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor w = weight.to(x.device(), at::kFloat).contiguous();
  TORCH_CHECK(w.numel() == C, "rms_norm_rope: weight must have ", C, " elements");
  k::RmsNormRopeParams p;
  p.dtype = FusedDType(x);
  Tensor c, s;
  if (cos.has_value()) {
    TORCH_CHECK(sin.has_value(), "rms_norm_rope: cos and sin go together");
    c = cos->to(x.device(), at::kFloat).contiguous();
    s = sin->to(x.device(), at::kFloat).contiguous();
    TORCH_CHECK(c.dim() == 2 && c.size(0) == x.size(1) && c.size(1) == head_dim / 2 &&
                    s.sizes() == c.sizes(),
                "rms_norm_rope: cos/sin must be [L=", x.size(1), ", head_dim/2=", head_dim / 2,
                "], got ", c.sizes(), " and ", s.sizes());
    p.cos = c.data_ptr<float>();
    p.sin = s.data_ptr<float>();
  }
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.rows = x.size(0) * x.size(1);
  p.x_row_stride = x.stride(1);
  p.rows_per_batch = x.size(1);
  p.cols = static_cast<int>(C);
  p.head_dim = static_cast<int>(head_dim);
  p.weight = w.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  Check(k::CanImplementRmsNormRope(p), "rms_norm_rope");
  C10_CUDA_CHECK(k::LaunchRmsNormRope(p, at::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace
}  // namespace sparge::ops

TORCH_LIBRARY_IMPL(sparge, CUDA, m) {
  m.impl("layer_norm_modulate", &sparge::ops::LayerNormModulateCuda);
  m.impl("gated_residual", &sparge::ops::GatedResidualCuda);
  m.impl("rms_norm_rope", &sparge::ops::RmsNormRopeCuda);
}
