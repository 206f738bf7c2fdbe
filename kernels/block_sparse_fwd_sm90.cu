// Hopper (sm_90a) block-sparse attention forward: warpgroup MMA (wgmma) on 128B-swizzled shared
// tiles filled by cp.async double buffering. One CTA per (128 query rows, head, batch); two
// warpgroups of 64 rows each share the K/V tiles. S = Q K^T uses shared-memory operands; O += P V
// takes P straight from registers (same fragment layout as the S accumulator) and V as an
// MN-major (transposed) operand, so neither P nor V^T is ever written to shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch_utils.h"
#include "kernels/device_utils.cuh"
#include "kernels/fwd_internal.h"
#include "kernels/sm90_tiles.cuh"

namespace sparge::kernels::detail {
namespace {

constexpr int kThreads = 256;  // two warpgroups
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int kN>
constexpr int SmemBytes() {
  return (kTileQ * D + 4 * kN * D) * 2 + 1024;  // + alignment slack
}

// kN: keys per tile. 128: fewer softmax rounds and wider MMAs, one CTA per SM (registers).
// 64: small enough (registers, ~97 KB shared) for two CTAs per SM, whose softmax and MMA phases
// then overlap.
template <typename T, int D, int kN>
__global__ void __launch_bounds__(kThreads, kN == 64 ? 2 : 1) FwdSm90Kernel(FwdParams p) {
  extern __shared__ unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sK = sQ + kTileQ * D;  // [2][D/64][kN][64]
  T* sV = sK + 2 * kN * D;  // [2][D/64][kN][64]

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int q0 = qb * kTileQ;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int count = p.counts[bh * nq + qb];
  const int32_t* lut = p.indices + (bh * nq + qb) * nk;
  const int subs = p.block_k / kN;
  const int ntiles = count * subs;

  const T* qbase = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
  const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;

  auto tile_key0 = [&](int t) { return lut[t / subs] * p.block_k + (t % subs) * kN; };
  auto next_valid = [&](int t) {
    while (t < ntiles && tile_key0(t) >= L) ++t;
    return t;
  };

  LoadTileSw128<T, kTileQ, D, kThreads>(sQ, qbase + static_cast<int64_t>(q0) * p.q.stride_l, p.q.stride_l, 0,
                              L - q0, tid);
  int t = next_valid(0);
  if (t < ntiles) {
    const int k0 = tile_key0(t);
    LoadTileSw128<T, kN, D, kThreads>(sK, kbase, p.k.stride_l, k0, L, tid);
    LoadTileSw128<T, kN, D, kThreads>(sV, vbase, p.v.stride_l, k0, L, tid);
  }
  CpAsyncCommit();
  CpAsyncWaitAll();
  FenceProxyAsync();
  __syncthreads();

  const uint32_t q_addr = SmemAddr(sQ) + wg * 64 * 128;  // this warpgroup's 64 rows
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  const int tig = lane & 3;

  int stage = 0;
  while (t < ntiles) {
    const int k0 = tile_key0(t);
    const int tn = next_valid(t + 1);
    if (tn < ntiles) {
      const int kn = tile_key0(tn);
      LoadTileSw128<T, kN, D, kThreads>(sK + (stage ^ 1) * kN * D, kbase, p.k.stride_l, kn, L, tid);
      LoadTileSw128<T, kN, D, kThreads>(sV + (stage ^ 1) * kN * D, vbase, p.v.stride_l, kn, L, tid);
    }
    CpAsyncCommit();
    const uint32_t k_addr = SmemAddr(sK + stage * kN * D);
    const uint32_t v_addr = SmemAddr(sV + stage * kN * D);

    float s[kN / 2];
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) s[i] = 0.f;
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      // K-major: 16 columns = 32 bytes inside a 128-byte row; next 64 columns = next block.
      const uint32_t col_off = (ks & 3) * 32;
      const uint64_t da = MakeSmemDesc(q_addr + (ks >> 2) * kTileQ * 128 + col_off, 16, 1024);
      const uint64_t db = MakeSmemDesc(k_addr + (ks >> 2) * kN * 128 + col_off, 16, 1024);
      Wg<T>::template SS<kN>(s, da, db);
    }
    WgmmaCommit();
    WgmmaWait0();

