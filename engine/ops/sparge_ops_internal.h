// Argument checks shared by the CPU and CUDA implementations of the sparge ops (engine/ops only).
// Each throws c10::Error naming the bad argument. Thread-safe: stateless.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace sparge::ops::internal {

void CheckQkv(const at::Tensor& q, const char* name);
// [B] or [B, H] (or a scalar) knob -> contiguous [B, H] of dtype, on the knob's device.
at::Tensor ExpandKnob(const at::Tensor& t, int64_t B, int64_t H, at::ScalarType dtype,
                      const char* name);
void CheckKnobs(const at::Tensor& mode, const at::Tensor& topk, const at::Tensor& topp);
void CheckMask(const at::Tensor& counts, const at::Tensor& indices, int64_t B, int64_t H,
               int64_t nq, int64_t nk);

}  // namespace sparge::ops::internal
