// SpargeAttention2 hybrid Top-k/Top-p block-mask predictor (SPARSE_ATTENTION.md section 2):
// pool Q and K per block, centre K by its sequence mean, score, row softmax (fp32), and per row
// the blocks a stable descending sort (ties: lower key block first) would keep under
// TOPK/TOPP/HYBRID/DENSE, found by threshold selection instead of sorting; the LUT in ascending
// key-block order and its transpose for the backward pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/device_utils.cuh"
#include "kernels/launch_utils.h"
#include "kernels/sparge_kernels.h"

namespace sparge::kernels {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kMaxNk = 4096;
constexpr int kScoreTile = 64;   // query blocks and key blocks per ScoreKernel CTA
constexpr int kScoreChunk = 32;  // channels per shared-memory stage of ScoreKernel (default)
// Scores are staged in global memory for a chunk of (b, h) at a time: 32 MB keeps a chunk
// L2-resident between the score and selection kernels and bounds the workspace for long inputs.
constexpr int64_t kScoreBudgetBytes = int64_t{32} << 20;

size_t Align256(size_t x) { return (x + 255) / 256 * 256; }

struct Workspace {
  float* qpool;     // [B][H][Nq][D]
  float* kpool;     // [B][H][Nk][D]
  float* kmean;     // [B][H][D]
  uint32_t* tbits;  // [B][H][Nk][words(Nq)]
  float* scores;    // [chunk_bh][Nq][Nk]
  int64_t chunk_bh;  // (b, h) pairs scored per ScoreKernel/SelectKernel launch pair
  size_t bytes;
};

Workspace Carve(const MaskParams& p, void* base) {
  const size_t bh = static_cast<size_t>(p.batch) * p.heads;
  const int nq = CeilDiv(p.seqlen, p.block_q), nk = CeilDiv(p.seqlen, p.block_k);
  const size_t words = CeilDiv(nq, 32);
  Workspace w{};
  char* c = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t n) {
    char* r = c ? c + off : nullptr;
    off += Align256(n);
    return r;
  };
  w.qpool = reinterpret_cast<float*>(take(bh * nq * p.head_dim * 4));
  w.kpool = reinterpret_cast<float*>(take(bh * nk * p.head_dim * 4));
  w.kmean = reinterpret_cast<float*>(take(bh * p.head_dim * 4));
  w.tbits = reinterpret_cast<uint32_t*>(take(bh * nk * words * 4));
  const int64_t per_bh = static_cast<int64_t>(nq) * nk * 4;
  w.chunk_bh = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(bh), kScoreBudgetBytes / per_bh, int64_t{65535}}));
  w.scores = reinterpret_cast<float*>(take(w.chunk_bh * per_bh));
  w.bytes = off;
  return w;
}

