// Hopper (sm_90a) block-sparse attention backward with warpgroup MMA: the same recomputation as
// the mma.sync kernels (block_sparse_bwd_dq.cu, block_sparse_bwd_dkv.cu), on 128B-swizzled shared
// tiles. Two implementations, chosen by env SPARGE_BWD_IMPL (read per launch):
//  * fused (default for 128-wide key blocks, v9): one pass per 128-key tile of one head. Two
//    warpgroups (64 keys each) walk the 64-row query tiles of the query blocks that keep the key
//    tile (transposed LUT), the next tile's Q, dO, LSE and delta prefetched by cp.async into a
//    double buffer; they compute S^T, dP^T, dV += P^T dO, dK += dS^T Q, write dS^T to shared
//    memory and compute dQ_partial = dS K, which is added to an fp32 accumulator in global
//    memory with one bulk reduction (cp.reduce.async.bulk .add.f32) per warpgroup and tile; a
//    small kernel converts the accumulator to dQ. 5 GEMMs per tile pair instead of 7. CTAs are
//    persistent and take key tiles from a work list (heavy tiles first, then head by head). dQ is
//    not bitwise deterministic (the order of the fp32 additions varies); dK and dV are.
//  * split (SPARGE_BWD_IMPL=split, and 64-wide key blocks): dK/dV: one CTA per 64 or 128 keys
//    (one warpgroup per 64 keys) walking the query blocks that keep them; S^T = K Q^T and
//    dP^T = V dO^T from shared operands, dV += P^T dO and dK += dS^T Q with P^T / dS^T taken from
//    registers. dQ: one CTA per 128 query rows (two warpgroups) walking the kept key blocks;
//    dQ += dS K recomputing S and dP. Deterministic (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>

#include <cub/block/block_scan.cuh>

#include "kernels/launch_utils.h"
#include "kernels/bwd_counts.h"
#include "kernels/bwd_internal.h"
#include "kernels/sm90_pipeline.cuh"
#include "kernels/sm90_tiles.cuh"
#include "kernels/tma_map.h"

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

// Writes a warp's 16 rows (from row0) of the dK (times the softmax scale) and dV accumulators of
// an m64nD wgmma fragment; rows at or past L are skipped.
template <typename T, int D>
__device__ __forceinline__ void StoreDkDv(const BwdParams& p, int b, int h, int row0, int lane,
                                          const float* dk, const float* dv) {
  const int g = lane >> 2, tig = lane & 3;
  T* dkbase = static_cast<T*>(p.dk.ptr) + b * p.dk.stride_b + h * p.dk.stride_h;
  T* dvbase = static_cast<T*>(p.dv.ptr) + b * p.dv.stride_b + h * p.dv.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row < p.seqlen) {
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

// S^T = K Q^T and dP^T = V dO^T for one warpgroup's 64 keys (rows row0.. of the kKeys-row K and
// V tiles) against a kM-row Q/dO tile, into st / dpt (m64n64 fragments); waits for both.
template <typename T, int D, int kKeys>
__device__ __forceinline__ void StDpT(float* st, float* dpt, uint32_t k_addr, uint32_t v_addr, int row0,
                                      uint32_t q_addr, uint32_t do_addr) {
#pragma unroll
  for (int i = 0; i < kM / 2; ++i) st[i] = dpt[i] = 0.f;
  WgmmaFence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    Wg<T>::template SS<kM>(st, KMajorDesc(k_addr, kKeys, row0, ks), KMajorDesc(q_addr, kM, 0, ks));
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    Wg<T>::template SS<kM>(dpt, KMajorDesc(v_addr, kKeys, row0, ks), KMajorDesc(do_addr, kM, 0, ks));
  WgmmaCommit();
  WgmmaWait0();
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
  const int tig = lane & 3;
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
    StDpT<T, D, kKeys>(s, dp, k_addr, v_addr, wg * 64, q_addr, do_addr);
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

  StoreDkDv<T, D>(p, b, h, k0 + wg * 64 + warp * 16, lane, dk, dv);
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

// ---------------------------------------------------------------------------------------------
// Fused backward (v9): two warpgroups, 64 keys each of the CTA's 128, all threads loading the
// next query tile (cp.async, double buffer) while the current one is computed; one CTA barrier
// per tile (data ready, previous tile finished) and, for D = 128, a one-way barrier per
// warpgroup for the dS^T exchange (the first to finish its softmax starts its dV/dK wgmmas). No producer
// warpgroup: at 384 threads the consumers' 240 registers (setmaxnreg) were not enough for ptxas
// to keep the wgmmas asynchronous (it serialised all of them); at 256 threads they get 255.
constexpr int kFThreads = 256;
constexpr int kFKeys = 128;
constexpr int kFStages = 2;
constexpr int kDqTileFloats = kM * 64;  // one warpgroup's dQ partial: 64 rows x 64 columns
static_assert(counts::kQueryBlock == kTileQ && counts::kQueryTile == kM && counts::kKeyTile == kFKeys,
              "bwd_counts.h must count the tiles this file uses");

// Work list of the persistent fused kernel, in the workspace after the dQ accumulator.
struct FusedSchedule {
  int next;    // next position to take (zeroed with the accumulator)
  int items;   // entries in order[]
  // FusedChunkScheduleKernel only: chunked key tiles, heavy-first entries, first tail entry of
  // the body (the entries after the heavy-first ones), body entries.
  int nslots, heavy_total, tail_from, body_total;
  int pad[2];
  // [items], or with chunking [ChunkPlan::capacity], then part[capacity], slot_item[max_slots],
  // seg[B * H] (first body entry of each head), scratch[2 * capacity] (FusedSortScheduleKernel)
  int order[1];
};

// Chunked heavy items (v12, SPARGE_BWD_CHUNK=<query blocks>; kernels/NOTES.md "Backward v12"):
// a key tile kept by many more query blocks than the mean (attention sinks and other popular
// keys: at 1.3B, 95%, 8% of the tiles with 32% of the tile pairs) is split into chunks of at most
// chunk_blocks query blocks that run side by side on different CTAs in their head's turn,
// instead of all heavy tiles first, which spreads the run's first third over every head's Q, dO
// and dQ accumulator (an L2 working set far beyond the cache). The chunks of a tile add their
// fp32 dK/dV into the tile's slot (red.global.add.v4.f32; zeroed with the dQ accumulator), and
// DkDvChunkConvertKernel scales and converts the slots: dK/dV of chunked tiles are, like dQ, not
// bitwise reproducible (fp32 addition order). partial == nullptr: no chunking.
struct ChunkPlan {
  float* partial;    // [max_slots][kChunkPartialFloats<D>], fragment order, zeroed
  int chunk_blocks;  // query blocks per chunk at most
  int max_slots;     // chunked key tiles at most (candidates past it stay whole, first in the list)
  int extra;         // list entries beyond one per item at most (chunks - 1 summed over slots)
  int capacity;      // list entries: items + extra
  int sort;          // FusedSortScheduleKernel orders each head's body by median query block
};
template <int D>
constexpr int kChunkPartialFloats = 2 * kFKeys * D;  // dK then dV, 128 keys x D, fp32

using counts::ChunkLo;  // query blocks of chunk j of n: [ChunkLo(c, n, j), ChunkLo(c, n, j + 1))

// Shared layout (bytes from a 1024-aligned base): K, V [D/64][128][64]; per stage Q, dO
// [D/64][64][64]; dS^T double buffer [128 keys][64 queries]; dQ partial per consumer warpgroup
// (fp32, fragment order); LSE and delta per stage.
template <int D>
struct FusedLayout {
  static constexpr int kKvBytes = kFKeys * D * 2;
  static constexpr int kQBytes = kM * D * 2;
  static constexpr int kK = 0;
  static constexpr int kV = kKvBytes;
  static constexpr int kQ = 2 * kKvBytes;
  static constexpr int kDO = kQ + kFStages * kQBytes;
  static constexpr int kDsBytes = kFKeys * kM * 2;
  static constexpr int kDs = kDO + kFStages * kQBytes;
  static constexpr int kDq = kDs + 2 * kDsBytes;
  static constexpr int kLse = kDq + 2 * kDqTileFloats * 4;
  static constexpr int kDelta = kLse + kFStages * kM * 4;
  static constexpr int kItem = kDelta + kFStages * kM * 4;
  static constexpr int kBytes = kItem + 16 + 1024;  // (two item slots) + alignment slack
};

__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// Adds `bytes` of fp32 from shared memory to global memory (one bulk asynchronous reduction).
__device__ __forceinline__ void BulkReduceAddF32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void BulkReduceAddF32Hint(float* dst, uint32_t src, uint32_t bytes, uint64_t policy) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.L2::cache_hint.add.f32 [%0], [%1], %2, %3;\n"
               ::"l"(dst), "r"(src), "r"(bytes), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void BulkCommit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void BulkWaitRead0() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void BulkWait0() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// m64n64k16 with both operands MN-major (transposed) in 128B-swizzled shared memory: A = dS from
// the dS^T tile, B = K with the head dimension contiguous.
template <typename T>
__device__ __forceinline__ void WgmmaSSTT_N64(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d = 1) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
#define SPARGE_WGMMA_TT(TYPE)                                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                          \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                           \
               " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,"  \
               "%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 1, 1;\n}\n"                  \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),  \
                 "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),           \
                 "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),        \
                 "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),        \
                 "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),        \
                 "+f"(d[31])                                                                          \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))
  if constexpr (kBf16) SPARGE_WGMMA_TT("bf16"); else SPARGE_WGMMA_TT("f16");
#undef SPARGE_WGMMA_TT
}

// Query tiles of 64 rows that a key tile visits: kM-row halves of the kept 128-row query blocks,
// ascending, so only the last block's second half can start at or past L.
__device__ __forceinline__ int FusedValidTiles(int count, int last_qblk, int L) {
  return counts::ItemQueryTiles(count, last_qblk, L);
}

