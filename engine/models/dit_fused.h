// Access to the fused DiT block ops of the "sparge" op library (engine/ops/dit_fused_ops*.cc) from
// the Wan DiT: LayerNorm + modulation, gated residual add, q/k RMSNorm + RoPE. They are found
// through the Torch dispatcher, so the engine needs no link-time dependency on the library; the
// DiT takes them only for CUDA bf16/fp16 inference (no grad) and keeps its ATen formulas
// otherwise (CPU parity runs never see them). SPARGE_DISABLE_FUSED=1 in the environment turns them
// off (for A/B measurements). Thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace sparge::engine {

// Turns the fused paths (these ops and the GEMM-epilogue GELU) on or off process-wide; the
// default is on unless SPARGE_DISABLE_FUSED is set. For A/B comparisons in one process.
void EnableFusedDiTOps(bool enabled);

// Whether the fused ops can run on activations like x (CUDA, bf16/fp16, grad mode off, the
// library loaded with CUDA kernels, not disabled by the environment).
bool UseFusedDiTOps(const at::Tensor& x);

// Whether to run the FFN's GELU in the cuBLASLt GEMM epilogue (CUDA, half precision, grad mode
// off, not disabled by the environment); needs no op library.
bool UseGemmGelu(const at::Tensor& x);

// LN(x) * mul + add over the last dim of x [B, L, C], fp32 math, result in x's dtype. mul/add: fp32
// rows [B, C] (or [C], shared), either may be absent.
at::Tensor FusedLayerNormModulate(const at::Tensor& x, const std::optional<at::Tensor>& mul,
                                  const std::optional<at::Tensor>& add, double eps);
// x + r * gate (gate [B, C] or [C] fp32; absent: x + r), fp32 math, result in x's dtype.
at::Tensor FusedGatedResidual(const at::Tensor& x, const at::Tensor& r,
                              const std::optional<at::Tensor>& gate);
// RMSNorm of x [B, L, C] with weight [C], rounded to x's dtype, then (if cos/sin [L, head_dim/2]
// are given) RoPE per head of head_dim; [B, L, C] in x's dtype.
at::Tensor FusedRmsNormRope(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, int64_t head_dim, double eps);

}  // namespace sparge::engine
