// Activation checkpointing for training: runs a function without keeping its intermediate
// activations and recomputes it during the backward pass (a reentrant backward over the
// recomputed graph), trading one extra forward per checkpointed segment for memory. The trainer
// checkpoints each DiT block (WanDiTImpl::SetActivationCheckpointing). Gradients reach every
// parameter the function uses (accumulated into .grad during the outer backward) and every
// tensor in `inputs` that requires grad. The function must be deterministic: the recomputation
// has to reproduce the forward (the DiT blocks are: no dropout, masks depend only on q and k).
// Thread-safety: as the autograd engine; the function runs on the backward's thread.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace sparge::engine {

using CheckpointedFunction = std::function<at::Tensor(const std::vector<at::Tensor>& inputs)>;

// fn(inputs) with its activations dropped. Without grad mode this is just fn(inputs). With grad
// mode, at least one input must require grad: the autograd node exists only then, so the
// parameters inside fn get gradients only then. fn must not write to storage it does not own
// (it runs again, later, during the backward pass).
at::Tensor CheckpointedCall(const CheckpointedFunction& fn, const std::vector<at::Tensor>& inputs);

}  // namespace sparge::engine
