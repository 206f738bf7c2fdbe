#include "engine/models/dit_fused.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace sparge::engine {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::atomic<bool>& Enabled() {
  static std::atomic<bool> enabled([] {
    const char* v = std::getenv("SPARGE_DISABLE_FUSED");
    return v == nullptr || std::strcmp(v, "") == 0 || std::strcmp(v, "0") == 0;
  }());
  return enabled;
}

bool DisabledByEnv() { return !Enabled().load(std::memory_order_relaxed); }

std::optional<c10::OperatorHandle> FindCudaOp(const char* name) {
  std::optional<c10::OperatorHandle> op = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return std::nullopt;
  return op;
}

}  // namespace

void EnableFusedDiTOps(bool enabled) { Enabled().store(enabled); }

bool UseFusedDiTOps(const Tensor& x) {
  if (!x.is_cuda() || at::GradMode::is_enabled() || DisabledByEnv()) return false;
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) return false;
  // Looked up once: the op library is loaded (or not) before the first forward.
  static const bool available = FindCudaOp("sparge::layer_norm_modulate").has_value() &&
                                FindCudaOp("sparge::gated_residual").has_value() &&
                                FindCudaOp("sparge::rms_norm_rope").has_value();
  return available;
}

bool UseGemmGelu(const Tensor& x) {
  return x.is_cuda() && !at::GradMode::is_enabled() && !DisabledByEnv() &&
         (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
}

Tensor FusedLayerNormModulate(const Tensor& x, const OptTensor& mul, const OptTensor& add,
                              double eps) {
  static auto op = FindCudaOp("sparge::layer_norm_modulate")
                       ->typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, double)>();
  return op.call(x, mul, add, eps);
}

Tensor FusedGatedResidual(const Tensor& x, const Tensor& r, const OptTensor& gate) {
  static auto op = FindCudaOp("sparge::gated_residual")
                       ->typed<Tensor(const Tensor&, const Tensor&, const OptTensor&)>();
  return op.call(x, r, gate);
}

Tensor FusedRmsNormRope(const Tensor& x, const Tensor& weight, const OptTensor& cos,
                        const OptTensor& sin, int64_t head_dim, double eps) {
  static auto op = FindCudaOp("sparge::rms_norm_rope")
                       ->typed<Tensor(const Tensor&, const Tensor&, const OptTensor&,
                                      const OptTensor&, int64_t, double)>();
  return op.call(x, weight, cos, sin, head_dim, eps);
}

}  // namespace sparge::engine