// Mean of each block of rows of x[b, :, h, :] -> out[b][h][n][D]. 16-byte loads; each CTA pools
// one block with D/8 threads per row and reduces the row groups in a fixed order. A thread's rows
// are loaded kBatch at a time before any is summed (rows past the block are not loaded), so each
// thread keeps up to kBatch loads in flight instead of one: pooling reads Q and K once and is
// bound by memory parallelism, not arithmetic. The per-thread summation order is unchanged, so
// the pooled values are bit for bit those of the one-load-at-a-time loop.
// Grid (blocks, H, B).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) PoolKernel(Tensor4 x, int L, int H, int block, float* out) {
  constexpr int kLanes = D / 8;
  constexpr int kGroups = kThreads / kLanes;
  __shared__ float red[kGroups][D];
  const int n = blockIdx.x, h = blockIdx.y;
  const int b = blockIdx.z;
  const int nblocks = gridDim.x;
  const int tid = threadIdx.x, ch = tid % kLanes, grp = tid / kLanes;
  const int r0 = n * block, r1 = min(L, r0 + block);
  const T* base = static_cast<const T*>(x.ptr) + b * x.stride_b + h * x.stride_h + ch * 8;
  constexpr int kBatch = 8;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int rb = r0 + grp; rb < r1; rb += kBatch * kGroups) {
    uint4 raw[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int r = rb + j * kGroups;
      raw[j] = r < r1 ? *reinterpret_cast<const uint4*>(base + static_cast<int64_t>(r) * x.stride_l)
                      : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (rb + j * kGroups >= r1) break;
      const T* v = reinterpret_cast<const T*>(&raw[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += MmaOp<T>::ToFloat(v[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) red[grp][ch * 8 + i] = acc[i];
  __syncthreads();
  if (tid < D) {
    float s = 0.f;
    for (int g = 0; g < kGroups; ++g) s += red[g][tid];
    out[((static_cast<int64_t>(b) * H + h) * nblocks + n) * D + tid] = s / static_cast<float>(r1 - r0);
  }
}

// kmean[b][h][:] = token-weighted mean of the pooled K blocks = mean of K over the sequence.
// CTA per (b, h, 32 channels): 8 warps stride over the blocks, then a fixed-order reduction.
__global__ void __launch_bounds__(256) KMeanKernel(const float* kpool, int nk, int block, int L, int D,
                                                   float* kmean) {
  __shared__ float part[8][32];
  const int bh = blockIdx.x, d = blockIdx.y * 32 + (threadIdx.x & 31), w = threadIdx.x >> 5;
  float s = 0.f;
  for (int j = w; j < nk; j += 8) {
    const int cnt = min(L, (j + 1) * block) - j * block;
    s += kpool[(static_cast<int64_t>(bh) * nk + j) * D + d] * static_cast<float>(cnt);
  }
  part[w][threadIdx.x & 31] = s;
  __syncthreads();
  if (w == 0) {
    float t = 0.f;
    for (int i = 0; i < 8; ++i) t += part[i][threadIdx.x];
    kmean[static_cast<int64_t>(bh) * D + d] = t / static_cast<float>(L);
  }
}

// scores[c][i][j] = <qpool[i], kpool[j] - kmean> * (1/sqrt(D)) for (b, h) = bh0 + c: fp32, one
// sequential fma chain over d per output (deterministic). A CTA computes 64 query blocks x 64 key
// blocks, 4x4 per thread, from d-major shared tiles of 32 channels: two 16-byte shared loads feed
// 16 fmas, so the FMA pipe, not shared memory, bounds it. (32 x 32 tiles, 2x2 per thread, gave
// identical scores but measured slower on an H100: mask 0.126 vs 0.121 ms at Wan-1.3B, 1.129 vs
// 0.972 ms at 14B; removed.) kC: channels per stage (a load, a barrier, kC x 16 fmas, a
// barrier); the fma order per output, and so the scores, are the same for every kC. (kC = 64,
// half the exposed load latencies per CTA, measured slower on an H100: mask + attention 0.748 vs
// 0.727 ms at Wan-1.3B, 11.49 vs 11.46 ms at 14B; its switch was removed, kernels/NOTES.md.)
template <int D, int kC = kScoreChunk>
__global__ void __launch_bounds__(kThreads) ScoreKernel(const float* qpool, const float* kpool,
                                                        const float* kmean, int nq, int nk, int64_t bh0,
                                                        float* scores) {
  constexpr int kT = kScoreTile, kR = kT / 16;  // kR x kR outputs per thread
  static_assert(kT == 64, "score tile: 4 x 4 outputs per thread of 256");
  static_assert(kC % 4 == 0 && D % kC == 0 && kT * (kC / 4) % kThreads == 0, "score chunk");
  __shared__ __align__(16) float sq[kC][kT];
  __shared__ __align__(16) float sk[kC][kT];
  const int i0 = blockIdx.x * kT, j0 = blockIdx.y * kT;
  const int64_t c = blockIdx.z, bh = bh0 + c;
  const int tid = threadIdx.x, tr = tid / 16, tk = tid % 16;
  const float* qp = qpool + bh * nq * D;
  const float* kp = kpool + bh * nk * D;
  const float* km = kmean + bh * D;
  float acc[kR][kR] = {};
  for (int d0 = 0; d0 < D; d0 += kC) {
    // kT rows x kC channels = kT * kC / 4 float4 per operand (kC = 32: two per thread), all
    // loads issued before the first shared store, so they are in flight together whatever the
    // compiler can prove about the source pointers. Lanes walk rows, so the transposing stores
    // hit consecutive banks.
    constexpr int kIt = kT * (kC / 4) / kThreads;
    float4 qv[kIt], kv[kIt];
#pragma unroll
    for (int it = 0; it < kIt; ++it) {
      const int x = tid + it * kThreads, r = x % kT, d = d0 + (x / kT) * 4;
      qv[it] = kv[it] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (i0 + r < nq) qv[it] = *reinterpret_cast<const float4*>(qp + static_cast<int64_t>(i0 + r) * D + d);
      if (j0 + r < nk) {
        const float4 raw = *reinterpret_cast<const float4*>(kp + static_cast<int64_t>(j0 + r) * D + d);
        const float4 m = *reinterpret_cast<const float4*>(km + d);
        kv[it] = make_float4(raw.x - m.x, raw.y - m.y, raw.z - m.z, raw.w - m.w);
      }
    }
#pragma unroll
    for (int it = 0; it < kIt; ++it) {
      const int x = tid + it * kThreads, r = x % kT, c4 = x / kT;
      sq[c4 * 4 + 0][r] = qv[it].x;
      sq[c4 * 4 + 1][r] = qv[it].y;
      sq[c4 * 4 + 2][r] = qv[it].z;
      sq[c4 * 4 + 3][r] = qv[it].w;
      sk[c4 * 4 + 0][r] = kv[it].x;
      sk[c4 * 4 + 1][r] = kv[it].y;
      sk[c4 * 4 + 2][r] = kv[it].z;
      sk[c4 * 4 + 3][r] = kv[it].w;
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < kC; ++dd) {
      const float4 a = *reinterpret_cast<const float4*>(&sq[dd][tr * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&sk[dd][tk * 4]);
      const float av[kR] = {a.x, a.y, a.z, a.w}, bv[kR] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int r = 0; r < kR; ++r) {
#pragma unroll
        for (int cc = 0; cc < kR; ++cc) acc[r][cc] = fmaf(av[r], bv[cc], acc[r][cc]);
      }
    }
    __syncthreads();
  }
  // Multiplying by the reciprocal, as ATen does for a division by a CPU scalar (the reference).
  const float inv_sqrt_d = 1.f / sqrtf(static_cast<float>(D));
  float* out = scores + c * nq * nk;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int i = i0 + tr * kR + r;
    if (i >= nq) continue;
#pragma unroll
    for (int cc = 0; cc < kR; ++cc) {
      const int j = j0 + tk * kR + cc;
      if (j < nk) out[static_cast<int64_t>(i) * nk + j] = acc[r][cc] * inv_sqrt_d;
    }
  }
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Butterfly sums: every lane ends with bit-identical totals (IEEE addition is commutative), and the
// order is fixed, so results are deterministic.
__device__ __forceinline__ float WarpSum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ double WarpSum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// A row's probabilities live in registers as keys: the bit pattern of a non-negative float orders
// like the float, so "p >= x" is "key >= bits(x)"; padding (j >= nk) is -1, below every threshold.
// Lane l holds key blocks l, l + 32, ..., so walking e then lanes is ascending index order.
template <int kE>
__device__ __forceinline__ int CountGE(const int (&key)[kE], int u) {
  unsigned c = 0;
#pragma unroll
  for (int e = 0; e < kE; ++e) c += key[e] >= u ? 1u : 0u;
  return static_cast<int>(__reduce_add_sync(0xffffffffu, c));
}

// Probability mass of the keys >= u, in double. Depends only on that set (excluded keys add
// nothing), so any two calls selecting the same keys agree bit for bit.
template <int kE>
__device__ __forceinline__ double MassGE(const int (&key)[kE], int u) {
  double m = 0.0;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    if (key[e] >= u) m += static_cast<double>(__int_as_float(key[e]));
  }
  return WarpSum(m);
}

// The largest u with CountGE(u) >= n (1 <= n <= real keys): the n-th largest probability. Bit by
// bit from the top; probabilities are <= 1.0f = 0x3F800000, so bit 30 is always clear.
template <int kE>
__device__ __forceinline__ int RankThreshold(const int (&key)[kE], int n) {
  int u = 0;
#pragma unroll 1
  for (int bit = 29; bit >= 0; --bit) {
    const int cand = u | (1 << bit);
    if (CountGE(key, cand) >= n) u = cand;
  }
  return u;
}

// The largest u with MassGE(u) >= topp (needs MassGE(0) >= topp > 0): the probability at which the
// descending cumulative sum first reaches topp.
template <int kE>
__device__ __forceinline__ int MassThreshold(const int (&key)[kE], double topp) {
  int u = 0;
#pragma unroll 1
  for (int bit = 29; bit >= 0; --bit) {
    const int cand = u | (1 << bit);
    if (MassGE(key, cand) >= topp) u = cand;
  }
  return u;
}

// Warp per (b, h, query block) row of the current chunk: fp32 softmax of the row's scores, the
// kept count, and the LUT row plus transpose bits. The kept set of "stable descending sort, first
// n" is found without sorting: every key above a threshold u plus the first r keys equal to u in
// index order (the stable sort's tie rule). For top-p, the descending cumulative sum matters only
// up to the cut, so a bisection on the threshold's mass finds it; the sums are in double like the
// reference's cumsum, so only their order of addition differs (effects far below fp32 rounding).
template <int kE>
__global__ void __launch_bounds__(kThreads) SelectKernel(MaskParams p, Workspace w, int64_t bh0,
                                                         int64_t rows) {
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int words = CeilDiv(nq, 32);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps only
  const int64_t bh = bh0 + row / nq;
  const int i = static_cast<int>(row % nq);
  const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);

  const float* srow = w.scores + row * nk;
  int key[kE];
  float mx = -INFINITY;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const int j = lane + 32 * e;
    const float s = j < nk ? srow[j] : -INFINITY;
    key[e] = __float_as_int(s);
    mx = fmaxf(mx, s);
  }
  mx = WarpMax(mx);
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    if (lane + 32 * e < nk) {
      const float ex = expf(__int_as_float(key[e]) - mx);
      key[e] = __float_as_int(ex);
      sum += ex;
    }
  }
  sum = WarpSum(sum);
#pragma unroll
  for (int e = 0; e < kE; ++e)
    key[e] = lane + 32 * e < nk ? __float_as_int(__int_as_float(key[e]) / sum) : -1;

  const int64_t knob = b * p.knob_stride_b + h * p.knob_stride_h;
  const int mode = p.mode[knob];
  const double topk = p.topk[knob], topp = p.topp[knob];
  const double nk_real = ceil(topk * nk - 1e-6);
  const int n_k = nk_real > nk ? nk + 1 : (nk_real >= 1.0 ? static_cast<int>(nk_real) : 0);

  // (su, sr, sn): a selection already known to keep the sn largest (keys > su, first sr == su).
  int su = 0, sr = 0, sn = -1;
  int n;
  if (mode == kModeTopK) {
    n = n_k;
  } else if (mode == kModeTopP || mode == kModeHybrid) {
    const int lo = mode == kModeHybrid ? n_k : 0;  // n = max(lo, n_p)
    // topp <= 0 (or NaN): cum[0] >= topp already, so n_p = 1.
    bool need_p = topp > 0.0;
    if (need_p && lo >= 1 && lo < nk) {
      // n_p <= n_k exactly when the mass of the n_k largest reaches topp.
      su = RankThreshold(key, lo);
      sr = lo - CountGE(key, su + 1);
      sn = lo;
      double cum = MassGE(key, su + 1);
      const double x = static_cast<double>(__int_as_float(su));
      for (int t = 0; t < sr; ++t) cum += x;
      need_p = cum < topp;
    }
    if (need_p && lo < nk) {
      if (MassGE(key, 0) < topp) {
        n = nk;  // the cumulative sum never reaches topp: n_p = nk + 1
      } else {
        const int u = MassThreshold(key, topp);
        const int gt = CountGE(key, u + 1), ties = CountGE(key, u) - gt;
        double cum = MassGE(key, u + 1);
        const double x = static_cast<double>(__int_as_float(u));
        int t = 0;
        do {
          cum += x;
          ++t;
        } while (cum < topp && t < ties);
        const int n_p = gt + t;
        n = max(lo, n_p);
        if (n == n_p) {
          su = u;
          sr = t;
          sn = n_p;
        }
      }
    } else {
      n = max(lo, 1);
    }
  } else {
    n = nk;
  }
  n = min(max(n, 1), nk);
  if (n == nk) {
    su = 0;
    sr = nk;
  } else if (sn != n) {
    su = RankThreshold(key, n);
    sr = n - CountGE(key, su + 1);
  }

  const int64_t orow = bh * nq + i;
  if (lane == 0) p.counts[orow] = n;
  int32_t* out = p.indices + orow * nk;
  uint32_t* tcol = w.tbits + bh * nk * words + (i >> 5);
  const uint32_t bit = 1u << (i & 31), lt = (1u << lane) - 1u;
  int base = 0, seen = 0;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const int j = lane + 32 * e;
    const bool tie = key[e] == su;
    const unsigned tb = __ballot_sync(0xffffffffu, tie);
    const bool kept = key[e] > su || (tie && seen + __popc(tb & lt) < sr);
    seen += __popc(tb);
    const unsigned kb = __ballot_sync(0xffffffffu, kept);
    if (kept) {
      out[base + __popc(kb & lt)] = j;
      if (p.t_indices != nullptr) atomicOr(tcol + static_cast<int64_t>(j) * words, bit);
    }
    base += __popc(kb);
  }
  for (int t = base + lane; t < nk; t += 32) out[t] = -1;
}

