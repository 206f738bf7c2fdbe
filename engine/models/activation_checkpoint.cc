#include "engine/models/activation_checkpoint.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <memory>

namespace sparge::engine {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Carries the function from forward to backward through the context's IValue map.
struct FunctionHolder : torch::CustomClassHolder {
  explicit FunctionHolder(CheckpointedFunction f) : fn(std::move(f)) {}
  CheckpointedFunction fn;
};

class CheckpointFn : public torch::autograd::Function<CheckpointFn> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               c10::intrusive_ptr<FunctionHolder> holder) {
    at::Tensor out;
    {
      at::NoGradGuard no_grad;
      out = holder->fn(inputs.vec());
    }
    ctx->save_for_backward(inputs.vec());
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto holder = c10::static_intrusive_pointer_cast<FunctionHolder>(
        ctx->saved_data["fn"].toCapsule());
    std::vector<at::Tensor> detached;
    detached.reserve(saved.size());
    for (const at::Tensor& t : saved) {
      at::Tensor d = t.detach();
      if (t.requires_grad()) d.requires_grad_(true);
      detached.push_back(d);
    }
    at::Tensor out;
    {
      at::AutoGradMode grad(true);
      out = holder->fn(detached);
    }
    variable_list result;
    if (out.requires_grad()) {
      // Reentrant backward: accumulates into the parameters' .grad and the detached inputs' .grad.
      torch::autograd::backward({out}, {grads[0]});
    }
    for (const at::Tensor& d : detached) {
      result.push_back(d.requires_grad() ? d.grad() : at::Tensor());
    }
    result.push_back(at::Tensor());  // the holder
    return result;
  }
};

}  // namespace

at::Tensor CheckpointedCall(const CheckpointedFunction& fn, const std::vector<at::Tensor>& inputs) {
  if (!at::GradMode::is_enabled()) return fn(inputs);
  return CheckpointFn::apply(at::TensorList(inputs), c10::make_intrusive<FunctionHolder>(fn))[0];
}

}  // namespace sparge::engine
