// Internal launchers of the block-sparse forward pass: the portable mma.sync kernel and the Hopper
// wgmma kernel. Not a public API; LaunchBlockSparseFwd picks between them by FwdParams::impl.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/sparge_kernels.h"

namespace sparge::kernels::detail {

cudaError_t LaunchFwdMma(const FwdParams& p, cudaStream_t stream);
cudaError_t LaunchFwdSm90(const FwdParams& p, cudaStream_t stream);

}  // namespace sparge::kernels::detail
