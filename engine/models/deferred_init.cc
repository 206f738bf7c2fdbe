#include "engine/models/deferred_init.h"

#include <torch/torch.h>

namespace sparge::engine {
namespace {

thread_local int deferred_init_depth = 0;

}  // namespace

ScopedDeferredParameterInit::ScopedDeferredParameterInit() { ++deferred_init_depth; }
ScopedDeferredParameterInit::~ScopedDeferredParameterInit() { --deferred_init_depth; }
bool DeferredParameterInitActive() { return deferred_init_depth > 0; }

void ReleaseParametersForLoading(torch::nn::Module& module) {
  if (!DeferredParameterInitActive()) return;
  torch::NoGradGuard no_grad;
  for (torch::Tensor& param : module.parameters(/*recurse=*/true)) {
    if (IsParameterPlaceholder(param)) continue;
    // One element expanded to the full shape: shape checks still see the real sizes, and the
    // layer's own storage is freed here, before the next layer is built.
    torch::Tensor one = torch::empty({1}, torch::dtype(param.scalar_type()));
    param.set_data(param.dim() == 0 ? one.view({}) : one.expand(param.sizes()));
  }
}

bool IsParameterPlaceholder(const torch::Tensor& param) {
  if (!param.defined() || param.numel() <= 1 || !param.has_storage()) return false;
  return param.storage().nbytes() <= static_cast<size_t>(param.element_size());
}

}  // namespace sparge::engine
