// Hopper (sm_90a) block-sparse attention forward, two kernels on the same math: one CTA per
// (128 query rows, head, batch), two warpgroups of 64 rows sharing the K/V tiles of the kept key
// blocks; S = Q K^T from 128B-swizzled shared tiles, O += P V with P straight from registers (same
// fragment layout as the S accumulator) and V as an MN-major operand, so neither P nor V^T is ever
// written to shared memory. Default: the warp-specialised kernel (TMA producer warp, mbarrier ring,
// ping-pong consumers). FwdParams::pipelined: the cp.async double-buffered kernel it replaced.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch_utils.h"
#include "kernels/device_utils.cuh"
#include "kernels/fwd_internal.h"
#include "kernels/sm90_pipeline.cuh"
#include "kernels/sm90_tiles.cuh"
#include "kernels/tma_map.h"

namespace sparge::kernels::detail {
namespace {

constexpr int kThreads = 256;  // two warpgroups
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int kN>
constexpr int SmemBytes() {
  return (kTileQ * D + 4 * kN * D) * 2 + 1024;  // + alignment slack
}

// The epilogue both forward kernels share: O = acc / l and the natural-log LSE of one warp's 16
// rows (from row0; the quad's two 8-row halves per thread, rows past L skipped). m and l: the
// running max (log2 domain) and the thread's partial row sums, summed over the quad here. Rows with
// no kept key (l = 0) get O = 0 and LSE = -inf.
template <typename T, int D>
__device__ __forceinline__ void StoreOAndLse(const FwdParams& p, int b, int h, int64_t bh, int L, int row0, int lane,
                                             const float (&o)[D / 2], const float (&l)[2], const float (&m)[2]) {
  T* obase = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
  const int g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = QuadSum(l[r]);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    const int row = row0 + g + 8 * r;
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

  StoreOAndLse<T, D>(p, b, h, bh, L, q0 + wg * 64 + warp * 16, lane, o, l, m);
}

// Warp-specialised variant (FlashAttention-3 structure). Warpgroup 0 is the producer: one thread
// issues TMA loads of the Q tile and of each kept K/V tile into a ring of kStages mbarrier-guarded
// slots, then the warpgroup gives its registers away (setmaxnreg). Warpgroups 1 and 2 consume,
// 64 query rows each, and take turns on the tensor cores (two named barriers, "ping-pong"): in its
// turn a warpgroup issues S(i) = Q K_i^T and O += P(i-1) V(i-1) back to back, hands the turn over,
// and runs the softmax of S(i) while the other warpgroup's GEMMs (and its own PV) run. No block
// barrier inside the loop: slots are released per warp through the empty mbarriers.
constexpr int kWsThreads = 384;

// One MUFU.EX2: exp2f() adds denormal range fix-ups per element; P values below 2^-126 only
// matter against a row sum >= 1, so flushing them to zero changes nothing measurable.
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
constexpr int kProducerRegs = 40;   // 128 x 40 + 256 x 232 = 64512 = 384 x 168 (the launch cap)
constexpr int kConsumerRegs = 232;
constexpr int kWsStages = 3;        // two stages expose the load latency: a slot is freed only
                                    // after both consumers finished the tile's PV GEMM

template <int D, int kN>
struct WsLayout {
  static constexpr int kQBytes = kTileQ * D * 2;
  static constexpr int kKvBytes = kN * D * 2;
  static constexpr int kBarOffset = kQBytes + 2 * kWsStages * kKvBytes;
  // q_full, k_full[S], v_full[S], empty[S]
  static constexpr int kBytes = kBarOffset + (1 + 3 * kWsStages) * 8 + 1024;  // + alignment slack
};

template <typename T, int D, int kN>
__global__ void __launch_bounds__(kWsThreads, 1)
    FwdSm90WsKernel(FwdParams p, const __grid_constant__ CUtensorMap tm_q,
                    const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {
  using Lay = WsLayout<D, kN>;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = SmemAddr(
      reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023)));
  const uint32_t sK = sQ + Lay::kQBytes;                  // [S][D/64][kN][64]
  const uint32_t sV = sK + kWsStages * Lay::kKvBytes;     // [S][D/64][kN][64]
  const uint32_t bars = sQ + Lay::kBarOffset;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8 * (1 + s); };
  auto v_full = [&](int s) { return bars + 8 * (1 + kWsStages + s); };
  auto empty = [&](int s) { return bars + 8 * (1 + 2 * kWsStages + s); };

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int q0 = qb * kTileQ;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int count = p.counts[bh * nq + qb];
  const int32_t* lut = p.indices + (bh * nq + qb) * nk;
  const int subs = p.block_k / kN;
  auto tile_key0 = [&](int t) { return lut[t / subs] * p.block_k + (t % subs) * kN; };
  // The LUT is ascending, so tiles starting at or past L (sub-tiles of the last key block) trail
  // the list and only the last valid tile can be partial: the valid-tile count n and the last
  // tile's first key come from one LUT read, issued by each role where its latency is hidden.
  auto valid_tiles = [&](int last_blk, int* last_key0) {
    const int in_last = min(subs, CeilDiv(L - last_blk * p.block_k, kN));
    *last_key0 = last_blk * p.block_k + (in_last - 1) * kN;
    return (count - 1) * subs + in_last;
  };