// Persistent: each CTA takes work items (one 128-key tile of one head) from `sched` in the
// order FusedScheduleKernel wrote them: heavy items first (a key block that every query keeps,
// like an attention sink, costs ~20x the average one and would otherwise start late and end
// last), then head by head. dq_acc: fp32 [B*H][2*Nq query tiles][D/64][64 x 64 in
// wgmma fragment order], zeroed before the launch, like sched->next.
template <typename T, int D>
__global__ void __launch_bounds__(kFThreads, 1) BwdFusedSm90Kernel(BwdParams p, float* dq_acc,
                                                                   FusedSchedule* sched) {
  using Lay = FusedLayout<D>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t base = SmemAddr(smem);
  const uint32_t sK = base + Lay::kK, sV = base + Lay::kV;
  auto sQ = [&](int s) { return base + Lay::kQ + s * Lay::kQBytes; };
  auto sDO = [&](int s) { return base + Lay::kDO + s * Lay::kQBytes; };
  float* sLse = reinterpret_cast<float*>(smem + Lay::kLse);
  float* sDelta = reinterpret_cast<float*>(smem + Lay::kDelta);
  int* sItem = reinterpret_cast<int*>(smem + Lay::kItem);

  const int tid = threadIdx.x, cw = tid >> 7, wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;
  const int tig = lane & 3;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, kTileQ), nk = CeilDiv(L, p.block_k);
  const int nkt = CeilDiv(L, kFKeys);
  // Thread 0 takes the next item while the current one runs, in three steps whose results are
  // used only at the next one (counter at the item's start, list entry after the first tile's
  // S/dP GEMMs, shared slot at the item's end), so their latencies stay off the critical path.
  int w_next = 0, item_next = -1;
  if (tid == 0) {
    w_next = atomicAdd(&sched->next, 1);
    sItem[0] = w_next < sched->items ? sched->order[w_next] : -1;
  }
  for (int it = 0;; ++it) {
    __syncthreads();  // the previous item's shared-memory reads are done; sItem[it & 1] is set
    const int item = sItem[it & 1];
    if (item < 0) break;
    if (tid == 0) w_next = atomicAdd(&sched->next, 1);
    bool have_next = false;
    auto read_next = [&]() {
      if (tid == 0 && !have_next) item_next = w_next < sched->items ? sched->order[w_next] : -1;
      have_next = true;
    };
    const int kt = item % nkt;
    const int64_t bh = item / nkt;
    const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
    const int k0 = kt * kFKeys;
    const int kb = k0 / p.block_k;
    const int count = p.t_counts[bh * nk + kb];
    const int32_t* tlut = p.t_indices + (bh * nk + kb) * nq;
    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

    if (count > 0) {
      const T* qbase = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
      const T* dobase = static_cast<const T*>(p.d_o.ptr) + b * p.d_o.stride_b + h * p.d_o.stride_h;
      const float* lse = p.lse + bh * L;
      const float* delta = p.delta + bh * L;
      // Q, dO, LSE and delta of query tile i into stage s (rows past L read as zeros, which makes
      // their P^T dO and dS zero).
      auto load_tile = [&](int i, int s) {
        const int q0 = tlut[i / 2] * kTileQ + (i % 2) * kM;
        LoadTileSw128<T, kM, D, kFThreads>(reinterpret_cast<T*>(smem + Lay::kQ + s * Lay::kQBytes), qbase,
                                           p.q.stride_l, q0, L, tid);
        LoadTileSw128<T, kM, D, kFThreads>(reinterpret_cast<T*>(smem + Lay::kDO + s * Lay::kQBytes), dobase,
                                           p.d_o.stride_l, q0, L, tid);
        if (tid < 2 * kM) {
          const int r = tid % kM;
          const bool ok = q0 + r < L;
          const float* src = tid < kM ? lse : delta;
          float* dst = (tid < kM ? sLse : sDelta) + s * kM + r;
          CpAsync4(SmemAddr(dst), ok ? src + q0 + r : src, ok ? 4 : 0);
        }
      };
      const T* kbase = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
      const T* vbase = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;
      LoadTileSw128<T, kFKeys, D, kFThreads>(reinterpret_cast<T*>(smem + Lay::kK), kbase, p.k.stride_l,
                                             k0, L, tid);
      LoadTileSw128<T, kFKeys, D, kFThreads>(reinterpret_cast<T*>(smem + Lay::kV), vbase, p.v.stride_l,
                                             k0, L, tid);
      load_tile(0, 0);
      CpAsyncCommit();
      const int n = FusedValidTiles(count, tlut[count - 1], L);

      const float scale_log2 = p.scale * kLog2e;
      // dQ = dS K: with D = 128 each warpgroup takes 64 of the head dimension's columns over all
      // 128 keys (both warpgroups' dS^T rows); with D = 64 each takes its own 64 keys and the whole
      // head dimension, and both add into the same accumulator tile.
      constexpr int kDqSteps = D == 128 ? kFKeys / 16 : 64 / 16;
      const uint32_t ds_row0 = D == 128 ? 0 : cw * 64 * 128;
      const uint32_t kb_addr = D == 128 ? sK + cw * kFKeys * 128 : sK + cw * 64 * 128;
      const int dq_block = D == 128 ? cw : 0;
      const uint32_t dq_smem = base + Lay::kDq + cw * kDqTileFloats * 4;
      float4* dq_stage = reinterpret_cast<float4*>(smem + Lay::kDq) + cw * (kDqTileFloats / 4);
      // dQ partial -> shared (fragment order, conflict-free float4 stores) -> one bulk reduction.
      float dq[32];
      auto reduce_dq = [&](int qtile) {
        if (wtid == 0) BulkWaitRead0();  // the previous tile's reduction has read the buffer
        NamedBarrierSync(3 + cw, 128);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          dq_stage[nt * 128 + wtid] = make_float4(dq[nt * 4], dq[nt * 4 + 1], dq[nt * 4 + 2], dq[nt * 4 + 3]);
        FenceProxyAsync();
        NamedBarrierSync(3 + cw, 128);
        if (wtid == 0) {
          float* dst = dq_acc + ((bh * (2 * nq) + qtile) * (D / 64) + dq_block) * kDqTileFloats;
          BulkReduceAddF32(dst, dq_smem, kDqTileFloats * 4);
          BulkCommit();
        }
      };
      for (int i = 0; i < n; ++i) {
        const int s = i & 1;
        const int qtile = tlut[i / 2] * 2 + (i % 2);  // used at the end of the tile: latency hidden
        // Tile i has landed (every thread's own copies, then the barrier); past the barrier no
        // thread still reads stage s ^ 1 (tile i - 1), so tile i + 1 is prefetched into it.
        CpAsyncWaitAll();
        FenceProxyAsync();
        NamedBarrierSync(1, kFThreads);
        if (i + 1 < n) load_tile(i + 1, s ^ 1);
        CpAsyncCommit();
        float st[kM / 2], dpt[kM / 2];
        StDpT<T, D, kFKeys>(st, dpt, sK, sV, cw * 64, sQ(s), sDO(s));
        read_next();
        const float* cL = sLse + s * kM;
        const float* cD = sDelta + s * kM;
#pragma unroll
        for (int nt = 0; nt < kM / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * tig + (e & 1);
            const float pr = FastExp2(fmaf(st[nt * 4 + e], scale_log2, -cL[col] * kLog2e));
            st[nt * 4 + e] = pr;
            dpt[nt * 4 + e] = pr * (dpt[nt * 4 + e] - cD[col]);
          }
        }
        // dS^T (this warpgroup's 64 key rows) into the [128 keys][64 queries] swizzled tile.
        const uint32_t ds_addr = base + Lay::kDs + s * Lay::kDsBytes;
        T* ds = reinterpret_cast<T*>(smem + Lay::kDs + s * Lay::kDsBytes);
#pragma unroll
        for (int nt = 0; nt < kM / 8; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = cw * 64 + warp * 16 + (lane >> 2) + 8 * r;
            *reinterpret_cast<uint32_t*>(ds + Sw128<kFKeys>(row, nt) + 2 * tig) =
                MmaOp<T>::Pack(dpt[nt * 4 + 2 * r], dpt[nt * 4 + 2 * r + 1]);
          }
        uint32_t pa[kM / 16][4], da[kM / 16][4];
        PackA<T>(pa, st);
        PackA<T>(da, dpt);
        FenceProxyAsync();
        // D = 128: announce this half of dS^T (named barrier 5 + cw: this warpgroup arrives, the
        // other one syncs) and run dV/dK while the other warpgroup may still be in its softmax.
        if constexpr (D == 128) NamedBarrierArrive(5 + cw, kFThreads);
        WgmmaFence();
#pragma unroll
        for (int kc = 0; kc < kM / 16; ++kc) {
          Wg<T>::template RS<D>(dv, pa[kc], MNMajorDesc(sDO(s), kM, kc));
          Wg<T>::template RS<D>(dk, da[kc], MNMajorDesc(sQ(s), kM, kc));
        }
        WgmmaCommit();
        WgmmaWait0();
        if constexpr (D == 128) NamedBarrierSync(6 - cw, kFThreads); else NamedBarrierSync(3 + cw, 128);
#pragma unroll
        for (int j = 0; j < 32; ++j) dq[j] = 0.f;
        WgmmaFence();
#pragma unroll
        for (int kc = 0; kc < kDqSteps; ++kc)
          WgmmaSSTT_N64<T>(dq, MakeSmemDesc(ds_addr + ds_row0 + kc * 16 * 128, kFKeys * 128, 1024),
                           MakeSmemDesc(kb_addr + kc * 16 * 128, kFKeys * 128, 1024));
        WgmmaCommit();
        WgmmaWait0();
        reduce_dq(qtile);
      }
    }
    read_next();
    if (tid == 0) sItem[(it + 1) & 1] = item_next;
    StoreDkDv<T, D>(p, b, h, k0 + cw * 64 + warp * 16, lane, dk, dv);
  }
  if (wtid == 0) BulkWait0();
}

