// Hopper tile helpers shared by the wgmma attention kernels: the 128-byte-swizzled shared tile
// layout that wgmma descriptors expect, its cp.async loader, and dtype-dispatching wgmma calls.
// Header-only, device code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/device_utils.cuh"
#include "kernels/wgmma.cuh"

namespace sparge::kernels::detail {

template <typename T>
struct Wg;
template <>
struct Wg<__nv_bfloat16> {
  // scale_d = 0 ignores the accumulator's old contents (the first k-step of a fresh product).
  template <int N>
  static __device__ __forceinline__ void SS(float* d, uint64_t a, uint64_t b, int scale_d = 1) {
    if constexpr (N == 64) WgmmaSS_N64_Bf16(d, a, b, scale_d); else WgmmaSS_N128_Bf16(d, a, b, scale_d);
  }
  template <int N>
  static __device__ __forceinline__ void RS(float* d, const uint32_t* a, uint64_t b, int scale_d = 1) {
    if constexpr (N == 64) WgmmaRS_N64_Bf16(d, a, b, scale_d); else WgmmaRS_N128_Bf16(d, a, b, scale_d);
  }
};
template <>
struct Wg<__half> {
  template <int N>
  static __device__ __forceinline__ void SS(float* d, uint64_t a, uint64_t b, int scale_d = 1) {
    if constexpr (N == 64) WgmmaSS_N64_F16(d, a, b, scale_d); else WgmmaSS_N128_F16(d, a, b, scale_d);
  }
  template <int N>
  static __device__ __forceinline__ void RS(float* d, const uint32_t* a, uint64_t b, int scale_d = 1) {
    if constexpr (N == 64) WgmmaRS_N64_F16(d, a, b, scale_d); else WgmmaRS_N128_F16(d, a, b, scale_d);
  }
};

// Tile layout [D/64][ROWS][64] with the hardware's 128-byte swizzle (16-byte chunk ^= row % 8).
template <int ROWS>
__device__ __forceinline__ int Sw128(int row, int col_chunk) {
  return ((col_chunk >> 3) * ROWS + row) * 64 + (((col_chunk & 7) ^ (row & 7)) << 3);
}

template <typename T, int ROWS, int D, int kThreads>
__device__ __forceinline__ void LoadTileSw128(T* smem, const T* base, int64_t stride_l, int row0,
                                              int seqlen, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % kThreads == 0, "tile not divisible by threads");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const int grow = row0 + r;
    const bool ok = grow < seqlen;
    const T* src = ok ? base + static_cast<int64_t>(grow) * stride_l + c * 8 : base;
    CpAsync16(SmemAddr(smem + Sw128<ROWS>(r, c)), src, ok ? 16 : 0);
  }
}

}  // namespace sparge::kernels::detail
