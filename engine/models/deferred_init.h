// Deferred parameter initialization (placeholders instead of random init while a checkpoint load
// builds a model), shared by the models and the checkpoint loader; see ScopedDeferredParameterInit.
// Thread-safety: the scope is per thread.
#pragma once

#include <torch/nn/module.h>

namespace sparge::engine {

// Deferred parameter initialization for models about to be filled from a checkpoint. While one of
// these is alive on the calling thread, WanDiT, TextEncoder::CreateForLoading's umT5 and
// VaeDecoder::CreateForLoading's decoder swap each parameter, right after building its layer, for
// a placeholder of the same shape and dtype that owns a single element (zero strides), and skip
// the seeded random init. Peak host memory while building is then one layer, not a full fp32
// copy of the model. Placeholders must be replaced before use; LoadParameters does that.
class ScopedDeferredParameterInit {
 public:
  ScopedDeferredParameterInit();
  ~ScopedDeferredParameterInit();
  ScopedDeferredParameterInit(const ScopedDeferredParameterInit&) = delete;
  ScopedDeferredParameterInit& operator=(const ScopedDeferredParameterInit&) = delete;
};
bool DeferredParameterInitActive();
// With deferred init active: every parameter of `module` (recursively) becomes a placeholder.
// Otherwise a no-op.
void ReleaseParametersForLoading(torch::nn::Module& module);
// True if `param` is such a placeholder (holds at most one element's bytes for a larger shape).
bool IsParameterPlaceholder(const torch::Tensor& param);

}  // namespace sparge::engine