// Writes the work order of the persistent fused kernel: first the heavy items (key tiles kept
// by more than twice the mean count of query blocks + 4, e.g. attention sinks) by descending count
// (a counting sort; the order inside one count is arbitrary and changes nothing but timing),
// then the others in item order (b * H + h) * nkt + kt, head by head, so that concurrently
// running CTAs share one head's Q/dO tiles and dQ accumulator in L2, except the last tail_items
// of them, again longest-first (a short tail). One CTA; hist holds nq + 1 ints of dynamic
// shared memory.
constexpr int kSchedThreads = 1024;

// The work lists' two counting sorts in one histogram hist[0..nq]: counts above `above` (heavy,
// first) and the tail's counts (at most `above`), each largest first. Turns the counts into
// exclusive offsets (the tail's start after the heavy ones and `tail_from` body entries) and
// returns the number of heavy entries.
__device__ __forceinline__ int HeavyAndTailOffsets(int* hist, int nq, int above, int tail_from) {
  int acc = 0;
  for (int c = nq; c > above && c >= 0; --c) {
    const int n = hist[c];
    hist[c] = acc;
    acc += n;
  }
  const int heavy = acc;
  acc += tail_from;
  for (int c = min(above, nq); c >= 0; --c) {
    const int n = hist[c];
    hist[c] = acc;
    acc += n;
  }
  return heavy;
}
__global__ void __launch_bounds__(kSchedThreads) FusedScheduleKernel(BwdParams p, FusedSchedule* sched,
                                                                      int tail_items) {
  using Scan = cub::BlockScan<int, kSchedThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int total, heavy_total;
  extern __shared__ int hist[];
  const int tid = threadIdx.x, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, kTileQ), nk = CeilDiv(L, p.block_k), nkt = CeilDiv(L, kFKeys);
  const int items = p.batch * p.heads * nkt;
  auto count_of = [&](int w) {
    const int64_t bh = w / nkt;
    return p.t_counts[bh * nk + (w % nkt) * kFKeys / p.block_k];
  };
  if (tid == 0) total = 0;
  for (int c = tid; c <= nq; c += kSchedThreads) hist[c] = 0;
  __syncthreads();
  const int chunk = CeilDiv(items, kSchedThreads), w0 = tid * chunk, w1 = min(items, w0 + chunk);
  int sum = 0;  // at most items * nq: below 2^31 for any grid the kernels accept
  for (int w = w0; w < w1; ++w) sum += count_of(w);
  sum = __reduce_add_sync(0xffffffffu, sum);
  if (lane == 0) atomicAdd(&total, sum);  // one shared atomic per warp
  __syncthreads();
  const int heavy_above = 2 * (total / max(items, 1)) + 4;
  int light = 0;
  for (int w = w0; w < w1; ++w) {
    const int c = count_of(w);
    if (c > heavy_above) atomicAdd(&hist[c], 1); else ++light;
  }
  int light_before = 0, light_total = 0;
  Scan(scan_tmp).ExclusiveSum(light, light_before, light_total);
  // The last tail_items light items (about two per CTA) also go longest-first: in head order
  // a long one could start last and end alone (at 1.3B, 95%: SMs idle ~10% of the kernel).
  // Their histogram reuses hist[0 .. heavy_above], which the heavy counts leave at zero.
  const int tail_from = light_total - min(light_total, tail_items);
  {
    int li = light_before;
    for (int w = w0; w < w1; ++w) {
      const int c = count_of(w);
      if (c > heavy_above) continue;
      if (li++ >= tail_from) atomicAdd(&hist[c], 1);
    }
  }
  __syncthreads();
  if (tid == 0) {  // exclusive offsets of the heavy counts, then of the tail's, largest first
    heavy_total = HeavyAndTailOffsets(hist, nq, heavy_above, tail_from);
    sched->items = items;
  }
  __syncthreads();
  for (int w = w0; w < w1; ++w) {
    const int c = count_of(w);
    const bool heavy = c > heavy_above;
    const bool tail = !heavy && light_before >= tail_from;
    sched->order[heavy || tail ? atomicAdd(&hist[c], 1) : heavy_total + light_before] = w;
    if (!heavy) ++light_before;
  }
}

// The work list with chunked heavy items (ChunkPlan). Candidates: key tiles kept by more than
// split_above = max(2 * mean + 4, chunk_blocks) query blocks. In item order, a candidate gets a
// slot while slots (max_slots) and list entries (extra: the chunks beyond the first, summed)
// last, and becomes ceil(count / chunk_blocks) near-equal chunks at its place in head order
// (part[] = chunk << 20 | slot; -1 for a whole item); candidates without a slot stay whole and go
// first, longest first, as in FusedScheduleKernel. The last tail_items entries go longest-first.
// Light counts and chunk sizes are <= split_above < heavy-first counts, so both counting sorts
// share hist (nq + 1 ints of dynamic shared memory). Deterministic but for the order inside one
// count of the two counting sorts (timing only).
// counts_in_smem: the items' counts are first copied (coalesced) into dynamic shared memory
// after hist, and the five passes below read them there (the passes go through each thread's
// contiguous run of items: from global memory that was a chain of dependent ~0.5 us reads per
// item, 22 us at Wan-1.3B and 188 us at 14B on an H100).
__global__ void __launch_bounds__(kSchedThreads) FusedChunkScheduleKernel(BwdParams p, FusedSchedule* sched,
                                                                           int tail_items, ChunkPlan cp,
                                                                           int counts_in_smem) {
  using Scan = cub::BlockScan<int, kSchedThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int total, heavy_total, slots_used;
  extern __shared__ int hist[];
  const int tid = threadIdx.x, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, kTileQ), nk = CeilDiv(L, p.block_k), nkt = CeilDiv(L, kFKeys);
  const int items = p.batch * p.heads * nkt;
  int* order = sched->order;
  int* part = order + cp.capacity;
  int* slot_item = part + cp.capacity;
  int* seg = slot_item + cp.max_slots;
  auto global_count = [&](int w) {
    const int64_t bh = w / nkt;
    return p.t_counts[bh * nk + (w % nkt) * kFKeys / p.block_k];
  };
  int* shared_counts = hist + nq + 1;
  auto count_of = [&](int w) { return counts_in_smem ? shared_counts[w] : global_count(w); };
  if (tid == 0) total = slots_used = 0;
  for (int c = tid; c <= nq; c += kSchedThreads) hist[c] = 0;
  if (counts_in_smem)
    for (int w = tid; w < items; w += kSchedThreads) shared_counts[w] = global_count(w);
  __syncthreads();
  const int chunk = CeilDiv(items, kSchedThreads), w0 = tid * chunk, w1 = min(items, w0 + chunk);
  int sum = 0;
  for (int w = w0; w < w1; ++w) sum += count_of(w);
  sum = __reduce_add_sync(0xffffffffu, sum);
  if (lane == 0) atomicAdd(&total, sum);
  __syncthreads();
  const int split_above = max(2 * (total / max(items, 1)) + 4, cp.chunk_blocks);
  auto parts_of = [&](int c) { return CeilDiv(c, cp.chunk_blocks); };
  // Candidates before this thread's items, and their extra entries (prefixes in item order).
  int cand = 0, extra = 0;
  for (int w = w0; w < w1; ++w) {
    const int c = count_of(w);
    if (c > split_above) ++cand, extra += parts_of(c) - 1;
  }
  int cand_before = 0, extra_before = 0;
  Scan(scan_tmp).ExclusiveSum(cand, cand_before);
  __syncthreads();  // scan_tmp is reused
  Scan(scan_tmp).ExclusiveSum(extra, extra_before);
  __syncthreads();
  // A candidate is chunked iff its slot and its extra entries fit (both prefixes only grow, so
  // the chunked candidates are the first ones in item order).
  auto fits = [&](int slot, int xb, int c) { return slot < cp.max_slots && xb + parts_of(c) - 1 <= cp.extra; };
  int entries = 0;
  {
    int slot = cand_before, xb = extra_before, mine = 0;
    for (int w = w0; w < w1; ++w) {
      const int c = count_of(w);
      if (c <= split_above) {
        ++entries;
        continue;
      }
      if (fits(slot, xb, c)) {
        entries += parts_of(c);
        ++mine;
      } else {
        atomicAdd(&hist[c], 1);  // heavy without a slot: first, longest first
      }
      ++slot;
      xb += parts_of(c) - 1;
    }
    if (mine) atomicAdd(&slots_used, mine);
  }
  int body_before = 0, body_total = 0;
  Scan(scan_tmp).ExclusiveSum(entries, body_before, body_total);
  const int tail_from = body_total - min(body_total, tail_items);
  {
    int e = body_before, slot = cand_before, xb = extra_before;
    for (int w = w0; w < w1; ++w) {
      const int c = count_of(w);
      if (c <= split_above) {
        if (e++ >= tail_from) atomicAdd(&hist[c], 1);
        continue;
      }
      if (fits(slot, xb, c)) {
        const int n = parts_of(c);
        for (int j = 0; j < n; ++j)
          if (e++ >= tail_from) atomicAdd(&hist[ChunkLo(c, n, j + 1) - ChunkLo(c, n, j)], 1);
      }
      ++slot;
      xb += parts_of(c) - 1;
    }
  }
  __syncthreads();
  if (tid == 0) {  // exclusive offsets: heavy-first counts, the body, then the tail's, largest first
    heavy_total = HeavyAndTailOffsets(hist, nq, split_above, tail_from);
    sched->items = heavy_total + body_total;
    sched->nslots = slots_used;
    sched->heavy_total = heavy_total;
    sched->tail_from = tail_from;
    sched->body_total = body_total;
  }
  __syncthreads();
  int e = body_before, slot = cand_before, xb = extra_before;
  for (int w = w0; w < w1; ++w) {
    const int c = count_of(w);
    if (w % nkt == 0) seg[w / nkt] = e;  // a head's body starts at its first item's first entry
    if (c <= split_above) {
      const int pos = e >= tail_from ? atomicAdd(&hist[c], 1) : heavy_total + e;
      ++e;
      order[pos] = w;
      part[pos] = -1;
      continue;
    }
    if (fits(slot, xb, c)) {
      slot_item[slot] = w;
      const int n = parts_of(c);
      for (int j = 0; j < n; ++j, ++e) {
        const int cc = ChunkLo(c, n, j + 1) - ChunkLo(c, n, j);
        const int pos = e >= tail_from ? atomicAdd(&hist[cc], 1) : heavy_total + e;
        order[pos] = w;
        part[pos] = (j << 20) | slot;
      }
    } else {
      const int pos = atomicAdd(&hist[c], 1);
      order[pos] = w;
      part[pos] = -1;
    }
    ++slot;
    xb += parts_of(c) - 1;
  }
}