// Warp per (b, h, key block): emits the query blocks whose bit is set, ascending, then -1s.
__global__ void TransposeKernel(MaskParams p, Workspace w) {
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int words = CeilDiv(nq, 32);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= static_cast<int64_t>(p.batch) * p.heads * nk) return;
  const uint32_t* bits = w.tbits + row * words;
  int32_t* out = p.t_indices + row * nq;
  int base = 0;
  for (int wd = 0; wd < words; ++wd) {
    const uint32_t m = bits[wd];
    const int i = wd * 32 + lane;
    if ((m >> lane) & 1u) out[base + __popc(m & ((1u << lane) - 1))] = i;
    base += __popc(m);
  }
  for (int t = base + lane; t < nq; t += 32) out[t] = -1;
  if (lane == 0) p.t_counts[row] = base;
}

template <typename T>
cudaError_t Pool(const MaskParams& p, Tensor4 x, int block, float* out, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(CeilDiv(p.seqlen, block)), static_cast<unsigned>(p.heads), p.batch);
  return p.head_dim == 128 ? LaunchKernel(PoolKernel<T, 128>, grid, kThreads, 0, s, x, p.seqlen, p.heads, block, out)
                           : LaunchKernel(PoolKernel<T, 64>, grid, kThreads, 0, s, x, p.seqlen, p.heads, block, out);
}

