// The fused DiT block ops of library "sparge" (schemas and CPU implementations; the CUDA ones are
// in dit_fused_ops_cuda.cc): LayerNorm + modulation, gated residual add, q/k RMSNorm + RoPE. The
// CPU implementations are the eager ATen formulas the engine runs on CPU, so tests compare the CUDA
// kernels against them. Inference only (no autograd); the engine uses them only without grad.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace sparge::ops {
namespace {

using at::Tensor;

// A modulation/affine row as [B or 1, 1, C] fp32 for broadcasting over [B, L, C].
Tensor ModRow(const Tensor& t, const Tensor& x) {
  Tensor m = t.to(at::kFloat);
  const int64_t C = x.size(-1);
  TORCH_CHECK(m.numel() % C == 0 && m.size(-1) == C, "modulation must end in ", C,
              " features, got ", t.sizes());
  return m.reshape({-1, 1, C});
}

Tensor LayerNormModulateCpu(const Tensor& x, const std::optional<Tensor>& mul,
                            const std::optional<Tensor>& add, double eps) {
  TORCH_CHECK(x.dim() == 3, "layer_norm_modulate: x must be [B, L, C], got ", x.sizes());
  Tensor y = at::layer_norm(x.to(at::kFloat), {x.size(-1)}, {}, {}, eps);
  if (mul.has_value()) y = y * ModRow(*mul, x);
  if (add.has_value()) y = y + ModRow(*add, x);
  return y.to(x.scalar_type());
}

Tensor GatedResidualCpu(const Tensor& x, const Tensor& r, const std::optional<Tensor>& gate) {
  TORCH_CHECK(x.dim() == 3 && r.sizes() == x.sizes(), "gated_residual: x and r must be equal [B, L, C], got ",
              x.sizes(), " and ", r.sizes());
  Tensor rf = r.to(at::kFloat);
  if (gate.has_value()) rf = rf * ModRow(*gate, x);
  return (x.to(at::kFloat) + rf).to(x.scalar_type());
}

Tensor RmsNormRopeCpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& cos,
                      const std::optional<Tensor>& sin, int64_t head_dim, double eps) {
  TORCH_CHECK(x.dim() == 3, "rms_norm_rope: x must be [B, L, C], got ", x.sizes());
  Tensor xf = x.to(at::kFloat);
  Tensor n = (xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight.to(at::kFloat))
                 .to(x.scalar_type());
  if (!cos.has_value()) return n;
  TORCH_CHECK(sin.has_value(), "rms_norm_rope: cos and sin go together");
  TORCH_CHECK(x.size(-1) % head_dim == 0 && head_dim % 2 == 0, "rms_norm_rope: head_dim ",
              head_dim, " must be even and divide ", x.size(-1));
  Tensor pairs = n.to(at::kFloat).unflatten(-1, {-1, head_dim / 2, 2});  // [B, L, H, D/2, 2]
  Tensor x1 = pairs.select(-1, 0), x2 = pairs.select(-1, 1);
  Tensor c = cos->to(at::kFloat).unsqueeze(1), s = sin->to(at::kFloat).unsqueeze(1);
  Tensor y = at::stack({x1 * c - x2 * s, x1 * s + x2 * c}, -1);
  return y.flatten(2).to(x.scalar_type());
}

}  // namespace
}  // namespace sparge::ops

TORCH_LIBRARY_FRAGMENT(sparge, m) {
  m.def("layer_norm_modulate(Tensor x, Tensor? mul, Tensor? add, float eps=1e-6) -> Tensor");
  m.def("gated_residual(Tensor x, Tensor r, Tensor? gate) -> Tensor");
  m.def("rms_norm_rope(Tensor x, Tensor weight, Tensor? cos, Tensor? sin, int head_dim, "
        "float eps=1e-6) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparge, CPU, m) {
  m.impl("layer_norm_modulate", &sparge::ops::LayerNormModulateCpu);
  m.impl("gated_residual", &sparge::ops::GatedResidualCpu);
  m.impl("rms_norm_rope", &sparge::ops::RmsNormRopeCpu);
}