// Orders each head's body entries (FusedChunkScheduleKernel's list between the heavy-first ones
// and the tail) by the median query block of the entry (its middle transposed-LUT entry), so that
// the entries running side by side touch nearby query tiles: the L2 keeps a head's Q, dO and dQ
// accumulator tiles while they are shared (kernels/NOTES.md, "Backward v12": DRAM bytes -25% in
// the model on top of the chunking). One CTA per (batch, head): a counting sort over nq buckets
// (nq + 1 ints of dynamic shared memory) through a scratch copy; the order among equal medians
// is arbitrary (timing only).
constexpr int kSortThreads = 256;
__global__ void __launch_bounds__(kSortThreads) FusedSortScheduleKernel(BwdParams p, FusedSchedule* sched, ChunkPlan cp) {
  using Scan = cub::BlockScan<int, kSortThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  extern __shared__ int hist[];
  const int tid = threadIdx.x, bh = blockIdx.x, nbh = gridDim.x;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, kTileQ), nk = CeilDiv(L, p.block_k), nkt = CeilDiv(L, kFKeys);
  int* order = sched->order;
  int* part = order + cp.capacity;
  const int* seg = part + cp.capacity + cp.max_slots;
  int* scratch = const_cast<int*>(seg) + nbh;
  const int tail_from = sched->tail_from, base = sched->heavy_total;
  const int lo = min(seg[bh], tail_from);
  const int hi = min(bh + 1 < nbh ? seg[bh + 1] : sched->body_total, tail_from);
  if (hi - lo < 2) return;
  auto key_of = [&](int w, int pt) {
    const int64_t ibh = w / nkt;
    const int kb = (w % nkt) * kFKeys / p.block_k;
    int c = p.t_counts[ibh * nk + kb], first = 0;
    if (pt >= 0) {
      const int n = CeilDiv(c, cp.chunk_blocks), j = pt >> 20;
      first = ChunkLo(c, n, j);
      c = ChunkLo(c, n, j + 1) - first;
    }
    return c > 0 ? p.t_indices[(ibh * nk + kb) * nq + first + c / 2] : 0;
  };
  for (int b = tid; b <= nq; b += kSortThreads) hist[b] = 0;
  __syncthreads();
  for (int i = lo + tid; i < hi; i += kSortThreads) {
    const int w = order[base + i], pt = part[base + i];
    scratch[2 * i] = w;
    scratch[2 * i + 1] = pt;
    atomicAdd(&hist[key_of(w, pt)], 1);
  }
  __syncthreads();
  // Exclusive offsets over the nq + 1 buckets: each thread scans a contiguous run of them.
  const int per = CeilDiv(nq + 1, kSortThreads), b0 = min(nq + 1, tid * per), b1 = min(nq + 1, b0 + per);
  int run = 0;
  for (int b = b0; b < b1; ++b) run += hist[b];
  int before = 0;
  Scan(scan_tmp).ExclusiveSum(run, before);
  for (int b = b0; b < b1; ++b) {
    const int n = hist[b];
    hist[b] = before;
    before += n;
  }
  __syncthreads();
  for (int i = lo + tid; i < hi; i += kSortThreads) {
    const int w = scratch[2 * i], pt = scratch[2 * i + 1];
    const int dst = base + lo + atomicAdd(&hist[key_of(w, pt)], 1);
    order[dst] = w;
    part[dst] = pt;
  }
}

// One 64 x 64 fp32 tile in m64n64 fragment order (thread t's rows warp*16 + g (+8), columns
// nt*8 + 2*tig (+1) at float4 index nt*128 + t), scaled, into 64 rows of dst (row r at
// dst + r * stride_l, rows >= valid_rows skipped), by a CTA of 256 threads: coalesced float4
// reads, rows reassembled in shared memory, then 16-byte row-contiguous writes.
template <typename T>
__device__ __forceinline__ void ConvertFragmentTile(const float4* src, float scale, T* dst, int64_t stride_l,
                                                    int valid_rows) {
  __shared__ uint32_t rows[kM][33];  // 64 rows x 32 bf16 pairs, padded against bank conflicts
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int f = threadIdx.x + it * 256, nt = f / 128, t = f % 128, lane = t & 31;
    const int row = (t >> 5) * 16 + (lane >> 2), pair = nt * 4 + (lane & 3);
    const float4 v = src[f];
    rows[row][pair] = MmaOp<T>::Pack(v.x * scale, v.y * scale);
    rows[row + 8][pair] = MmaOp<T>::Pack(v.z * scale, v.w * scale);
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int c = threadIdx.x + it * 256, r = c / 8, q = c % 8;  // 8 chunks of 8 values per row
    if (r < valid_rows) {
      const uint4 w = make_uint4(rows[r][4 * q], rows[r][4 * q + 1], rows[r][4 * q + 2], rows[r][4 * q + 3]);
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(r) * stride_l + q * 8) = w;
    }
  }
}

// dK, dV of the chunked key tiles from their slots (the sum of their chunks' partials), scaled
// (dK) and converted into the [B, L, H, D] strides. One CTA of 256 threads per (slot, dK or dV,
// 64-key half, 64-column block): the slot's m64nD fragments of one half are D/64 consecutive
// m64n64 tiles in ConvertFragmentTile's order. Slots past sched->nslots return at once. (The
// first version wrote 4-byte pieces of 16 rows per warp straight from the fragments: 52 us at
// Wan-1.3B and 679 us at 14B on an H100, 2-4x the bytes' time.)
template <typename T, int D>
__device__ __forceinline__ void DkDvChunkConvertTile(const BwdParams& p, const FusedSchedule* sched, const ChunkPlan& cp,
                                                     unsigned block) {
  constexpr int kCb = D / 64;
  const int cb = block % kCb, half = block / kCb;  // half = (slot * 2 + which) * 2 + cw
  const int slot = half >> 2, which = (half >> 1) & 1, cw = half & 1;
  if (slot >= sched->nslots) return;
  const int L = p.seqlen;
  const int nkt = CeilDiv(L, kFKeys);
  const int w = sched->order[2 * cp.capacity + slot];
  const int64_t bh = w / nkt;
  const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
  const int row0 = (w % nkt) * kFKeys + cw * 64;
  const float4* src = reinterpret_cast<const float4*>(cp.partial) +
                      static_cast<int64_t>(slot) * (kChunkPartialFloats<D> / 4) +
                      ((which * 2 + cw) * (D / 8) + cb * 8) * 128;
  const Tensor4& out = which ? p.dv : p.dk;
  T* dst = static_cast<T*>(out.ptr) + b * out.stride_b + h * out.stride_h + cb * 64 +
           static_cast<int64_t>(row0) * out.stride_l;
  ConvertFragmentTile<T>(src, which ? 1.f : p.scale, dst, out.stride_l, L - row0);
}
template <typename T, int D>
__global__ void __launch_bounds__(256) DkDvChunkConvertKernel(BwdParams p, const FusedSchedule* sched, ChunkPlan cp) {
  DkDvChunkConvertTile<T, D>(p, sched, cp, blockIdx.x);
}

__device__ __forceinline__ void RedAddF32x4(float* dst, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}
// A chunk's fp32 dK/dV (this thread's m64nD fragments) added into its tile's slot, in the
// fragment order DkDvChunkConvertKernel reads: float4 ((which * 2 + cw) * (D / 8) + nt) * 128 + t.
template <int D>
__device__ __forceinline__ void AddDkDvPartial(float* dst, int cw, int wtid, const float* dk, const float* dv) {
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    RedAddF32x4(dst + ((cw * (D / 8) + nt) * 128 + wtid) * 4, dk[nt * 4], dk[nt * 4 + 1], dk[nt * 4 + 2], dk[nt * 4 + 3]);
    RedAddF32x4(dst + (((2 + cw) * (D / 8) + nt) * 128 + wtid) * 4, dv[nt * 4], dv[nt * 4 + 1], dv[nt * 4 + 2],
                dv[nt * 4 + 3]);
  }
}

