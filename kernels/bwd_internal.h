// Internal launchers of the block-sparse backward pass (dQ kernel, dK/dV kernel), shared between
// kernels/*.cu files so that each file compiles its own instantiations. Not a public API.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/sparge_kernels.h"

namespace sparge::kernels::detail {

cudaError_t LaunchBwdDq(const BwdParams& p, cudaStream_t stream);
cudaError_t LaunchBwdDkv(const BwdParams& p, cudaStream_t stream);
// delta[b][h][l] = sum_d dO * O (the split kernels' input).
cudaError_t LaunchBwdDelta(const BwdParams& p, cudaStream_t stream);
// Hopper wgmma backward: the fused kernels (v10 computes delta in its prep kernel; v9 and the
// split kernels launch LaunchBwdDelta first).
cudaError_t LaunchBwdSm90(const BwdParams& p, cudaStream_t stream);

}  // namespace sparge::kernels::detail
