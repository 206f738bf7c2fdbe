// Block-sparse attention backward, dK/dV part, plus the delta = rowsum(dO * O) pre-pass and the
// public backward launcher. One CTA per (64-key tile, head, batch), 4 warps of 16 key rows, walks
// the query blocks that keep this key block (transposed LUT) in 64-row tiles and accumulates
// dV = P^T dO and dK = scale * dS^T Q in registers. Deterministic (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch_utils.h"
#include "kernels/bwd_internal.h"
#include "kernels/device_utils.cuh"

namespace sparge::kernels {
namespace detail {
namespace {

constexpr int kTileM = 64;  // query rows per inner tile
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int kKeys>
constexpr int DkvSmemBytes() {
  return (2 * kKeys * D + 4 * kTileM * D) * 2 + 4 * kTileM * 4;
}

// kKeys = 64 or 128 keys per CTA (one warp per 16 keys); 128 when the mask's key blocks are 128
// wide, so each Q/dO tile loaded serves twice the keys and the SM runs 8 warps instead of 4.
template <typename T, int D, int kKeys>
__global__ void __launch_bounds__(kKeys * 2, 1) BwdDkvKernel(BwdParams p) {
  constexpr int kThreads = kKeys * 2;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kKeys * D;
  T* sQ = sV + kKeys * D;         // [2][kTileM][D]
  T* sdO = sQ + 2 * kTileM * D;   // [2][kTileM][D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kTileM * D);  // [2][kTileM], log2 domain
  float* sDelta = sLse + 2 * kTileM;                                // [2][kTileM]

  const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int k0 = kt * kKeys;
  const int kb = k0 / p.block_k;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int count = p.t_counts[bh * nk + kb];
  const int32_t* tlut = p.t_indices + (bh * nk + kb) * nq;
  const int subs = p.block_q / kTileM;
  const int ntiles = count * subs;

  const T* qbase = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
  const T* dobase = static_cast<const T*>(p.d_o.ptr) + b * p.d_o.stride_b + h * p.d_o.stride_h;
  const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;
  const float* lse = p.lse + bh * L;
  const float* delta = p.delta + bh * L;

  auto tile_q0 = [&](int t) { return tlut[t / subs] * p.block_q + (t % subs) * kTileM; };
  auto next_valid = [&](int t) {
    while (t < ntiles && tile_q0(t) >= L) ++t;
    return t;
  };
  auto load_q_tile = [&](int stage, int qs) {
    LoadTile<T, kTileM, D, kThreads>(sQ + stage * kTileM * D, qbase, p.q.stride_l, qs, L, tid);
    LoadTile<T, kTileM, D, kThreads>(sdO + stage * kTileM * D, dobase, p.d_o.stride_l, qs, L, tid);
    if (tid < kTileM) {
      const int row = qs + tid;
      // Rows past L get lse = +inf, so their P (and dS) is exactly zero.
      sLse[stage * kTileM + tid] = row < L ? lse[row] * kLog2e : INFINITY;
      sDelta[stage * kTileM + tid] = row < L ? delta[row] : 0.f;
    }
  };

  LoadTile<T, kKeys, D, kThreads>(sK, kbase, p.k.stride_l, k0, L, tid);
  LoadTile<T, kKeys, D, kThreads>(sV, vbase, p.v.stride_l, k0, L, tid);
  int t = next_valid(0);
  if (t < ntiles) load_q_tile(0, tile_q0(t));
  CpAsyncCommit();
  CpAsyncWaitAll();
  __syncthreads();

  const int g = lane >> 2, tig = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  int stage = 0;
  while (t < ntiles) {
    const int tn = next_valid(t + 1);
    if (tn < ntiles) load_q_tile(stage ^ 1, tile_q0(tn));
    CpAsyncCommit();
    const T* cQ = sQ + stage * kTileM * D;
    const T* cdO = sdO + stage * kTileM * D;
    const float* cL = sLse + stage * kTileM;
    const float* cD = sDelta + stage * kTileM;

    // S^T (16 keys x 64 queries per warp) and dP^T = V dO^T.
    float s[kTileM / 8][4], dp[kTileM / 8][4];
#pragma unroll
    for (int i = 0; i < kTileM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t ka[4], va[4];
      LoadA<D>(ka, sK, warp * 16, kc, lane);
      LoadA<D>(va, sV, warp * 16, kc, lane);
#pragma unroll
      for (int np = 0; np < kTileM / 16; ++np) {
        uint32_t bf[4];
        LoadBNK<D>(bf, cQ, np * 16, kc, lane);
        MmaOp<T>::Run(s[2 * np], ka, bf[0], bf[1]);
        MmaOp<T>::Run(s[2 * np + 1], ka, bf[2], bf[3]);
        LoadBNK<D>(bf, cdO, np * 16, kc, lane);
        MmaOp<T>::Run(dp[2 * np], va, bf[0], bf[1]);
        MmaOp<T>::Run(dp[2 * np + 1], va, bf[2], bf[3]);
      }
    }
    // P^T into s, dS^T into dp.
#pragma unroll
    for (int nt = 0; nt < kTileM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * tig + (e & 1);
        const float pr = exp2f(s[nt][e] * scale_log2 - cL[col]);
        s[nt][e] = pr;
        dp[nt][e] = pr * (dp[nt][e] - cD[col]);
      }
    }
#pragma unroll
    for (int kc = 0; kc < kTileM / 16; ++kc) {
      uint32_t pa[4] = {MmaOp<T>::Pack(s[2 * kc][0], s[2 * kc][1]),
                        MmaOp<T>::Pack(s[2 * kc][2], s[2 * kc][3]),
                        MmaOp<T>::Pack(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                        MmaOp<T>::Pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
      uint32_t da[4] = {MmaOp<T>::Pack(dp[2 * kc][0], dp[2 * kc][1]),
                        MmaOp<T>::Pack(dp[2 * kc][2], dp[2 * kc][3]),
                        MmaOp<T>::Pack(dp[2 * kc + 1][0], dp[2 * kc + 1][1]),
                        MmaOp<T>::Pack(dp[2 * kc + 1][2], dp[2 * kc + 1][3])};
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bf[4];
        LoadBKN<D>(bf, cdO, kc * 16, np, lane);
        MmaOp<T>::Run(dv[2 * np], pa, bf[0], bf[1]);
        MmaOp<T>::Run(dv[2 * np + 1], pa, bf[2], bf[3]);
        LoadBKN<D>(bf, cQ, kc * 16, np, lane);
        MmaOp<T>::Run(dk[2 * np], da, bf[0], bf[1]);
        MmaOp<T>::Run(dk[2 * np + 1], da, bf[2], bf[3]);
      }
    }
    CpAsyncWaitAll();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  T* dkbase = static_cast<T*>(p.dk.ptr) + b * p.dk.stride_b + h * p.dk.stride_h;
  T* dvbase = static_cast<T*>(p.dv.ptr) + b * p.dv.stride_b + h * p.dv.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = k0 + warp * 16 + g + 8 * r;
    if (row < L) {
      T* krow = dkbase + static_cast<int64_t>(row) * p.dk.stride_l;
      T* vrow = dvbase + static_cast<int64_t>(row) * p.dv.stride_l;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(krow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(dk[nt][2 * r] * p.scale, dk[nt][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(vrow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(dv[nt][2 * r], dv[nt][2 * r + 1]);
      }
    }
  }
}

// delta[b][h][l] = sum_d dO * O: D/8 lanes per (b, l, h) row with 16-byte loads.
template <typename T, int D>
__global__ void __launch_bounds__(256) DeltaKernel(BwdParams p) {
  constexpr int kLanes = D / 8;
  const int64_t row_id = (static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x) / kLanes;
  const int sub = threadIdx.x % kLanes;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
  const bool ok = row_id < total;
  const int64_t rid = ok ? row_id : 0;
  const int h = rid % p.heads;
  const int64_t bl = rid / p.heads;
  const int l = bl % p.seqlen;
  const int b = bl / p.seqlen;
  const T* o = static_cast<const T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h +
               static_cast<int64_t>(l) * p.o.stride_l + sub * 8;
  const T* d = static_cast<const T*>(p.d_o.ptr) + b * p.d_o.stride_b + h * p.d_o.stride_h +
               static_cast<int64_t>(l) * p.d_o.stride_l + sub * 8;
  const float acc = LaneGroupSum<kLanes>(RowDotPartial8(o, d));
  if (ok && sub == 0) p.delta[(static_cast<int64_t>(b) * p.heads + h) * p.seqlen + l] = acc;
}

template <typename T, int D, int kKeys>
cudaError_t LaunchDkvN(const BwdParams& p, cudaStream_t stream) {
  constexpr int smem = DkvSmemBytes<D, kKeys>();
  auto kernel = BwdDkvKernel<T, D, kKeys>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, kKeys), p.heads, p.batch);
  kernel<<<grid, kKeys * 2, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t LaunchDkv(const BwdParams& p, cudaStream_t stream) {
  return p.block_k % 128 == 0 ? LaunchDkvN<T, D, 128>(p, stream) : LaunchDkvN<T, D, 64>(p, stream);
}

template <typename T, int D>
cudaError_t LaunchDelta(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
  const int64_t threads = rows * (D / 8);
  return LaunchKernel(DeltaKernel<T, D>, static_cast<unsigned>((threads + 255) / 256), 256, 0, stream, p);
}

}  // namespace

cudaError_t LaunchBwdDelta(const BwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) {
    return p.head_dim == 128 ? LaunchDelta<__nv_bfloat16, 128>(p, stream) : LaunchDelta<__nv_bfloat16, 64>(p, stream);
  }
  return p.head_dim == 128 ? LaunchDelta<__half, 128>(p, stream) : LaunchDelta<__half, 64>(p, stream);
}

cudaError_t LaunchBwdDkv(const BwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) {
    return p.head_dim == 128 ? LaunchDkv<__nv_bfloat16, 128>(p, stream)
                             : LaunchDkv<__nv_bfloat16, 64>(p, stream);
  }
  return p.head_dim == 128 ? LaunchDkv<__half, 128>(p, stream) : LaunchDkv<__half, 64>(p, stream);
}

}  // namespace detail

const char* CanImplementBwd(const BwdParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.block_q != kTileQ) return "block_q must be 128";
  if (p.block_k % kTileK != 0 || p.block_k <= 0) return "block_k must be a multiple of 64";
  if (p.batch <= 0 || p.heads <= 0 || p.seqlen <= 0) return "empty problem";
  if (p.batch > 65535 || p.heads > 65535) return "batch/heads too large for the grid";
  const Tensor4* ts[] = {&p.q, &p.k, &p.v, &p.o, &p.d_o, &p.dq, &p.dk, &p.dv};
  for (const Tensor4* t : ts) {
    if (t->ptr == nullptr || reinterpret_cast<uintptr_t>(t->ptr) % 16 != 0)
      return "tensor not 16-byte aligned";
    if (t->stride_l % 8 != 0 || t->stride_h % 8 != 0 || t->stride_b % 8 != 0)
      return "strides must be multiples of 8 elements";
  }
  if (!p.counts || !p.indices || !p.t_counts || !p.t_indices || !p.lse || !p.delta)
    return "mask, lse or delta pointer missing";
  return nullptr;
}

cudaError_t LaunchBlockSparseBwd(const BwdParams& p, cudaStream_t stream) {
  if (CanImplementBwd(p) != nullptr) return cudaErrorInvalidValue;
  if (p.impl == FwdImpl::kWgmma) return detail::LaunchBwdSm90(p, stream);
  cudaError_t err = detail::LaunchBwdDelta(p, stream);
  if (err != cudaSuccess) return err;
  err = detail::LaunchBwdDkv(p, stream);
  if (err != cudaSuccess) return err;
  return detail::LaunchBwdDq(p, stream);
}

}  // namespace sparge::kernels