// dQ = scale * accumulator, into the [B, L, H, D] strides. One CTA of 256 threads per 64 x 64
// accumulator tile (ConvertFragmentTile), numbered (bh, query tile, column block).
template <typename T, int D>
__device__ __forceinline__ void DqConvertTile(const BwdParams& p, const float4* acc, unsigned block) {
  const int64_t tile = static_cast<int64_t>(block);
  const int cb = tile % (D / 64);
  const int nq2 = 2 * CeilDiv(p.seqlen, kTileQ);
  const int qt = (tile / (D / 64)) % nq2;
  const int64_t bhi = tile / (D / 64) / nq2;
  const int b = bhi / p.heads, h = bhi % p.heads;
  T* base = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h + cb * 64 +
            static_cast<int64_t>(qt) * kM * p.dq.stride_l;
  ConvertFragmentTile<T>(acc + tile * (kDqTileFloats / 4), p.scale, base, p.dq.stride_l, p.seqlen - qt * kM);
}
template <typename T, int D>
__global__ void __launch_bounds__(256) DqConvertKernel(BwdParams p, const float4* acc) {
  DqConvertTile<T, D>(p, acc, blockIdx.x);
}

// The default since the tenth session (SPARGE_BWD_ONE_CONVERT=0 for the two launches; A/B in
// kernels/NOTES.md): the dK/dV chunk convert and the dQ convert as one launch, the chunk slots' CTAs first (most return at once: slots past
// sched->nslots), then the dQ tiles: one launch boundary and tail fewer, and the chunk convert's
// few busy CTAs run beside the dQ tiles instead of before them.
template <typename T, int D>
__global__ void __launch_bounds__(256) ConvertAllKernel(BwdParams p, const FusedSchedule* sched, ChunkPlan cp,
                                                        unsigned chunk_blocks, const float4* acc) {
  if (blockIdx.x < chunk_blocks) {
    DkDvChunkConvertTile<T, D>(p, sched, cp, blockIdx.x);
  } else {
    DqConvertTile<T, D>(p, acc, blockIdx.x - chunk_blocks);
  }
}

// ---------------------------------------------------------------------------------------------
// Fused backward v10: the v9 math (5 GEMMs per tile pair, dQ partials added to an fp32
// accumulator by bulk reductions) with the loads and the warpgroups decoupled.
//  * Loads by TMA into a 2-stage ring of Q / dO / (LSE, delta) slots with full mbarriers. No
//    producer warp (its registers would push ptxas into serialising the consumers' wgmmas, v9
//    step a): the last of the 8 warps to release a slot (a shared counter) issues the load of the
//    tile two ahead into it. K and V of an item and its first two tiles are issued by thread 0
//    once the previous item is done.
//  * No CTA barrier per tile. Each warpgroup runs its wgmmas asynchronously: S^T and dP^T as two
//    commit groups (the exponentials of P run under dP^T), dV += P^T dO under the dS math,
//    dK += dS^T Q, then the dQ GEMM of the *previous* tile, whose dS^T halves both warpgroups
//    published a tile ago (per-buffer mbarriers, four dS^T buffers), so a warpgroup only waits
//    for the other when it is a whole tile behind and the two drift into a ping-pong on their own.
//  * LSE (x log2 e, +inf past L) and delta are packed per 64-row tile by a prep kernel, which
//    also zeroes the accumulator (one launch instead of memset + gathers).
constexpr int kV10Stages = 2;
constexpr int kV10DsBufs = 4;

template <int D>
struct V10Layout {
  static constexpr int kKvBytes = kFKeys * D * 2;
  static constexpr int kQBytes = kM * D * 2;
  static constexpr int kDsBytes = kFKeys * kM * 2;
  static constexpr int kLdBytes = 2 * kM * 4;  // LSE (log2 domain) then delta, 64 rows each
  static constexpr int kK = 0;
  static constexpr int kV = kKvBytes;
  static constexpr int kQ = 2 * kKvBytes;
  static constexpr int kDO = kQ + kV10Stages * kQBytes;
  static constexpr int kDs = kDO + kV10Stages * kQBytes;
  static constexpr int kDq = kDs + kV10DsBufs * kDsBytes;
  static constexpr int kLd = kDq + 2 * kDqTileFloats * 4;
  // kv_full, full[S], dsready[2][bufs], empty[S]
  static constexpr int kBar = kLd + kV10Stages * kLdBytes;
  static constexpr int kNumBars = 1 + kV10Stages + 2 * kV10DsBufs + kV10Stages;
  // release counters [S], work-item records [2][8] (item, count, tiles, first query row,
  // first transposed-LUT entry, chunk part or -1)
  static constexpr int kMisc = kBar + kNumBars * 8;
  static constexpr int kRecInts = 8;
  static constexpr int kBytes = kMisc + 4 * (kV10Stages + 2 * kRecInts) + 1024;  // + alignment slack
};
static_assert(V10Layout<128>::kBytes <= 227 * 1024, "v10 shared memory over the sm_90 limit");

struct V10Item {
  int item, b, h, k0, count, n, q0;  // q0: first query row of tile 0 (and, + 64, of tile 1)
  int64_t bh;
  const int32_t* tlut;
};

__device__ __forceinline__ float2 LdShared2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void StShared32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void StShared128(uint32_t addr, float a, float b, float c, float d) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

