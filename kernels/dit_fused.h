// Fused elementwise/normalization kernels of the Wan2.1 DiT block (framework-free, plain C++ API):
// LayerNorm + modulation, gated residual add, and q/k RMSNorm + 3D RoPE, each one pass over bf16 or
// fp16 activations with fp32 math, rounding where diffusers rounds. Fill a params struct with device
// pointers, call CanImplement*() once, then Launch*() on a stream. Stateless and thread-safe.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/sparge_kernels.h"

namespace sparge::kernels {

// y[r, c] = LN(x[r, :])[c] * mul[b, c] + add[b, c], b = r / rows_per_batch. LN has no affine
// parameters and is computed in fp32 (two-pass mean/variance from registers, biased variance);
// mul/add are fp32 rows addressed with a batch stride (0 broadcasts one row); either may be null
// (then 1 / 0). Products and sums are rounded separately (no FMA), as eager PyTorch computes
// `LN(x.float()) * (1 + scale) + shift`, then cast once to the activation dtype.
struct LayerNormModulateParams {
  const void* x = nullptr;  // [rows, cols], row stride x_row_stride elements
  void* y = nullptr;        // [rows, cols] contiguous
  DType dtype = DType::kBF16;
  int64_t rows = 0, x_row_stride = 0, rows_per_batch = 0;
  int cols = 0;
  const float* mul = nullptr;
  const float* add = nullptr;
  int64_t mod_batch_stride = 0;  // elements between batch rows of mul/add
  float eps = 1e-6f;
};

// y = round(float(x) + float(r) * gate[b, c]) (gate null: round(float(x) + float(r))), all
// contiguous [rows, cols]; y may alias x.
struct GatedResidualParams {
  const void* x = nullptr;
  const void* r = nullptr;
  void* y = nullptr;
  DType dtype = DType::kBF16;
  int64_t rows = 0, rows_per_batch = 0;
  int cols = 0;
  const float* gate = nullptr;
  int64_t gate_batch_stride = 0;
};

// Per row (a token's q or k projection, cols = heads * head_dim):
//   n = round(x * rsqrt(mean(x^2) + eps) * weight)           (torch RMSNorm over all heads)
//   then, when cos/sin are given, per head and pair i of head_dim:
//   y[2i] = round(n[2i] cos - n[2i+1] sin), y[2i+1] = round(n[2i] sin + n[2i+1] cos)
// with cos/sin [rows_per_batch, head_dim / 2] fp32 indexed by the row's position in its batch.
struct RmsNormRopeParams {
  const void* x = nullptr;  // row stride x_row_stride elements
  void* y = nullptr;        // [rows, cols] contiguous
  DType dtype = DType::kBF16;
  int64_t rows = 0, x_row_stride = 0, rows_per_batch = 0;
  int cols = 0, head_dim = 0;
  const float* weight = nullptr;  // [cols] fp32
  const float* cos = nullptr;     // optional
  const float* sin = nullptr;
  float eps = 1e-6f;
};

const char* CanImplementLayerNormModulate(const LayerNormModulateParams& p);
cudaError_t LaunchLayerNormModulate(const LayerNormModulateParams& p, cudaStream_t stream);

const char* CanImplementGatedResidual(const GatedResidualParams& p);
cudaError_t LaunchGatedResidual(const GatedResidualParams& p, cudaStream_t stream);

const char* CanImplementRmsNormRope(const RmsNormRopeParams& p);
cudaError_t LaunchRmsNormRope(const RmsNormRopeParams& p, cudaStream_t stream);

}  // namespace sparge::kernels