template <int kE>
cudaError_t SelectE(const MaskParams& p, const Workspace& w, int64_t bh0, int64_t rows, cudaStream_t s) {
  constexpr int kRowsPerCta = kThreads / 32;
  return LaunchKernel(SelectKernel<kE>, static_cast<unsigned>((rows + kRowsPerCta - 1) / kRowsPerCta),
                      kThreads, 0, s, p, w, bh0, rows);
}

// Keys per lane rounded up to an instantiated size: registers hold the row (up to 1024 key
// blocks without spilling; 4096 spill to local memory but stay correct).
cudaError_t Select(const MaskParams& p, const Workspace& w, int64_t bh0, int64_t rows, cudaStream_t s) {
  const int e = CeilDiv(CeilDiv(p.seqlen, p.block_k), 32);
  if (e <= 1) return SelectE<1>(p, w, bh0, rows, s);
  if (e <= 2) return SelectE<2>(p, w, bh0, rows, s);
  if (e <= 4) return SelectE<4>(p, w, bh0, rows, s);
  if (e <= 8) return SelectE<8>(p, w, bh0, rows, s);
  if (e <= 12) return SelectE<12>(p, w, bh0, rows, s);
  if (e <= 16) return SelectE<16>(p, w, bh0, rows, s);
  if (e <= 20) return SelectE<20>(p, w, bh0, rows, s);
  if (e <= 24) return SelectE<24>(p, w, bh0, rows, s);
  if (e <= 32) return SelectE<32>(p, w, bh0, rows, s);
  if (e <= 64) return SelectE<64>(p, w, bh0, rows, s);
  return SelectE<128>(p, w, bh0, rows, s);
}

}  // namespace