template <typename T, int D>
__global__ void __launch_bounds__(kFThreads, 1)
    BwdFusedV10Kernel(BwdParams p, const __grid_constant__ CUtensorMap tm_q,
                      const __grid_constant__ CUtensorMap tm_do, const __grid_constant__ CUtensorMap tm_k,
                      const __grid_constant__ CUtensorMap tm_v, float* dq_acc, const float* ld,
                      FusedSchedule* sched, int l2_hint, ChunkPlan cp) {
  using Lay = V10Layout<D>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t base = SmemAddr(smem);
  const uint32_t sK = base + Lay::kK, sV = base + Lay::kV;
  auto sQ = [&](int s) { return base + Lay::kQ + s * Lay::kQBytes; };
  auto sDO = [&](int s) { return base + Lay::kDO + s * Lay::kQBytes; };
  auto sDs = [&](int j) { return base + Lay::kDs + j * Lay::kDsBytes; };
  const uint32_t bars = base + Lay::kBar;
  const uint32_t kv_full = bars;
  auto full = [&](int s) { return bars + 8 * (1 + s); };
  auto dsready = [&](int w, int j) { return bars + 8 * (1 + kV10Stages + w * kV10DsBufs + j); };
  auto empty = [&](int s) { return bars + 8 * (1 + kV10Stages + 2 * kV10DsBufs + s); };
  int* rel = reinterpret_cast<int*>(smem + Lay::kMisc);
  int* sItem = rel + kV10Stages;

  const int tid = threadIdx.x, cw = tid >> 7, wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;
  const int tig = lane & 3;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, kTileQ), nk = CeilDiv(L, p.block_k), nkt = CeilDiv(L, kFKeys);

  if (tid == 0) {
    MbarInit(kv_full, 1);
    for (int s = 0; s < kV10Stages; ++s) MbarInit(full(s), 1);
    for (int j = 0; j < 2 * kV10DsBufs; ++j) MbarInit(dsready(0, j), 128);
    for (int s = 0; s < kV10Stages; ++s) MbarInit(empty(s), kFThreads);
    for (int s = 0; s < kV10Stages; ++s) rel[s] = 0;
    FenceMbarInit();
  }

  // Work items travel through shared records (item, count, tiles, first query row, first LUT
  // entry, chunk part) that thread 0 fills with the item's global reads (count, last and first
  // transposed-LUT entries) while the previous item still runs; every thread then decodes the
  // rest arithmetically. e: the item's list position (its chunk part, with a ChunkPlan).
  auto publish = [&](int slot, int item, int e) {
    int* r = sItem + Lay::kRecInts * slot;
    r[0] = item;
    if (item < 0) return;
    const int64_t bh = item / nkt;
    const int kb = (item % nkt) * kFKeys / p.block_k;
    int count = p.t_counts[bh * nk + kb];
    const int32_t* tlut = p.t_indices + (bh * nk + kb) * nq;
    int lo = 0, part = -1;
    if (cp.partial != nullptr) {
      part = sched->order[cp.capacity + e];
      if (part >= 0) {
        const int n = CeilDiv(count, cp.chunk_blocks), j = part >> 20;
        lo = ChunkLo(count, n, j);
        count = ChunkLo(count, n, j + 1) - lo;
      }
    }
    r[1] = count;
    r[2] = count > 0 ? FusedValidTiles(count, tlut[lo + count - 1], L) : 0;
    r[3] = count > 0 ? tlut[lo] * kTileQ : 0;
    r[4] = lo;
    r[5] = part;
  };
  auto decode = [&](int slot) {
    const int* r = sItem + Lay::kRecInts * slot;
    V10Item x;
    x.item = r[0];
    const int item = max(x.item, 0);
    x.bh = item / nkt;
    x.b = static_cast<int>(x.bh / p.heads);
    x.h = static_cast<int>(x.bh % p.heads);
    x.k0 = (item % nkt) * kFKeys;
    const int kb = x.k0 / p.block_k;
    x.count = r[1];
    x.n = r[2];
    x.q0 = r[3];
    x.tlut = p.t_indices + (x.bh * nk + kb) * nq + r[4];
    return x;
  };
  // Q, dO (TMA, rows past L zero-filled) and the packed LSE / delta of one 64-row query tile.
  auto issue_tile = [&](int s, int b, int h, int64_t bh, int q0) {
    const uint32_t bar = full(s);
    MbarArriveExpectTx(bar, 2 * Lay::kQBytes + Lay::kLdBytes);
    if (l2_hint >= 2) {  // Q and dO streamed with evict-first priority (SPARGE_BWD_L2HINT)
      const uint64_t pol = L2EvictFirstPolicy();
#pragma unroll
      for (int c = 0; c < D / 64; ++c) TmaLoad4dHint(sQ(s) + c * kM * 128, &tm_q, bar, c * 64, q0, h, b, pol);
#pragma unroll
      for (int c = 0; c < D / 64; ++c) TmaLoad4dHint(sDO(s) + c * kM * 128, &tm_do, bar, c * 64, q0, h, b, pol);
    } else {
#pragma unroll
      for (int c = 0; c < D / 64; ++c) TmaLoad4d(sQ(s) + c * kM * 128, &tm_q, bar, c * 64, q0, h, b);
#pragma unroll
      for (int c = 0; c < D / 64; ++c) TmaLoad4d(sDO(s) + c * kM * 128, &tm_do, bar, c * 64, q0, h, b);
    }
    BulkLoad(base + Lay::kLd + s * Lay::kLdBytes, ld + (bh * (2 * nq) + q0 / kM) * (2 * kM), Lay::kLdBytes, bar);
  };
  auto tile_q0 = [](const int32_t* tlut, int i) { return tlut[i >> 1] * kTileQ + (i & 1) * kM; };
  // K, V and the first tiles of an item; g0 = the CTA's tile counter at the item's start.
  auto issue_item = [&](const V10Item& x, uint32_t g0) {
    MbarArriveExpectTx(kv_full, 2 * Lay::kKvBytes);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) TmaLoad4d(sK + c * kFKeys * 128, &tm_k, kv_full, c * 64, x.k0, x.h, x.b);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) TmaLoad4d(sV + c * kFKeys * 128, &tm_v, kv_full, c * 64, x.k0, x.h, x.b);
    for (int i = 0; i < min(x.n, kV10Stages); ++i)  // tiles 0 and 1: halves of one query block
      issue_tile((g0 + i) % kV10Stages, x.b, x.h, x.bh, x.q0 + i * kM);
  };

  int w_next = 0, item_next = -1;
  if (tid == 0) {
    PrefetchTensorMap(&tm_q);
    PrefetchTensorMap(&tm_do);
    PrefetchTensorMap(&tm_k);
    PrefetchTensorMap(&tm_v);
    const int w0 = atomicAdd(&sched->next, 1);
    publish(0, w0 < sched->items ? sched->order[w0] : -1, w0);
    const V10Item x = decode(0);
    if (x.item >= 0 && x.n > 0) issue_item(x, 0);
  }
  __syncthreads();

  const float scale_log2 = p.scale * kLog2e;
  // dQ = dS K (see the v9 kernel): D = 128: this warpgroup's 64 head-dimension columns over all
  // 128 keys (both warpgroups' dS^T halves); D = 64: its own 64 keys, the whole head dimension.
  constexpr int kDqSteps = D == 128 ? kFKeys / 16 : 64 / 16;
  const uint32_t ds_row0 = D == 128 ? 0 : cw * 64 * 128;
  const uint32_t kb_addr = D == 128 ? sK + cw * kFKeys * 128 : sK + cw * 64 * 128;
  const int dq_block = D == 128 ? cw : 0;
  const int ds_src = D == 128 ? 1 - cw : cw;  // whose dS^T rows this warpgroup's dQ GEMM reads
  const uint32_t dq_smem = base + Lay::kDq + cw * kDqTileFloats * 4;
  // Descriptor bases: K-major operands (S^T = K Q^T, dP^T = V dO^T: this warpgroup's 64 key
  // rows, stage-0 Q / dO) and MN-major ones (dO, Q for dV / dK; dS^T buffer 0 and K for dQ).
  constexpr uint32_t km_hi = DescHi(1024), mn_hi = DescHi(1024);
  const uint32_t k_lo = DescLo(sK + cw * 64 * 128, 16), v_lo = DescLo(sV + cw * 64 * 128, 16);
  const uint32_t q_lo0 = DescLo(sQ(0), 16), do_lo0 = DescLo(sDO(0), 16);
  constexpr uint32_t kMnLo = ((kM * 128) >> 4 << 16) - (16 >> 4 << 16);  // K-major lo -> MN-major lo
  const uint32_t ds_lo0 = DescLo(sDs(0) + ds_row0, kFKeys * 128), kb_lo = DescLo(kb_addr, kFKeys * 128);
  const uint32_t ds_thr = (cw * 64 + warp * 16 + (lane >> 2)) * 128 + tig * 4;

  uint32_t g0 = 0;     // tiles this CTA has started before the current item
  uint32_t kv_it = 0;  // items with K/V loads so far
  for (int it = 0;; ++it) {
    const V10Item x = decode(it & 1);
    if (x.item < 0) break;
    if (tid == 0) w_next = atomicAdd(&sched->next, 1);
    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

    if (x.n > 0) {
      float dq[32];
      // dQ of tile g (its dS^T published by warpgroup ds_src) -> shared -> one bulk reduction.
      auto dq_gemm = [&](uint32_t g) {
        MbarWait(dsready(ds_src, g % kV10DsBufs), (g / kV10DsBufs) & 1);
        const uint32_t ds_lo = ds_lo0 + (g % kV10DsBufs) * (Lay::kDsBytes >> 4);
        WgmmaFence();
#pragma unroll
        for (int kc = 0; kc < kDqSteps; ++kc)
          WgmmaSSTT_N64<T>(dq, Desc(ds_lo + kc * 128, mn_hi), Desc(kb_lo + kc * 128, mn_hi), kc > 0);
        WgmmaCommit();
      };
      auto reduce_dq = [&](int qtile) {
        if (wtid == 0) BulkWaitRead0();  // the previous reduction has read the staging buffer
        NamedBarrierSync(3 + cw, 128);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          StShared128(dq_smem + (nt * 128 + wtid) * 16, dq[nt * 4], dq[nt * 4 + 1], dq[nt * 4 + 2], dq[nt * 4 + 3]);
        FenceProxyAsync();
        NamedBarrierSync(3 + cw, 128);
        if (wtid == 0) {
          float* dst = dq_acc + ((x.bh * (2 * nq) + qtile) * (D / 64) + dq_block) * kDqTileFloats;
          if (l2_hint >= 1)  // the accumulator kept in L2 with evict-last priority
            BulkReduceAddF32Hint(dst, dq_smem, kDqTileFloats * 4, L2EvictLastPolicy());
          else
            BulkReduceAddF32(dst, dq_smem, kDqTileFloats * 4);
          BulkCommit();
        }
      };

      MbarWait(kv_full, kv_it & 1);
      float st[kM / 2], dpt[kM / 2];
      int prev_qtile = 0;
      for (int i = 0; i < x.n; ++i) {
        const uint32_t g = g0 + i;
        const int s = g % kV10Stages;
        const int qtile = x.tlut[i >> 1] * 2 + (i & 1);  // used one tile later: latency hidden
        int q0_ahead = 0;
        if (lane == 0 && i + kV10Stages < x.n) q0_ahead = tile_q0(x.tlut, i + kV10Stages);
        MbarWait(full(s), (g / kV10Stages) & 1);
        const uint32_t q_lo = q_lo0 + s * (Lay::kQBytes >> 4), do_lo = do_lo0 + s * (Lay::kQBytes >> 4);
        WgmmaFence();
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks)
          Wg<T>::template SS<kM>(st, Desc(k_lo + KOff(kFKeys, ks), km_hi), Desc(q_lo + KOff(kM, ks), km_hi), ks > 0);
        WgmmaCommit();
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks)
          Wg<T>::template SS<kM>(dpt, Desc(v_lo + KOff(kFKeys, ks), km_hi), Desc(do_lo + KOff(kM, ks), km_hi), ks > 0);
        WgmmaCommit();
        if (tid == 0) {  // the next item: its list entry now, its record one tile later
          if (i == 0) item_next = w_next < sched->items ? sched->order[w_next] : -1;
          if (i == min(1, x.n - 1)) publish((it + 1) & 1, item_next, w_next);
        }
        WgmmaWaitN<1>();  // S^T(i) done; dP^T(i) runs under the exponentials

        // Explicit shared-space accesses: through the generic pointer of the aligned dynamic
        // shared base the compiler emits generic loads/stores (long-scoreboard latency).
        const uint32_t ld_addr = base + Lay::kLd + s * Lay::kLdBytes + tig * 8;
#pragma unroll
        for (int nt = 0; nt < kM / 8; ++nt) {
          const float2 l2 = LdShared2(ld_addr + nt * 32);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            st[nt * 4 + e] = FastExp2(fmaf(st[nt * 4 + e], scale_log2, -((e & 1) ? l2.y : l2.x)));
        }
        uint32_t pa[kM / 16][4];
        PackA<T>(pa, st);
        WgmmaFence();
#pragma unroll
        for (int kc = 0; kc < kM / 16; ++kc)
          Wg<T>::template RS<D>(dv, pa[kc], Desc(do_lo + kMnLo + kc * 128, mn_hi));
        WgmmaCommit();
        WgmmaWaitN<1>();  // dP^T(i) done; dV runs under the dS math

#pragma unroll
        for (int nt = 0; nt < kM / 8; ++nt) {
          const float2 d2 = LdShared2(ld_addr + kM * 4 + nt * 32);
#pragma unroll
          for (int e = 0; e < 4; ++e) dpt[nt * 4 + e] = st[nt * 4 + e] * (dpt[nt * 4 + e] - ((e & 1) ? d2.y : d2.x));
        }
        uint32_t da[kM / 16][4];
        PackA<T>(da, dpt);
        // dS^T rows (this thread's keys row0, row0 + 8) into the 128B-swizzled [128][64] tile:
        // 16-byte chunk nt of row r sits at chunk nt ^ (r % 8), and row0 % 8 = lane / 4.
        const uint32_t ds_addr = sDs(g % kV10DsBufs) + ds_thr;
#pragma unroll
        for (int nt = 0; nt < kM / 8; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            StShared32(ds_addr + r * 1024 + ((nt ^ (lane >> 2)) << 4), da[nt >> 1][(nt & 1) * 2 + r]);
        FenceProxyAsync();
        WgmmaFence();
#pragma unroll
        for (int kc = 0; kc < kM / 16; ++kc)
          Wg<T>::template RS<D>(dk, da[kc], Desc(q_lo + kMnLo + kc * 128, mn_hi));
        WgmmaCommit();
        MbarArrive(dsready(cw, g % kV10DsBufs));  // this warpgroup's dS^T(g) is in shared memory
        if (i > 0) {
          dq_gemm(g - 1);
          WgmmaWaitN<0>();
          reduce_dq(prev_qtile);
        } else {
          WgmmaWaitN<0>();
        }
        // Slot s (Q, dO, LSE, delta of tile i) is free once every thread is past its reads and
        // waits (empty[s], one arrival per thread); the last warp to arrive (a shared counter
        // says which) loads tile i + 2 into it after a wait on empty[s] that returns at once.
        FenceProxyAsync();
        MbarArrive(empty(s));
        __syncwarp();
        if (lane == 0) {
          const int old = atomicAdd(&rel[s], 1);
          if ((old & 7) == 7 && i + kV10Stages < x.n) {
            MbarWait(empty(s), (g / kV10Stages) & 1);
            issue_tile(s, x.b, x.h, x.bh, q0_ahead);
          }
        }
        prev_qtile = qtile;
      }
      dq_gemm(g0 + x.n - 1);
      WgmmaWaitN<0>();
      reduce_dq(prev_qtile);
      g0 += x.n;
      ++kv_it;
    } else if (tid == 0) {
      publish((it + 1) & 1, w_next < sched->items ? sched->order[w_next] : -1, w_next);
    }
    // The chunk part, read while this item's record is still there (the next publish into this
    // record slot comes after the barrier).
    const int part = cp.partial != nullptr ? sItem[Lay::kRecInts * (it & 1) + 5] : -1;
    __syncthreads();  // K, V, the dS^T buffers and every slot of this item are free
    if (tid == 0) {
      const V10Item y = decode((it + 1) & 1);
      if (y.item >= 0 && y.n > 0) issue_item(y, g0);
    }
    if (part < 0) {
      StoreDkDv<T, D>(p, x.b, x.h, x.k0 + cw * 64 + warp * 16, lane, dk, dv);
    } else {
      AddDkDvPartial<D>(cp.partial + static_cast<int64_t>(part & 0xFFFFF) * kChunkPartialFloats<D>, cw, wtid, dk, dv);
    }
  }
  if (wtid == 0) BulkWait0();
}

