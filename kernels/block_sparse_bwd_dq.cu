// Block-sparse attention backward, dQ part: one CTA per (query tile of 128 rows, head, batch)
// walks the same kept key blocks as the forward pass and recomputes P = exp(S - lse) to form
// dS = P * (dO V^T - delta); dQ = scale * dS K. Deterministic (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch_utils.h"
#include "kernels/bwd_internal.h"
#include "kernels/device_utils.cuh"

namespace sparge::kernels::detail {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr int DqSmemBytes() {
  return (2 * kTileQ * D + 4 * kTileK * D) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) BwdDqKernel(BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kTileQ * D;
  T* sK = sdO + kTileQ * D;     // [2][kTileK][D]
  T* sV = sK + 2 * kTileK * D;  // [2][kTileK][D]

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int q0 = qb * kTileQ;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int count = p.counts[bh * nq + qb];
  const int32_t* lut = p.indices + (bh * nq + qb) * nk;
  const int subs = p.block_k / kTileK;
  const int ntiles = count * subs;

  const T* qbase = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
  const T* dobase = static_cast<const T*>(p.d_o.ptr) + b * p.d_o.stride_b + h * p.d_o.stride_h;
  const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;

  auto tile_key0 = [&](int t) { return lut[t / subs] * p.block_k + (t % subs) * kTileK; };
  auto next_valid = [&](int t) {
    while (t < ntiles && tile_key0(t) >= L) ++t;
    return t;
  };

  LoadTile<T, kTileQ, D, kThreads>(sQ, qbase + static_cast<int64_t>(q0) * p.q.stride_l,
                                   p.q.stride_l, 0, L - q0, tid);
  LoadTile<T, kTileQ, D, kThreads>(sdO, dobase + static_cast<int64_t>(q0) * p.d_o.stride_l,
                                   p.d_o.stride_l, 0, L - q0, tid);
  int t = next_valid(0);
  if (t < ntiles) {
    int k0 = tile_key0(t);
    LoadTile<T, kTileK, D, kThreads>(sK, kbase, p.k.stride_l, k0, L, tid);
    LoadTile<T, kTileK, D, kThreads>(sV, vbase, p.v.stride_l, k0, L, tid);
  }
  CpAsyncCommit();

  const int g = lane >> 2, tig = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int row = q0 + warp * 16 + g + 8 * r;
    lse2[r] = row < L ? p.lse[bh * L + row] * kLog2e : 0.f;
    dlt[r] = row < L ? p.delta[bh * L + row] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  CpAsyncWaitAll();
  __syncthreads();

  int stage = 0;
  while (t < ntiles) {
    const int k0 = tile_key0(t);
    const int tn = next_valid(t + 1);
    if (tn < ntiles) {
      int kn = tile_key0(tn);
      LoadTile<T, kTileK, D, kThreads>(sK + (stage ^ 1) * kTileK * D, kbase, p.k.stride_l, kn, L,
                                       tid);
      LoadTile<T, kTileK, D, kThreads>(sV + (stage ^ 1) * kTileK * D, vbase, p.v.stride_l, kn, L,
                                       tid);
    }
    CpAsyncCommit();
    const T* cK = sK + stage * kTileK * D;
    const T* cV = sV + stage * kTileK * D;

    float s[kTileK / 8][4], dp[kTileK / 8][4];
#pragma unroll
    for (int i = 0; i < kTileK / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t qa[4], da[4];
      LoadA<D>(qa, sQ, warp * 16, kc, lane);
      LoadA<D>(da, sdO, warp * 16, kc, lane);
#pragma unroll
      for (int np = 0; np < kTileK / 16; ++np) {
        uint32_t bf[4];
        LoadBNK<D>(bf, cK, np * 16, kc, lane);
        MmaOp<T>::Run(s[2 * np], qa, bf[0], bf[1]);
        MmaOp<T>::Run(s[2 * np + 1], qa, bf[2], bf[3]);
        LoadBNK<D>(bf, cV, np * 16, kc, lane);
        MmaOp<T>::Run(dp[2 * np], da, bf[0], bf[1]);
        MmaOp<T>::Run(dp[2 * np + 1], da, bf[2], bf[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kTileK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pr = exp2f(s[nt][e] * scale_log2 - lse2[r]);
        if (k0 + nt * 8 + 2 * tig + (e & 1) >= L) pr = 0.f;
        s[nt][e] = pr * (dp[nt][e] - dlt[r]);  // dS
      }
    }
#pragma unroll
    for (int kc = 0; kc < kTileK / 16; ++kc) {
      uint32_t pa[4] = {MmaOp<T>::Pack(s[2 * kc][0], s[2 * kc][1]),
                        MmaOp<T>::Pack(s[2 * kc][2], s[2 * kc][3]),
                        MmaOp<T>::Pack(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                        MmaOp<T>::Pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bf[4];
        LoadBKN<D>(bf, cK, kc * 16, np, lane);
        MmaOp<T>::Run(dq[2 * np], pa, bf[0], bf[1]);
        MmaOp<T>::Run(dq[2 * np + 1], pa, bf[2], bf[3]);
      }
    }
    CpAsyncWaitAll();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  T* dqbase = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row < L) {
      T* drow = dqbase + static_cast<int64_t>(row) * p.dq.stride_l;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(drow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(dq[nt][2 * r] * p.scale, dq[nt][2 * r + 1] * p.scale);
      }
    }
  }
}

template <typename T, int D>
cudaError_t Launch(const BwdParams& p, cudaStream_t stream) {
  constexpr int smem = DqSmemBytes<D>();
  auto kernel = BwdDqKernel<T, D>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, kTileQ), p.heads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchBwdDq(const BwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) {
    return p.head_dim == 128 ? Launch<__nv_bfloat16, 128>(p, stream)
                             : Launch<__nv_bfloat16, 64>(p, stream);
  }
  return p.head_dim == 128 ? Launch<__half, 128>(p, stream) : Launch<__half, 64>(p, stream);
}

}  // namespace sparge::kernels::detail