const char* CanImplementMask(const MaskParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.batch <= 0 || p.heads <= 0 || p.seqlen <= 0) return "empty problem";
  if (p.block_q <= 0 || p.block_k <= 0) return "block sizes must be positive";
  if (CeilDiv(p.seqlen, p.block_k) > kMaxNk) return "too many key blocks (max 4096)";
  if (p.batch > 65535 || p.heads > 65535) return "batch/heads too large for the grid";
  const Tensor4* ts[] = {&p.q, &p.k};
  for (const Tensor4* t : ts) {
    if (t->ptr == nullptr || reinterpret_cast<uintptr_t>(t->ptr) % 16 != 0)
      return "tensor not 16-byte aligned";
    if (t->stride_l % 8 != 0 || t->stride_h % 8 != 0 || t->stride_b % 8 != 0)
      return "strides must be multiples of 8 elements";
  }
  if (!p.mode || !p.topk || !p.topp || !p.counts || !p.indices) return "missing pointer";
  if ((p.t_counts == nullptr) != (p.t_indices == nullptr))
    return "t_counts and t_indices must both be given (or both null: no transposed mask)";
  if (!p.workspace || reinterpret_cast<uintptr_t>(p.workspace) % 256 != 0)
    return "workspace missing or not 256-byte aligned";
  return nullptr;
}