// Packs LSE (x log2 e; +inf past L, so P = 0 there) and delta (0 past L) per 64-row query tile:
// ld[bh][tile][0..63] and [64..127]; zeroes the dQ accumulator and the work list's counter.
__global__ void __launch_bounds__(256) BwdPrepKernel(BwdParams p, float* ld, float4* acc, int64_t acc_vec4,
                                                     FusedSchedule* sched) {
  const int L = p.seqlen;
  const int64_t rows_pad = 2 * CeilDiv(L, kTileQ) * static_cast<int64_t>(kM);
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * rows_pad;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t0 == 0) sched->next = 0;
  for (int64_t i = t0; i < total; i += stride) {
    const int64_t bh = i / rows_pad;
    const int r = static_cast<int>(i % rows_pad);
    const bool ok = r < L;
    float* dst = ld + (bh * (rows_pad / kM) + r / kM) * (2 * kM) + r % kM;
    dst[0] = ok ? p.lse[bh * L + r] * kLog2e : INFINITY;
    dst[kM] = ok ? p.delta[bh * L + r] : 0.f;
  }
  const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t i = t0; i < acc_vec4; i += stride) acc[i] = z;
}


// The v10 prep with delta fused in (the default since the tenth session; SPARGE_BWD_PREP_DELTA=0
// runs DeltaKernel and BwdPrepKernel instead; kernels/NOTES.md): delta = sum_d dO * O computed here from the token rows instead of by
// DeltaKernel, packed with LSE into ld as above, and the same zeroing. D/8 lanes per row with
// 16-byte loads and DeltaKernel's summation order (the values are bitwise equal); rows numbered
// query-row fastest within (b, h), so ld and LSE are walked in order and each row's O and dO are
// whole 128/256-byte segments. p.delta is not written (nothing after the prep reads it on this
// path). Saves one launch and its tail, and the delta array's round trip.
template <typename T, int D>
__global__ void __launch_bounds__(256) BwdPrepDeltaKernel(BwdParams p, float* ld, float4* acc, int64_t acc_vec4,
                                                          FusedSchedule* sched) {
  constexpr int kLanes = D / 8;
  const int L = p.seqlen;
  const int64_t rows_pad = 2 * CeilDiv(L, kTileQ) * static_cast<int64_t>(kM);
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * rows_pad;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int sub = threadIdx.x % kLanes;
  if (t0 == 0) sched->next = 0;
  // total is a multiple of 128 rows and a warp holds 32 / kLanes consecutive rows, so every
  // lane of a warp runs the same number of iterations (the shuffles below need all 32).
  for (int64_t i = t0 / kLanes; i < total; i += threads / kLanes) {
    const int64_t bh = i / rows_pad;
    const int r = static_cast<int>(i % rows_pad);
    const bool ok = r < L;
    float acc_d = 0.f;
    if (ok) {
      const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
      const T* o = static_cast<const T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h +
                   static_cast<int64_t>(r) * p.o.stride_l + sub * 8;
      const T* d = static_cast<const T*>(p.d_o.ptr) + b * p.d_o.stride_b + h * p.d_o.stride_h +
                   static_cast<int64_t>(r) * p.d_o.stride_l + sub * 8;
      acc_d = RowDotPartial8(o, d);
    }
    acc_d = LaneGroupSum<kLanes>(acc_d);
    if (sub == 0) {
      float* dst = ld + (bh * (rows_pad / kM) + r / kM) * (2 * kM) + r % kM;
      dst[0] = ok ? p.lse[bh * L + r] * kLog2e : INFINITY;
      dst[kM] = acc_d;
    }
  }
  const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t i = t0; i < acc_vec4; i += threads) acc[i] = z;
}

// The fused launchers' shared steps: the work list (one CTA), and dQ from the accumulator followed
// by the workspace's release (also after an earlier error, which it then returns).
cudaError_t LaunchSchedule(const BwdParams& p, FusedSchedule* sched, cudaStream_t stream,
                           const ChunkPlan* cp = nullptr) {
  const int hist_bytes = (CeilDiv(p.seqlen, kTileQ) + 1) * 4;
  const int items = p.batch * p.heads * CeilDiv(p.seqlen, kFKeys);
  const int tail_items = 2 * std::min(items, SmCount());
  if (cp != nullptr && cp->partial != nullptr) {
    // The counts in shared memory beside hist while they fit (Wan-14B-720p: 23640 items, 92 KB).
    // SPARGE_BWD_SCHED_COUNTS=global forces the global-memory reads (tests cover both paths).
    static const char* const kWhere[] = {"global", nullptr};
    const bool force_global = EnvIs("SPARGE_BWD_SCHED_COUNTS", "global", kWhere);
    const int counts_in_smem = !force_global && hist_bytes + items * 4 <= 160 * 1024 ? 1 : 0;
    const int smem = hist_bytes + (counts_in_smem ? items * 4 : 0);
    cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(FusedChunkScheduleKernel), smem);
    if (err != cudaSuccess) return err;
    err = LaunchKernel(FusedChunkScheduleKernel, 1, kSchedThreads, smem, stream, p, sched, tail_items, *cp,
                       counts_in_smem);
    if (err != cudaSuccess || !cp->sort) return err;
    err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(FusedSortScheduleKernel), hist_bytes);
    if (err != cudaSuccess) return err;
    return LaunchKernel(FusedSortScheduleKernel, p.batch * p.heads, kSortThreads, hist_bytes, stream, p, sched, *cp);
  }
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(FusedScheduleKernel), hist_bytes);
  if (err != cudaSuccess) return err;
  return LaunchKernel(FusedScheduleKernel, 1, kSchedThreads, hist_bytes, stream, p, sched, tail_items);
}

// SPARGE_BWD_CHUNK: query blocks per chunk of a heavy key tile (ChunkPlan), default 32, 0 = off;
// SPARGE_BWD_SORT: with chunking, each head's entries by median query block, default 1, 0 = off.
// Chunks of 32 with the sort measured fastest on the H100 (kernels/NOTES.md, "Backward v12").
// Parsed by EnvInt (env_knobs.h): a value outside the range is reported and means the default.
constexpr int kDefaultChunkBlocks = 32;

template <typename T, int D>
cudaError_t ConvertAndFree(const BwdParams& p, const float* acc, int64_t floats, void* ws, cudaError_t err,
                           cudaStream_t stream) {
  if (err == cudaSuccess) {
    err = LaunchKernel(DqConvertKernel<T, D>, static_cast<unsigned>(floats / kDqTileFloats), 256, 0, stream, p,
                       reinterpret_cast<const float4*>(acc));
  }
  const cudaError_t free_err = cudaFreeAsync(ws, stream);
  return err != cudaSuccess ? err : free_err;
}

