// Host-side TMA tensor maps over [B, L, H, D] activations, shared by the Hopper attention kernels.
// cuTensorMapEncodeTiled is reached through the runtime's driver entry point, so nothing links
// libcuda. Header-only, host code only.
#pragma once

#include <cuda.h>  // CUtensorMap and the encode enums (types only)
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/sparge_kernels.h"

namespace sparge::kernels::detail {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn GetEncodeTiled() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                             cudaEnableDefault, &status);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) return nullptr;
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// Shape of the [B, L, H, D] problem a map covers.
struct BlhdShape {
  DType dtype = DType::kBF16;
  int batch = 0, seqlen = 0, heads = 0, head_dim = 0;
};

// 4-D map (innermost first: D, L, H, B) with 64-element x box_rows boxes and the 128-byte
// swizzle the wgmma descriptors expect; rows past L read as zeros.
inline bool EncodeBlhd(CUtensorMap* map, const Tensor4& t, const BlhdShape& s, int box_rows) {
  const EncodeTiledFn encode = GetEncodeTiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(s.head_dim), static_cast<cuuint64_t>(s.seqlen),
                              static_cast<cuuint64_t>(s.heads), static_cast<cuuint64_t>(s.batch)};
  // A size-1 dimension may carry any stride (PyTorch views); TMA needs a 16-byte multiple.
  auto bytes = [](int64_t stride, int64_t size) {
    const bool valid = stride > 0 && (stride * 2) % 16 == 0;
    return static_cast<cuuint64_t>(size == 1 && !valid ? 16 : stride * 2);
  };
  const cuuint64_t strides[3] = {bytes(t.stride_l, s.seqlen), bytes(t.stride_h, s.heads),
                                 bytes(t.stride_b, s.batch)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt =
      s.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, dt, 4, t.ptr, dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Strides TMA accepts: positive multiples of 16 bytes below 2^40 (size-1 dimensions get a valid
// stride in EncodeBlhd). The CanImplement checks already require multiples of 8 elements.
inline bool TmaCompatible(const Tensor4* const* ts, int n, const BlhdShape& s) {
  for (int k = 0; k < n; ++k) {
    const Tensor4* t = ts[k];
    const int64_t st[3] = {t->stride_l, t->stride_h, t->stride_b};
    const int64_t sz[3] = {s.seqlen, s.heads, s.batch};
    for (int i = 0; i < 3; ++i)
      if (sz[i] > 1 && (st[i] <= 0 || st[i] * 2 >= (int64_t{1} << 40))) return false;
  }
  return true;
}

}  // namespace sparge::kernels::detail
