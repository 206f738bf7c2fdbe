// Device helpers shared by the SpargeAttention2 kernels: mma.sync / ldmatrix / cp.async wrappers,
// the XOR-swizzled shared-memory tile layout and bf16/fp16 packing. Header-only, device code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sparge::kernels::detail {

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  // D += A * B, m16n8k16, fp32 accumulation.
  static __device__ __forceinline__ void Run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
};

template <>
struct MmaOp<__half> {
  static __device__ __forceinline__ void Run(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte async global->shared copy; src_bytes == 0 zero-fills (rows past the sequence end).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Element offset of (row, 8-element chunk) in a [rows][D] tile whose 16-byte chunks are XOR-
// swizzled by the row: ldmatrix reads 8 rows of one chunk, which then hit 8 distinct bank groups.
template <int D>
__device__ __forceinline__ int Swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copies rows [row0, row0 + ROWS) of a strided [L][D] matrix into a swizzled smem tile; rows at
// or past seqlen are zero-filled.
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void LoadTile(T* smem, const T* base, int64_t stride_l, int row0,
                                         int seqlen, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % THREADS == 0, "tile not divisible by threads");
#pragma unroll
  for (int it = 0; it < kTotal / THREADS; ++it) {
    int idx = tid + it * THREADS;
    int r = idx / kChunks, c = idx % kChunks;
    int grow = row0 + r;
    bool ok = grow < seqlen;
    const T* src = ok ? base + static_cast<int64_t>(grow) * stride_l + c * 8 : base;
    CpAsync16(SmemAddr(smem + Swz<D>(r, c)), src, ok ? 16 : 0);
  }
}

__device__ __forceinline__ float QuadMax(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float QuadSum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// delta = rowsum(dO * O) of one row with kLanes lanes of 8 elements each (16-byte loads): the
// lane's partial over its 8 elements in order, then a butterfly over the lanes. Shared by
// DeltaKernel and the prep kernel that computes delta itself, so both give the same bits. All
// 32 lanes of the warp must call LaneGroupSum.
template <typename T>
__device__ __forceinline__ float RowDotPartial8(const T* o, const T* d) {
  const uint4 ov = *reinterpret_cast<const uint4*>(o);
  const uint4 dv = *reinterpret_cast<const uint4*>(d);
  const T* oe = reinterpret_cast<const T*>(&ov);
  const T* de = reinterpret_cast<const T*>(&dv);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc += MmaOp<T>::ToFloat(oe[i]) * MmaOp<T>::ToFloat(de[i]);
  return acc;
}
template <int kLanes>
__device__ __forceinline__ float LaneGroupSum(float x) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffff, x, off);
  return x;
}

// Fragment loaders for a 16-row slice of a swizzled [rows][D] tile.
// A operand (rows = M, cols = K chunk kc of 16): a0..a3 of mma.m16n8k16.
template <int D>
__device__ __forceinline__ void LoadA(uint32_t* a, const void* tile, int row0, int kc, int lane) {
  int r = row0 + (lane & 15);
  int c = kc * 2 + (lane >> 4);
  LdMatrixX4(a, SmemAddr(static_cast<const uint16_t*>(tile) + Swz<D>(r, c)));
}
// B operand where the tile is stored [N][K] (B = tile^T): two n-tiles of 8 (rows n0..n0+15) for
// K chunk kc: b[0], b[1] -> n-tile n0; b[2], b[3] -> n-tile n0 + 8.
template <int D>
__device__ __forceinline__ void LoadBNK(uint32_t* b, const void* tile, int n0, int kc, int lane) {
  int r = n0 + ((lane >> 4) << 3) + (lane & 7);
  int c = kc * 2 + ((lane >> 3) & 1);
  LdMatrixX4(b, SmemAddr(static_cast<const uint16_t*>(tile) + Swz<D>(r, c)));
}
// B operand where the tile is stored [K][N] (rows = K): K rows k0..k0+15, columns (N) chunk pair
// starting at 8-element chunk 2 * np: b[0], b[1] -> n-tile 2np; b[2], b[3] -> n-tile 2np + 1.
template <int D>
__device__ __forceinline__ void LoadBKN(uint32_t* b, const void* tile, int k0, int np, int lane) {
  int r = k0 + (((lane >> 3) & 1) << 3) + (lane & 7);
  int c = np * 2 + (lane >> 4);
  LdMatrixX4Trans(b, SmemAddr(static_cast<const uint16_t*>(tile) + Swz<D>(r, c)));
}

}  // namespace sparge::kernels::detail