size_t MaskWorkspaceBytes(const MaskParams& p) { return Carve(p, nullptr).bytes; }

cudaError_t LaunchMaskPredictor(const MaskParams& p, cudaStream_t stream) {
  if (CanImplementMask(p) != nullptr) return cudaErrorInvalidValue;
  Workspace w = Carve(p, p.workspace);
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int64_t bh = static_cast<int64_t>(p.batch) * p.heads;
  const bool transposed = p.t_indices != nullptr;
  cudaError_t err = cudaSuccess;
  if (transposed && (err = cudaMemsetAsync(w.tbits, 0, bh * nk * CeilDiv(nq, 32) * 4, stream)) != cudaSuccess)
    return err;
  if (p.dtype == DType::kBF16) {
    if ((err = Pool<__nv_bfloat16>(p, p.q, p.block_q, w.qpool, stream)) != cudaSuccess) return err;
    if ((err = Pool<__nv_bfloat16>(p, p.k, p.block_k, w.kpool, stream)) != cudaSuccess) return err;
  } else {
    if ((err = Pool<__half>(p, p.q, p.block_q, w.qpool, stream)) != cudaSuccess) return err;
    if ((err = Pool<__half>(p, p.k, p.block_k, w.kpool, stream)) != cudaSuccess) return err;
  }
  err = LaunchKernel(KMeanKernel, dim3(static_cast<unsigned>(bh), p.head_dim / 32), 256, 0, stream,
                     w.kpool, nk, p.block_k, L, p.head_dim, w.kmean);
  if (err != cudaSuccess) return err;
  for (int64_t c0 = 0; c0 < bh; c0 += w.chunk_bh) {
    const int64_t cbh = std::min(w.chunk_bh, bh - c0);
    const dim3 sgrid(CeilDiv(nq, kScoreTile), CeilDiv(nk, kScoreTile), static_cast<unsigned>(cbh));
    auto score = p.head_dim == 128 ? ScoreKernel<128> : ScoreKernel<64>;
    err = LaunchKernel(score, sgrid, kThreads, 0, stream, w.qpool, w.kpool, w.kmean, nq, nk, c0, w.scores);
    if (err != cudaSuccess) return err;
    if ((err = Select(p, w, c0, cbh * nq, stream)) != cudaSuccess) return err;
  }
  if (!transposed) return cudaSuccess;
  const int64_t rows = bh * nk;
  return LaunchKernel(TransposeKernel, static_cast<unsigned>((rows + 7) / 8), 256, 0, stream, p, w);
}

}  // namespace sparge::kernels