// Workspace (one stream-ordered allocation): the fp32 dQ accumulator, then the work list. The
// accumulator and the list's counter are zeroed; the schedule kernel writes the list; the
// persistent fused kernel runs one CTA per SM; the convert kernel writes dQ.
template <typename T, int D>
cudaError_t LaunchFused(const BwdParams& p, cudaStream_t stream) {
  const int nq = CeilDiv(p.seqlen, kTileQ);
  const int items = p.batch * p.heads * CeilDiv(p.seqlen, kFKeys);
  const int64_t floats = static_cast<int64_t>(p.batch) * p.heads * (2 * nq) * (D / 64) * kDqTileFloats;
  const size_t acc_bytes = floats * 4;
  const size_t bytes = acc_bytes + sizeof(FusedSchedule) + static_cast<size_t>(items) * 4;
  void* ws = nullptr;
  cudaError_t err = AllocFromLauncherPool(bytes, stream, &ws);
  if (err != cudaSuccess) return err;
  float* acc = static_cast<float*>(ws);
  FusedSchedule* sched = reinterpret_cast<FusedSchedule*>(static_cast<char*>(ws) + acc_bytes);
  err = cudaMemsetAsync(ws, 0, acc_bytes + sizeof(FusedSchedule), stream);
  if (err == cudaSuccess) {
    err = LaunchSchedule(p, sched, stream);
  }
  if (err == cudaSuccess) {
    constexpr int smem = FusedLayout<D>::kBytes;
    auto kernel = BwdFusedSm90Kernel<T, D>;
    err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
    if (err == cudaSuccess) {
      kernel<<<std::min(items, SmCount()), kFThreads, smem, stream>>>(p, acc, sched);
      err = cudaGetLastError();
    }
  }
  return ConvertAndFree<T, D>(p, acc, floats, ws, err, stream);
}

// v10: TMA maps over Q, dO (64-row boxes), K, V (128-row boxes); workspace = accumulator, packed
// LSE / delta, work list. Returns cudaErrorNotSupported (nothing launched) when the strides do
// not suit TMA; the caller then runs v9.
template <typename T, int D>
cudaError_t LaunchFusedV10(const BwdParams& p, cudaStream_t stream) {
  const BlhdShape shape{p.dtype, p.batch, p.seqlen, p.heads, p.head_dim};
  const Tensor4* ts[] = {&p.q, &p.d_o, &p.k, &p.v};
  CUtensorMap mq, mdo, mk, mv;
  if (!TmaCompatible(ts, 4, shape) || !EncodeBlhd(&mq, p.q, shape, kM) || !EncodeBlhd(&mdo, p.d_o, shape, kM) ||
      !EncodeBlhd(&mk, p.k, shape, kFKeys) || !EncodeBlhd(&mv, p.v, shape, kFKeys))
    return cudaErrorNotSupported;
  const int nq = CeilDiv(p.seqlen, kTileQ);
  const int items = p.batch * p.heads * CeilDiv(p.seqlen, kFKeys);
  const int64_t tiles = static_cast<int64_t>(p.batch) * p.heads * (2 * nq);
  const int64_t floats = tiles * (D / 64) * kDqTileFloats;
  const size_t acc_bytes = floats * 4, ld_bytes = tiles * 2 * kM * 4;
  // Chunked heavy items: slots for an eighth of the items plus one per (batch, head) (at 1.3B and
  // 14B, 90-97%, 2-12% of the items are candidates), zeroed with the accumulator (their 128 KB
  // each follow it: a quarter of its size at long sequences, more at short ones where the
  // B x H term dominates); list entries for three more chunks per item. Off when no tile can be
  // a candidate (chunk_blocks >= query blocks) or the list would not fit in int indices.
  ChunkPlan cp{};
  cp.chunk_blocks = EnvInt("SPARGE_BWD_CHUNK", kDefaultChunkBlocks, 0, 1 << 20);
  cp.sort = EnvInt("SPARGE_BWD_SORT", 1, 0, 1);
  const bool chunked = cp.chunk_blocks > 0 && cp.chunk_blocks < nq && CeilDiv(nq, cp.chunk_blocks) < 2048 &&
                       items < (1 << 26) && items / 8 + p.batch * p.heads < (1 << 20);
  cp.max_slots = chunked ? items / 8 + p.batch * p.heads : 0;
  cp.extra = chunked ? 3 * items : 0;
  cp.capacity = items + cp.extra;
  const int64_t slot_floats = static_cast<int64_t>(cp.max_slots) * kChunkPartialFloats<D>;
  const size_t list_ints = chunked ? 4 * static_cast<size_t>(cp.capacity) + cp.max_slots + p.batch * p.heads
                                   : static_cast<size_t>(items);
  const size_t list_bytes = sizeof(FusedSchedule) + list_ints * 4;
  const size_t bytes = acc_bytes + slot_floats * 4 + ld_bytes + list_bytes;
  void* ws = nullptr;
  cudaError_t err = AllocFromLauncherPool(bytes, stream, &ws);
  if (err != cudaSuccess) return err;
  float* acc = static_cast<float*>(ws);  // then the slots (zeroed together)
  cp.partial = chunked ? acc + floats : nullptr;
  float* ld = acc + floats + slot_floats;
  FusedSchedule* sched = reinterpret_cast<FusedSchedule*>(ld + ld_bytes / 4);
  const int sms = SmCount();
  // The schedule on a side stream (the default since the tenth session, SPARGE_BWD_SCHED_STREAM=0
  // turns it off; kernels/NOTES.md): the one-CTA
  // schedule kernels (22 + 8 us at Wan-1.3B, 162 + 15 us at 14B on an H100) run on a side stream
  // under the bandwidth-bound prep kernel (80 / 634 us); they share no memory with it (prep
  // zeroes the accumulator, the slots and sched->next, the schedule writes the list and the
  // other header fields). Joined before the fused kernel, also after an error, since the
  // workspace is freed on the caller's stream.
  // Without a side stream (its creation failed, e.g. under global-mode stream capture) the
  // schedule stays on the caller's stream.
  cudaStream_t sched_stream = stream;
  if (EnvInt("SPARGE_BWD_SCHED_STREAM", 1, 0, 1) > 0 && SideStream(&sched_stream) == cudaSuccess) {
    err = OrderAfter(sched_stream, stream);
    if (err != cudaSuccess) sched_stream = stream;
  }
  const bool forked = sched_stream != stream;
  if (err == cudaSuccess) {
    if (EnvInt("SPARGE_BWD_PREP_DELTA", 1, 0, 1) > 0) {
      err = LaunchKernel(BwdPrepDeltaKernel<T, D>, sms * 8, 256, 0, stream, p, ld, reinterpret_cast<float4*>(acc),
                         (floats + slot_floats) / 4, sched);
    } else {
      err = LaunchBwdDelta(p, stream);
      if (err == cudaSuccess) {
        err = LaunchKernel(BwdPrepKernel, sms * 4, 256, 0, stream, p, ld, reinterpret_cast<float4*>(acc),
                           (floats + slot_floats) / 4, sched);
      }
    }
  }
  if (err == cudaSuccess) {
    err = LaunchSchedule(p, sched, sched_stream, &cp);
  }
  if (forked) {
    const cudaError_t join_err = OrderAfter(stream, sched_stream);
    if (err == cudaSuccess) err = join_err;
  }
  if (err == cudaSuccess) {
    constexpr int smem = V10Layout<D>::kBytes;
    auto kernel = BwdFusedV10Kernel<T, D>;
    err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
    if (err == cudaSuccess) {
      // L2 priorities (kernels/NOTES.md, H100 runs): 2 (default) = dQ accumulator reductions
      // evict-last and Q/dO loads evict-first (4% faster on the H100: the kernel is DRAM-bound
      // there); SPARGE_BWD_L2HINT=0 none, =1 accumulator only (A/B).
      const int l2_hint = EnvInt("SPARGE_BWD_L2HINT", 2, 0, 2);
      // Chunked lists can hold more entries than items (short sequences: more CTAs than items).
      err = LaunchKernel(kernel, std::min(cp.capacity, sms), kFThreads, smem, stream, p, mq, mdo, mk, mv, acc, ld,
                         sched, l2_hint, cp);
    }
  }
  const unsigned chunk_blocks = static_cast<unsigned>(cp.max_slots) * 4 * (D / 64);
  if (err == cudaSuccess && cp.partial != nullptr && EnvInt("SPARGE_BWD_ONE_CONVERT", 1, 0, 1) > 0) {
    err = LaunchKernel(ConvertAllKernel<T, D>, chunk_blocks + static_cast<unsigned>(floats / kDqTileFloats), 256, 0,
                       stream, p, static_cast<const FusedSchedule*>(sched), cp, chunk_blocks,
                       reinterpret_cast<const float4*>(acc));
    const cudaError_t free_err = cudaFreeAsync(ws, stream);
    return err != cudaSuccess ? err : free_err;
  }
  if (err == cudaSuccess && cp.partial != nullptr) {
    err = LaunchKernel(DkDvChunkConvertKernel<T, D>, chunk_blocks, 256, 0, stream, p,
                       static_cast<const FusedSchedule*>(sched), cp);
  }
  return ConvertAndFree<T, D>(p, acc, floats, ws, err, stream);
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

// SPARGE_BWD_IMPL=split selects the deterministic two-kernel path, =v9 the v9 fused kernel (A/B);
// the fused kernels need 128-wide key blocks (a CTA walks one transposed-LUT row for all 128
// keys). bf16 and fp16 (the fp16 fused instantiation passed the GPU tests from v10 on).
bool BwdImplIs(const char* value) {
  static const char* const kImpls[] = {"fused", "v9", "split", nullptr};
  return EnvIs("SPARGE_BWD_IMPL", value, kImpls);
}
bool UseFusedBwd(const BwdParams& p) { return p.block_k % kFKeys == 0 && !BwdImplIs("split"); }

template <typename T, int D>
cudaError_t Launch(const BwdParams& p, cudaStream_t stream) {
  if (UseFusedBwd(p) && !BwdImplIs("v9")) {
    const cudaError_t err = LaunchFusedV10<T, D>(p, stream);  // delta in its prep kernel
    if (err != cudaErrorNotSupported) return err;
  }
  cudaError_t err = LaunchBwdDelta(p, stream);
  if (err != cudaSuccess) return err;
  if (UseFusedBwd(p)) return LaunchFused<T, D>(p, stream);
  err = p.block_k % 128 == 0 ? LaunchDkv<T, D, 2>(p, stream) : LaunchDkv<T, D, 1>(p, stream);
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