  if (tid == 0) {
    MbarInit(q_full, 1);
    for (int s = 0; s < kWsStages; ++s) {
      MbarInit(k_full(s), 1);
      MbarInit(v_full(s), 1);
      MbarInit(empty(s), 8);  // one arrival per consumer warp
    }
    FenceMbarInit();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    SetMaxNRegDecWarpgroup<kProducerRegs>();
    if (tid == 0 && count > 0) {  // count > 0 <=> n > 0: a kept block's first tile starts below L
      const int last_blk = lut[count - 1];
      int k0_next = tile_key0(0);
      MbarArriveExpectTx(q_full, Lay::kQBytes);
#pragma unroll
      for (int c = 0; c < D / 64; ++c) TmaLoad4d(sQ + c * kTileQ * 128, &tm_q, q_full, c * 64, q0, h, b);
      int last_key0;
      const int n = valid_tiles(last_blk, &last_key0);
      int s = 0, phase = 0;
      for (int i = 0; i < n; ++i) {
        const int k0 = k0_next;
        if (i + 1 < n) k0_next = tile_key0(i + 1);  // in flight while this slot is awaited
        MbarWait(empty(s), phase ^ 1);
        MbarArriveExpectTx(k_full(s), Lay::kKvBytes);
#pragma unroll
        for (int c = 0; c < D / 64; ++c)
          TmaLoad4d(sK + s * Lay::kKvBytes + c * kN * 128, &tm_k, k_full(s), c * 64, k0, h, b);
        MbarArriveExpectTx(v_full(s), Lay::kKvBytes);
#pragma unroll
        for (int c = 0; c < D / 64; ++c)
          TmaLoad4d(sV + s * Lay::kKvBytes + c * kN * 128, &tm_v, v_full(s), c * 64, k0, h, b);
        if (++s == kWsStages) s = 0, phase ^= 1;
      }
    }
    return;
  }

  SetMaxNRegIncWarpgroup<kConsumerRegs>();
  const int cw = wg - 1;                 // consumer warpgroup 0 or 1
  const int warp = (tid >> 5) & 3;
  const int my_bar = 1 + cw, other_bar = 2 - cw;
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  const int tig = lane & 3;

  if (count > 0) {
    const int last_blk = lut[count - 1];  // read before the first wait: its latency hides there
    int last_key0 = 0, n = 0;
    const uint32_t q_addr = sQ + cw * 64 * 128;  // this warpgroup's 64 rows
    float s_acc[kN / 2];
    uint32_t pa[kN / 16][4];
    float alpha[2];
    // Descriptors by one add from precomputed halves (wgmma.cuh Desc); scale_d = 0 on the first
    // k-step replaces zeroing the S accumulator.
    constexpr uint32_t desc_hi = DescHi(1024);
    const uint32_t q_lo = DescLo(q_addr, 16), k_lo0 = DescLo(sK, 16), v_lo0 = DescLo(sV, kN * 128);
    auto issue_s = [&](int st) {
      const uint32_t k_lo = k_lo0 + st * (Lay::kKvBytes >> 4);
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        Wg<T>::template SS<kN>(s_acc, Desc(q_lo + KOff(kTileQ, ks), desc_hi), Desc(k_lo + KOff(kN, ks), desc_hi),
                               ks > 0);
    };
    auto issue_pv = [&](int st) {
      const uint32_t v_lo = v_lo0 + st * (Lay::kKvBytes >> 4);
#pragma unroll
      for (int kc = 0; kc < kN / 16; ++kc) Wg<T>::template RS<D>(o, pa[kc], Desc(v_lo + kc * 128, desc_hi));
    };
    // Exponentiates S in place against the new running max; O is rescaled later (after the PV
    // GEMM that is still accumulating into it has finished).
    auto softmax = [&](bool last) {
      const int k0 = last_key0;
      if (last && k0 + kN > L) {
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (k0 + nt * 8 + 2 * tig + (e & 1) >= L) s_acc[nt * 4 + e] = -INFINITY;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt)
          mx = fmaxf(mx, fmaxf(s_acc[nt * 4 + 2 * r], s_acc[nt * 4 + 2 * r + 1]));
        mx = QuadMax(mx) * scale_log2;
        const float mnew = fmaxf(m[r], mx);
        alpha[r] = Exp2Ftz(m[r] - mnew);
        m[r] = mnew;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt) {
          s_acc[nt * 4 + 2 * r] = Exp2Ftz(s_acc[nt * 4 + 2 * r] * scale_log2 - mnew);
          s_acc[nt * 4 + 2 * r + 1] = Exp2Ftz(s_acc[nt * 4 + 2 * r + 1] * scale_log2 - mnew);
          sum += s_acc[nt * 4 + 2 * r] + s_acc[nt * 4 + 2 * r + 1];
        }
        l[r] = l[r] * alpha[r] + sum;
      }
    };
    auto rescale_and_pack = [&]() {
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt * 4 + 0] *= alpha[0];
        o[nt * 4 + 1] *= alpha[0];
        o[nt * 4 + 2] *= alpha[1];
        o[nt * 4 + 3] *= alpha[1];
      }