    if (k0 + kN > L) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (k0 + nt * 8 + 2 * tig + (e & 1) >= L) s[nt * 4 + e] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt * 4 + 2 * r], s[nt * 4 + 2 * r + 1]));
      mx = QuadMax(mx) * scale_log2;
      const float mnew = fmaxf(m[r], mx);
      const float alpha = exp2f(m[r] - mnew);
      m[r] = mnew;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        s[nt * 4 + 2 * r] = exp2f(s[nt * 4 + 2 * r] * scale_log2 - mnew);
        s[nt * 4 + 2 * r + 1] = exp2f(s[nt * 4 + 2 * r + 1] * scale_log2 - mnew);
        sum += s[nt * 4 + 2 * r] + s[nt * 4 + 2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt * 4 + 2 * r] *= alpha;
        o[nt * 4 + 2 * r + 1] *= alpha;
      }
    }
    uint32_t pa[kN / 16][4];
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) {
      pa[kc][0] = MmaOp<T>::Pack(s[(2 * kc) * 4 + 0], s[(2 * kc) * 4 + 1]);
      pa[kc][1] = MmaOp<T>::Pack(s[(2 * kc) * 4 + 2], s[(2 * kc) * 4 + 3]);
      pa[kc][2] = MmaOp<T>::Pack(s[(2 * kc + 1) * 4 + 0], s[(2 * kc + 1) * 4 + 1]);
      pa[kc][3] = MmaOp<T>::Pack(s[(2 * kc + 1) * 4 + 2], s[(2 * kc + 1) * 4 + 3]);
    }
    WgmmaFence();
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) {
      // MN-major V: 16 key rows = 2048 bytes per step; 64-column blocks kN*128 bytes apart.
      const uint64_t dv = MakeSmemDesc(v_addr + kc * 16 * 128, kN * 128, 1024);
      Wg<T>::template RS<D>(o, pa[kc], dv);
    }
    WgmmaCommit();
    WgmmaWait0();

    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  T* obase = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
  const int g = lane >> 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = QuadSum(l[r]);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    const int row = q0 + wg * 64 + warp * 16 + g + 8 * r;
    if (row < L) {
      T* orow = obase + static_cast<int64_t>(row) * p.o.stride_l;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(o[nt * 4 + 2 * r] * inv, o[nt * 4 + 2 * r + 1] * inv);
      }
      if (tig == 0) p.lse[bh * L + row] = lsum > 0.f ? (m[r] + log2f(lsum)) / kLog2e : -INFINITY;
    }
  }
}

// Pipelined variant (kN = 128, three K/V stages): S for the next tile is issued on the tensor
// cores before the softmax of the current tile runs on the CUDA cores, hiding one of the two
// GEMMs behind the exponentials (FlashAttention-3's intra-warpgroup overlap, without warp
// specialisation). Loads run two tiles ahead, so a stage is only refilled after a block barrier.
template <int D, int kN>
constexpr int PipeSmemBytes() {
  return (kTileQ * D + 6 * kN * D) * 2 + 1024;
}

