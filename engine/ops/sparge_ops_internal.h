// Argument checks shared by the CPU and CUDA implementations of the sparge ops (engine/ops only).
// Each throws c10::Error naming the bad argument. Thread-safe: stateless.
#pragma once

#include <cstdint>
#include <utility>

#include <ATen/core/Tensor.h>

namespace sparge::ops::internal {

void CheckQkv(const at::Tensor& q, const char* name);
// [B] or [B, H] (or a scalar) knob -> contiguous [B, H] of dtype, on the knob's device.
at::Tensor ExpandKnob(const at::Tensor& t, int64_t B, int64_t H, at::ScalarType dtype,
                      const char* name);
void CheckKnobs(const at::Tensor& mode, const at::Tensor& topk, const at::Tensor& topp);
void CheckMask(const at::Tensor& counts, const at::Tensor& indices, int64_t B, int64_t H,
               int64_t nq, int64_t nk);
// The empty t_counts [B, H, 0] / t_indices [B, H, 0, 0] of a mask predicted with
// transposed=False, and the check that names that case where a backward pass needs them.
std::pair<at::Tensor, at::Tensor> NoTransposedMask(int64_t B, int64_t H,
                                                   const at::TensorOptions& like);
void CheckTransposedMask(const at::Tensor& t_counts);

}  // namespace sparge::ops::internal
