// Hopper (sm_90a) block-sparse attention backward with warpgroup MMA: the same recomputation as
// the mma.sync kernels (block_sparse_bwd_dq.cu, block_sparse_bwd_dkv.cu), on 128B-swizzled shared
// tiles. dK/dV: one CTA per 64 or 128 keys (one warpgroup per 64 keys) walking the query blocks
// that keep them; S^T = K Q^T and dP^T = V dO^T from shared operands, dV += P^T dO and
// dK += dS^T Q with P^T / dS^T taken from registers. dQ: one CTA per 128 query rows (two
// warpgroups) walking the kept key blocks; dQ += dS K. Deterministic (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch_utils.h"
#include "kernels/bwd_internal.h"
#include "kernels/sm90_tiles.cuh"

namespace sparge::kernels::detail {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kM = 64;  // query rows per dK/dV inner tile; keys per dQ inner tile

// Descriptor of k-step ks (16 columns) of a K-major [D/64][rows][64] tile, from row `row0`.
__device__ __forceinline__ uint64_t KMajorDesc(uint32_t tile, int rows, int row0, int ks) {
  return MakeSmemDesc(tile + (ks >> 2) * rows * 128 + row0 * 128 + (ks & 3) * 32, 16, 1024);
}
// Descriptor of k-step kc (16 rows) of the same tile used as an MN-major (transposed) B operand.
__device__ __forceinline__ uint64_t MNMajorDesc(uint32_t tile, int rows, int kc) {
  return MakeSmemDesc(tile + kc * 16 * 128, rows * 128, 1024);
}

template <typename T>
__device__ __forceinline__ void PackA(uint32_t (*a)[4], const float* s) {
#pragma unroll
  for (int kc = 0; kc < kM / 16; ++kc) {
    a[kc][0] = MmaOp<T>::Pack(s[(2 * kc) * 4 + 0], s[(2 * kc) * 4 + 1]);
    a[kc][1] = MmaOp<T>::Pack(s[(2 * kc) * 4 + 2], s[(2 * kc) * 4 + 3]);
    a[kc][2] = MmaOp<T>::Pack(s[(2 * kc + 1) * 4 + 0], s[(2 * kc + 1) * 4 + 1]);
    a[kc][3] = MmaOp<T>::Pack(s[(2 * kc + 1) * 4 + 2], s[(2 * kc + 1) * 4 + 3]);
  }
}

template <typename T, int D, int kWG>
__global__ void __launch_bounds__(128 * kWG, 1) DkvSm90Kernel(BwdParams p) {
  constexpr int kThreads = 128 * kWG, kKeys = 64 * kWG;
  extern __shared__ unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sV = sK + kKeys * D;
  T* sQ = sV + kKeys * D;       // [2][D/64][kM][64]
  T* sdO = sQ + 2 * kM * D;     // [2][D/64][kM][64]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kM * D);  // [2][kM], log2 domain
  float* sDelta = sLse + 2 * kM;

  const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int k0 = kt * kKeys;
  const int kb = k0 / p.block_k;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int count = p.t_counts[bh * nk + kb];
  const int32_t* tlut = p.t_indices + (bh * nk + kb) * nq;
  const int subs = p.block_q / kM;
  const int ntiles = count * subs;

  const T* qbase = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
  const T* dobase = static_cast<const T*>(p.d_o.ptr) + b * p.d_o.stride_b + h * p.d_o.stride_h;
  const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;
  const float* lse = p.lse + bh * L;
  const float* delta = p.delta + bh * L;

  auto tile_q0 = [&](int t) { return tlut[t / subs] * p.block_q + (t % subs) * kM; };
  auto next_valid = [&](int t) {
    while (t < ntiles && tile_q0(t) >= L) ++t;
    return t;
  };
  auto load_q_tile = [&](int stage, int qs) {
    LoadTileSw128<T, kM, D, kThreads>(sQ + stage * kM * D, qbase, p.q.stride_l, qs, L, tid);
    LoadTileSw128<T, kM, D, kThreads>(sdO + stage * kM * D, dobase, p.d_o.stride_l, qs, L, tid);
    if (tid < kM) {
      const int row = qs + tid;
      sLse[stage * kM + tid] = row < L ? lse[row] * kLog2e : INFINITY;  // P = 0 past L
      sDelta[stage * kM + tid] = row < L ? delta[row] : 0.f;
    }
  };

  LoadTileSw128<T, kKeys, D, kThreads>(sK, kbase, p.k.stride_l, k0, L, tid);
  LoadTileSw128<T, kKeys, D, kThreads>(sV, vbase, p.v.stride_l, k0, L, tid);
  int t = next_valid(0);
  if (t < ntiles) load_q_tile(0, tile_q0(t));
  CpAsyncCommit();
  CpAsyncWaitAll();
  FenceProxyAsync();
  __syncthreads();

  const uint32_t k_addr = SmemAddr(sK), v_addr = SmemAddr(sV);
  const int tig = lane & 3, g = lane >> 2;
  const float scale_log2 = p.scale * kLog2e;
  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

  int stage = 0;
  while (t < ntiles) {
    const int tn = next_valid(t + 1);
    if (tn < ntiles) load_q_tile(stage ^ 1, tile_q0(tn));
    CpAsyncCommit();
    const uint32_t q_addr = SmemAddr(sQ + stage * kM * D), do_addr = SmemAddr(sdO + stage * kM * D);
    const float* cL = sLse + stage * kM;
    const float* cD = sDelta + stage * kM;

    float s[kM / 2], dp[kM / 2];
#pragma unroll
    for (int i = 0; i < kM / 2; ++i) s[i] = dp[i] = 0.f;
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      Wg<T>::template SS<kM>(s, KMajorDesc(k_addr, kKeys, wg * 64, ks), KMajorDesc(q_addr, kM, 0, ks));
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      Wg<T>::template SS<kM>(dp, KMajorDesc(v_addr, kKeys, wg * 64, ks), KMajorDesc(do_addr, kM, 0, ks));
    WgmmaCommit();
    WgmmaWait0();
#pragma unroll
    for (int nt = 0; nt < kM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * tig + (e & 1);
        const float pr = exp2f(s[nt * 4 + e] * scale_log2 - cL[col]);
        s[nt * 4 + e] = pr;
        dp[nt * 4 + e] = pr * (dp[nt * 4 + e] - cD[col]);
      }
    }
    uint32_t pa[kM / 16][4], da[kM / 16][4];
    PackA<T>(pa, s);
    PackA<T>(da, dp);
    WgmmaFence();
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc) {
      Wg<T>::template RS<D>(dv, pa[kc], MNMajorDesc(do_addr, kM, kc));
      Wg<T>::template RS<D>(dk, da[kc], MNMajorDesc(q_addr, kM, kc));
    }
    WgmmaCommit();
    WgmmaWait0();
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  T* dkbase = static_cast<T*>(p.dk.ptr) + b * p.dk.stride_b + h * p.dk.stride_h;
  T* dvbase = static_cast<T*>(p.dv.ptr) + b * p.dv.stride_b + h * p.dv.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = k0 + wg * 64 + warp * 16 + g + 8 * r;
    if (row < L) {
      T* krow = dkbase + static_cast<int64_t>(row) * p.dk.stride_l;
      T* vrow = dvbase + static_cast<int64_t>(row) * p.dv.stride_l;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(krow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(dk[nt * 4 + 2 * r] * p.scale, dk[nt * 4 + 2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(vrow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(dv[nt * 4 + 2 * r], dv[nt * 4 + 2 * r + 1]);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(256, 1) DqSm90Kernel(BwdParams p) {
  constexpr int kThreads = 256;
  extern __shared__ unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sdO = sQ + kTileQ * D;
  T* sK = sdO + kTileQ * D;  // [2][D/64][kM][64]
  T* sV = sK + 2 * kM * D;   // [2][D/64][kM][64]

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int q0 = qb * kTileQ;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int count = p.counts[bh * nq + qb];
  const int32_t* lut = p.indices + (bh * nq + qb) * nk;
  const int subs = p.block_k / kM;
  const int ntiles = count * subs;

  const T* qbase = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
  const T* dobase = static_cast<const T*>(p.d_o.ptr) + b * p.d_o.stride_b + h * p.d_o.stride_h;
  const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;

  auto tile_key0 = [&](int t) { return lut[t / subs] * p.block_k + (t % subs) * kM; };
  auto next_valid = [&](int t) {
    while (t < ntiles && tile_key0(t) >= L) ++t;
    return t;
  };

  LoadTileSw128<T, kTileQ, D, kThreads>(sQ, qbase + static_cast<int64_t>(q0) * p.q.stride_l,
                                        p.q.stride_l, 0, L - q0, tid);
  LoadTileSw128<T, kTileQ, D, kThreads>(sdO, dobase + static_cast<int64_t>(q0) * p.d_o.stride_l,
                                        p.d_o.stride_l, 0, L - q0, tid);
  int t = next_valid(0);
  if (t < ntiles) {
    const int k0 = tile_key0(t);
    LoadTileSw128<T, kM, D, kThreads>(sK, kbase, p.k.stride_l, k0, L, tid);
    LoadTileSw128<T, kM, D, kThreads>(sV, vbase, p.v.stride_l, k0, L, tid);
  }
  CpAsyncCommit();

  const int g = lane >> 2, tig = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + wg * 64 + warp * 16 + g + 8 * r;
    lse2[r] = row < L ? p.lse[bh * L + row] * kLog2e : 0.f;
    dlt[r] = row < L ? p.delta[bh * L + row] : 0.f;
  }
  float dq[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
  CpAsyncWaitAll();
  FenceProxyAsync();
  __syncthreads();
  const uint32_t q_addr = SmemAddr(sQ), do_addr = SmemAddr(sdO);

  int stage = 0;
  while (t < ntiles) {
    const int k0 = tile_key0(t);
    const int tn = next_valid(t + 1);
    if (tn < ntiles) {
      const int kn = tile_key0(tn);
      LoadTileSw128<T, kM, D, kThreads>(sK + (stage ^ 1) * kM * D, kbase, p.k.stride_l, kn, L, tid);
      LoadTileSw128<T, kM, D, kThreads>(sV + (stage ^ 1) * kM * D, vbase, p.v.stride_l, kn, L, tid);
    }
    CpAsyncCommit();
    const uint32_t k_addr = SmemAddr(sK + stage * kM * D), v_addr = SmemAddr(sV + stage * kM * D);

    float s[kM / 2], dp[kM / 2];
#pragma unroll
    for (int i = 0; i < kM / 2; ++i) s[i] = dp[i] = 0.f;
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      Wg<T>::template SS<kM>(s, KMajorDesc(q_addr, kTileQ, wg * 64, ks), KMajorDesc(k_addr, kM, 0, ks));
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      Wg<T>::template SS<kM>(dp, KMajorDesc(do_addr, kTileQ, wg * 64, ks), KMajorDesc(v_addr, kM, 0, ks));
    WgmmaCommit();
    WgmmaWait0();
#pragma unroll
    for (int nt = 0; nt < kM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pr = exp2f(s[nt * 4 + e] * scale_log2 - lse2[r]);
        if (k0 + nt * 8 + 2 * tig + (e & 1) >= L) pr = 0.f;
        s[nt * 4 + e] = pr * (dp[nt * 4 + e] - dlt[r]);  // dS
      }
    }
    uint32_t da[kM / 16][4];
    PackA<T>(da, s);
    WgmmaFence();
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc) Wg<T>::template RS<D>(dq, da[kc], MNMajorDesc(k_addr, kM, kc));
    WgmmaCommit();
    WgmmaWait0();
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  T* dqbase = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + wg * 64 + warp * 16 + g + 8 * r;
    if (row < L) {
      T* drow = dqbase + static_cast<int64_t>(row) * p.dq.stride_l;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(drow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(dq[nt * 4 + 2 * r] * p.scale, dq[nt * 4 + 2 * r + 1] * p.scale);
      }
    }
  }
}

template <typename T, int D, int kWG>
cudaError_t LaunchDkv(const BwdParams& p, cudaStream_t stream) {
  constexpr int smem = (2 * 64 * kWG * D + 4 * kM * D) * 2 + 4 * kM * 4 + 1024;
  auto kernel = DkvSm90Kernel<T, D, kWG>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, 64 * kWG), p.heads, p.batch);
  kernel<<<grid, 128 * kWG, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t LaunchDq(const BwdParams& p, cudaStream_t stream) {
  constexpr int smem = (2 * kTileQ * D + 4 * kM * D) * 2 + 1024;
  auto kernel = DqSm90Kernel<T, D>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, kTileQ), p.heads, p.batch);
  kernel<<<grid, 256, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t Launch(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err = p.block_k % 128 == 0 ? LaunchDkv<T, D, 2>(p, stream) : LaunchDkv<T, D, 1>(p, stream);
  if (err != cudaSuccess) return err;
  return LaunchDq<T, D>(p, stream);
}

}  // namespace

cudaError_t LaunchBwdSm90(const BwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) {
    return p.head_dim == 128 ? Launch<__nv_bfloat16, 128>(p, stream)
                             : Launch<__nv_bfloat16, 64>(p, stream);
  }
  return p.head_dim == 128 ? Launch<__half, 128>(p, stream) : Launch<__half, 64>(p, stream);
}

}  // namespace sparge::kernels::detail