#pragma unroll
      for (int kc = 0; kc < kN / 16; ++kc) {
        pa[kc][0] = MmaOp<T>::Pack(s_acc[(2 * kc) * 4 + 0], s_acc[(2 * kc) * 4 + 1]);
        pa[kc][1] = MmaOp<T>::Pack(s_acc[(2 * kc) * 4 + 2], s_acc[(2 * kc) * 4 + 3]);
        pa[kc][2] = MmaOp<T>::Pack(s_acc[(2 * kc + 1) * 4 + 0], s_acc[(2 * kc + 1) * 4 + 1]);
        pa[kc][3] = MmaOp<T>::Pack(s_acc[(2 * kc + 1) * 4 + 2], s_acc[(2 * kc + 1) * 4 + 3]);
      }
    };

    // Turns alternate strictly: consumer 0 takes turn 0 (consumer 1's initial arrival), every turn
    // ends by arriving on the other's barrier, except consumer 1's last (nobody would wait on it).
    MbarWait(q_full, 0);
    n = valid_tiles(last_blk, &last_key0);
    int st = 0, ph = 0;
    MbarWait(k_full(st), ph);
    if (cw == 1) NamedBarrierArrive(1, 256);
    NamedBarrierSync(my_bar, 256);
    WgmmaFence();
    issue_s(st);
    WgmmaCommit();
    NamedBarrierArrive(other_bar, 256);
    WgmmaWait0();
    softmax(n == 1);
    rescale_and_pack();
    for (int i = 1; i < n; ++i) {
      const int pst = st, pph = ph;
      if (++st == kWsStages) st = 0, ph ^= 1;
      MbarWait(k_full(st), ph);
      MbarWait(v_full(pst), pph);
      NamedBarrierSync(my_bar, 256);
      WgmmaFence();
      issue_s(st);
      WgmmaCommit();
      issue_pv(pst);
      WgmmaCommit();
      NamedBarrierArrive(other_bar, 256);
      WgmmaWait1();  // S(i) done; PV(i-1) may still run under the exponentials
      softmax(i == n - 1);
      WgmmaWait0();
      if (lane == 0) MbarArrive(empty(pst));
      rescale_and_pack();
    }
    MbarWait(v_full(st), ph);
    NamedBarrierSync(my_bar, 256);
    WgmmaFence();
    issue_pv(st);
    WgmmaCommit();
    if (cw == 0) NamedBarrierArrive(other_bar, 256);
    WgmmaWait0();
  }

  StoreOAndLse<T, D>(p, b, h, bh, L, q0 + cw * 64 + warp * 16, lane, o, l, m);
}

BlhdShape ShapeOf(const FwdParams& p) { return {p.dtype, p.batch, p.seqlen, p.heads, p.head_dim}; }

bool TmaCompatible(const FwdParams& p) {
  const Tensor4* ts[] = {&p.q, &p.k, &p.v};
  return TmaCompatible(ts, 3, ShapeOf(p));
}

template <typename T, int D, int kN>
cudaError_t LaunchWs(const FwdParams& p, cudaStream_t stream) {
  CUtensorMap mq, mk, mv;
  const BlhdShape shape = ShapeOf(p);
  if (!EncodeBlhd(&mq, p.q, shape, kTileQ) || !EncodeBlhd(&mk, p.k, shape, kN) ||
      !EncodeBlhd(&mv, p.v, shape, kN))
    return cudaErrorNotSupported;
  constexpr int smem = WsLayout<D, kN>::kBytes;
  auto kernel = FwdSm90WsKernel<T, D, kN>;
  cudaError_t err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(p.seqlen, kTileQ), p.heads, p.batch);
  return LaunchKernel(kernel, grid, kWsThreads, smem, stream, p, mq, mk, mv);
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
  // 128-key tiles where block_k allows (unless tile_n == 64). Default: the warp-specialised TMA
  // kernel (1.32x the cp.async kernel in dense mode, 1.37x at 95% sparsity, H200; NOTES.md v7).
  // FwdParams::pipelined selects the previous cp.async double-buffered kernel (A/B), as do
  // strides a tensor map cannot express (zero strides of broadcast views).
  const bool n128 = p.block_k % 128 == 0 && p.tile_n != 64;
  if (!p.pipelined && TmaCompatible(p))
    return n128 ? LaunchWs<T, D, 128>(p, stream) : LaunchWs<T, D, 64>(p, stream);
  return n128 ? LaunchN<T, D, 128>(p, stream) : LaunchN<T, D, 64>(p, stream);
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