template <typename T, int D, int kN>
__global__ void __launch_bounds__(kThreads, 1) FwdSm90PipeKernel(FwdParams p) {
  extern __shared__ unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sK = sQ + kTileQ * D;  // [3][D/64][kN][64]
  T* sV = sK + 3 * kN * D;  // [3][D/64][kN][64]

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int q0 = qb * kTileQ;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int count = p.counts[bh * nq + qb];
  const int32_t* lut = p.indices + (bh * nq + qb) * nk;
  const int subs = p.block_k / kN;
  const int ntiles = count * subs;

  const T* qbase = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
  const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;

  auto tile_key0 = [&](int t) { return lut[t / subs] * p.block_k + (t % subs) * kN; };
  auto next_valid = [&](int t) {
    while (t < ntiles && tile_key0(t) >= L) ++t;
    return t;
  };
  auto load_kv = [&](int t, int st) {
    const int k0 = tile_key0(t);
    LoadTileSw128<T, kN, D, kThreads>(sK + st * kN * D, kbase, p.k.stride_l, k0, L, tid);
    LoadTileSw128<T, kN, D, kThreads>(sV + st * kN * D, vbase, p.v.stride_l, k0, L, tid);
  };
  const uint32_t q_addr = SmemAddr(sQ) + wg * 64 * 128;
  auto issue_s = [&](float* acc, int st) {
    const uint32_t k_addr = SmemAddr(sK + st * kN * D);
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) acc[i] = 0.f;
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t col_off = (ks & 3) * 32;
      const uint64_t da = MakeSmemDesc(q_addr + (ks >> 2) * kTileQ * 128 + col_off, 16, 1024);
      const uint64_t db = MakeSmemDesc(k_addr + (ks >> 2) * kN * 128 + col_off, 16, 1024);
      Wg<T>::template SS<kN>(acc, da, db);
    }
    WgmmaCommit();
  };

  LoadTileSw128<T, kTileQ, D, kThreads>(sQ, qbase + static_cast<int64_t>(q0) * p.q.stride_l,
                                        p.q.stride_l, 0, L - q0, tid);
  int t = next_valid(0);
  if (t < ntiles) load_kv(t, 0);
  CpAsyncCommit();
  int tn = t < ntiles ? next_valid(t + 1) : ntiles;
  if (tn < ntiles) load_kv(tn, 1);
  CpAsyncCommit();
  CpAsyncWaitAll();
  FenceProxyAsync();
  __syncthreads();

  float s[kN / 2], s_next[kN / 2];
  if (t < ntiles) {
    issue_s(s, 0);
    WgmmaWait0();
  }
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  const int tig = lane & 3;

  int stage = 0;
  while (t < ntiles) {
    const int k0 = tile_key0(t);
    // Every warp is past the previous iteration (its stage is free) and tile tn has landed.
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();
    const int tn2 = tn < ntiles ? next_valid(tn + 1) : ntiles;
    if (tn2 < ntiles) load_kv(tn2, (stage + 2) % 3);
    CpAsyncCommit();
    if (tn < ntiles) issue_s(s_next, (stage + 1) % 3);

    if (k0 + kN > L) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (k0 + nt * 8 + 2 * tig + (e & 1) >= L) s[nt * 4 + e] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt * 4 + 2 * r], s[nt * 4 + 2 * r + 1]));
      mx = QuadMax(mx) * scale_log2;
      const float mnew = fmaxf(m[r], mx);
      const float alpha = exp2f(m[r] - mnew);
      m[r] = mnew;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        s[nt * 4 + 2 * r] = exp2f(s[nt * 4 + 2 * r] * scale_log2 - mnew);
        s[nt * 4 + 2 * r + 1] = exp2f(s[nt * 4 + 2 * r + 1] * scale_log2 - mnew);
        sum += s[nt * 4 + 2 * r] + s[nt * 4 + 2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt * 4 + 2 * r] *= alpha;
        o[nt * 4 + 2 * r + 1] *= alpha;
      }
    }
    uint32_t pa[kN / 16][4];
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) {
      pa[kc][0] = MmaOp<T>::Pack(s[(2 * kc) * 4 + 0], s[(2 * kc) * 4 + 1]);
      pa[kc][1] = MmaOp<T>::Pack(s[(2 * kc) * 4 + 2], s[(2 * kc) * 4 + 3]);
      pa[kc][2] = MmaOp<T>::Pack(s[(2 * kc + 1) * 4 + 0], s[(2 * kc + 1) * 4 + 1]);
      pa[kc][3] = MmaOp<T>::Pack(s[(2 * kc + 1) * 4 + 2], s[(2 * kc + 1) * 4 + 3]);
    }
    const uint32_t v_addr = SmemAddr(sV + stage * kN * D);
    WgmmaFence();
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) {
      const uint64_t dv = MakeSmemDesc(v_addr + kc * 16 * 128, kN * 128, 1024);
      Wg<T>::template RS<D>(o, pa[kc], dv);
    }
    WgmmaCommit();
    WgmmaWait0();
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) s[i] = s_next[i];
    stage = (stage + 1) % 3;
    t = tn;
    tn = tn2;
  }

  T* obase = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
  const int g = lane >> 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = QuadSum(l[r]);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    const int row = q0 + wg * 64 + warp * 16 + g + 8 * r;
    if (row < L) {
      T* orow = obase + static_cast<int64_t>(row) * p.o.stride_l;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * tig) =
            MmaOp<T>::Pack(o[nt * 4 + 2 * r] * inv, o[nt * 4 + 2 * r + 1] * inv);
      }
      if (tig == 0) p.lse[bh * L + row] = lsum > 0.f ? (m[r] + log2f(lsum)) / kLog2e : -INFINITY;
    }
  }
}

template <typename T, int D>
cudaError_t LaunchPipe(const FwdParams& p, cudaStream_t stream) {
  constexpr int smem = PipeSmemBytes<D, 128>();
  auto kernel = FwdSm90PipeKernel<T, D, 128>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, kTileQ), p.heads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, int kN>
cudaError_t LaunchN(const FwdParams& p, cudaStream_t stream) {
  constexpr int smem = SmemBytes<D, kN>();
  auto kernel = FwdSm90Kernel<T, D, kN>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, kTileQ), p.heads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t Launch(const FwdParams& p, cudaStream_t stream) {
  // 128-key tiles where block_k allows (unless tile_n == 64); the pipelined kernel on request
  // (it measured slower, see kernels/NOTES.md).
  if (p.block_k % 128 != 0 || p.tile_n == 64) return LaunchN<T, D, 64>(p, stream);
  return p.pipelined ? LaunchPipe<T, D>(p, stream) : LaunchN<T, D, 128>(p, stream);
}

}  // namespace

cudaError_t LaunchFwdSm90(const FwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) {
    return p.head_dim == 128 ? Launch<__nv_bfloat16, 128>(p, stream)
                             : Launch<__nv_bfloat16, 64>(p, stream);
  }
  return p.head_dim == 128 ? Launch<__half, 128>(p, stream) : Launch<__half, 64>(p, stream);
}

}  // namespace sparge::kernels::detail
