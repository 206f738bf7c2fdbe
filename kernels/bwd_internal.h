// Internal launchers of the block-sparse backward pass (dQ kernel, dK/dV kernel), shared between
// kernels/*.cu files so that each file compiles its own instantiations. Not a public API.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/sparge_kernels.h"

namespace sparge::kernels::detail {

cudaError_t LaunchBwdDq(const BwdParams& p, cudaStream_t stream);
cudaError_t LaunchBwdDkv(const BwdParams& p, cudaStream_t stream);
// Hopper wgmma dK/dV and dQ kernels (delta must already be computed).
cudaError_t LaunchBwdSm90(const BwdParams& p, cudaStream_t stream);

}  // namespace sparge::kernels::detail
