// Block-sparse attention forward (FlashAttention-2 style, mma.sync m16n8k16, cp.async double
// buffering): one CTA per (query tile of 128 rows, head, batch), 8 warps of 16 query rows each,
// visiting only the key blocks listed in the mask LUT, in 64-key tiles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch_utils.h"
#include "kernels/device_utils.cuh"
#include "kernels/fwd_internal.h"
#include "kernels/sparge_kernels.h"

namespace sparge::kernels {
namespace {

using namespace detail;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr int FwdSmemBytes() {
  return (kTileQ * D + 4 * kTileK * D) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) BlockSparseFwdKernel(FwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kTileQ * D;    // [2][kTileK][D]
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
  const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
  const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;

  auto tile_key0 = [&](int t) { return lut[t / subs] * p.block_k + (t % subs) * kTileK; };
  // Only the last key block can have 64-key sub-tiles entirely past L; they are skipped.
  auto next_valid = [&](int t) {
    while (t < ntiles && tile_key0(t) >= L) ++t;
    return t;
  };

  LoadTile<T, kTileQ, D, kThreads>(sQ, qbase + static_cast<int64_t>(q0) * p.q.stride_l,
                                   p.q.stride_l, 0, L - q0, tid);
  int t = next_valid(0);
  if (t < ntiles) {
    int k0 = tile_key0(t);
    LoadTile<T, kTileK, D, kThreads>(sK, kbase, p.k.stride_l, k0, L, tid);
    LoadTile<T, kTileK, D, kThreads>(sV, vbase, p.v.stride_l, k0, L, tid);
  }
  CpAsyncCommit();
  CpAsyncWaitAll();
  __syncthreads();

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) LoadA<D>(qf[kc], sQ, warp * 16, kc, lane);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  const int tig = lane & 3;

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

    float s[kTileK / 8][4];
#pragma unroll
    for (int i = 0; i < kTileK / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
      for (int np = 0; np < kTileK / 16; ++np) {
        uint32_t bf[4];
        LoadBNK<D>(bf, cK, np * 16, kc, lane);
        MmaOp<T>::Run(s[2 * np], qf[kc], bf[0], bf[1]);
        MmaOp<T>::Run(s[2 * np + 1], qf[kc], bf[2], bf[3]);
      }
    }
    if (k0 + kTileK > L) {
#pragma unroll
      for (int nt = 0; nt < kTileK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (k0 + nt * 8 + 2 * tig + (e & 1) >= L) s[nt][e] = -INFINITY;
    }
    // Online softmax in the log2 domain; rows g (e = 0, 1) and g + 8 (e = 2, 3).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kTileK / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = QuadMax(mx) * scale_log2;
      const float mnew = fmaxf(m[r], mx);
      const float alpha = exp2f(m[r] - mnew);
      m[r] = mnew;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kTileK / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] * scale_log2 - mnew);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] * scale_log2 - mnew);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[i][2 * r] *= alpha;
        o[i][2 * r + 1] *= alpha;
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
        LoadBKN<D>(bf, cV, kc * 16, np, lane);
        MmaOp<T>::Run(o[2 * np], pa, bf[0], bf[1]);
        MmaOp<T>::Run(o[2 * np + 1], pa, bf[2], bf[3]);
      }
    }
    CpAsyncWaitAll();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  // Epilogue: normalise, write O (bf16/fp16) and the natural-log LSE.
  T* obase = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
  const int g = lane >> 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = QuadSum(l[r]);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row < L) {
      T* orow = obase + static_cast<int64_t>(row) * p.o.stride_l;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        uint32_t v = MmaOp<T>::Pack(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * tig) = v;
      }
      if (tig == 0) {
        p.lse[bh * L + row] = lsum > 0.f ? (m[r] + log2f(lsum)) / kLog2e : -INFINITY;
      }
    }
  }
}

template <typename T, int D>
cudaError_t Launch(const FwdParams& p, cudaStream_t stream) {
  constexpr int smem = FwdSmemBytes<D>();
  auto kernel = BlockSparseFwdKernel<T, D>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, kTileQ), p.heads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

const char* CanImplementFwd(const FwdParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.block_q != kTileQ) return "block_q must be 128";
  if (p.block_k % kTileK != 0 || p.block_k <= 0) return "block_k must be a multiple of 64";
  if (p.batch <= 0 || p.heads <= 0 || p.seqlen <= 0) return "empty problem";
  if (p.batch > 65535 || p.heads > 65535) return "batch/heads too large for the grid";
  const void* ptrs[] = {p.q.ptr, p.k.ptr, p.v.ptr, p.o.ptr};
  for (const void* ptr : ptrs)
    if (ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return "tensor not 16-byte aligned";
  const Tensor4* ts[] = {&p.q, &p.k, &p.v, &p.o};
  for (const Tensor4* t : ts)
    if (t->stride_l % 8 != 0 || t->stride_h % 8 != 0 || t->stride_b % 8 != 0)
      return "strides must be multiples of 8 elements";
  if (!p.counts || !p.indices || !p.lse) return "mask or lse pointer missing";
  return nullptr;
}

namespace detail {
cudaError_t LaunchFwdMma(const FwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBF16) {
    return p.head_dim == 128 ? Launch<__nv_bfloat16, 128>(p, stream)
                             : Launch<__nv_bfloat16, 64>(p, stream);
  }
  return p.head_dim == 128 ? Launch<__half, 128>(p, stream) : Launch<__half, 64>(p, stream);
}
}  // namespace detail

cudaError_t LaunchBlockSparseFwd(const FwdParams& p, cudaStream_t stream) {
  if (CanImplementFwd(p) != nullptr) return cudaErrorInvalidValue;
  return p.impl == FwdImpl::kMmaSync ? detail::LaunchFwdMma(p, stream)
                                     : detail::LaunchFwdSm90(p, stream);
}

}  // namespace sparge::kernels
