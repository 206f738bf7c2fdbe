// SpargeAttention2 hybrid Top-k/Top-p block-mask predictor (SPARSE_ATTENTION.md section 2):
// pool Q and K per block, centre K by its sequence mean, score, row softmax (fp32), stable
// descending sort (ties: lower key block first), per-row TOPK/TOPP/HYBRID/DENSE counts, the LUT
// in ascending key-block order and its transpose for the backward pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/launch_utils.h"
#include "kernels/device_utils.cuh"
#include "kernels/sparge_kernels.h"

namespace sparge::kernels {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kRowsPerCta = 4;  // query blocks scored per CTA: pooled K is read once for these
constexpr int kMaxNk = 4096;

size_t Align256(size_t x) { return (x + 255) / 256 * 256; }

struct Workspace {
  float* qpool;     // [B][H][Nq][D]
  float* kpool;     // [B][H][Nk][D]
  float* kmean;     // [B][H][D]
  uint32_t* tbits;  // [B][H][Nk][words(Nq)]
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
  w.bytes = off;
  return w;
}

// Mean of each block of rows of x[b, :, h, :] -> out[b][h][n][D]. 16-byte loads; each CTA pools
// one block with D/8 threads per row and reduces the row groups in a fixed order.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) PoolKernel(Tensor4 x, int L, int H, int block, float* out) {
  constexpr int kLanes = D / 8;
  constexpr int kGroups = kThreads / kLanes;
  __shared__ float red[kGroups][D];
  const int n = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int nblocks = gridDim.x;
  const int tid = threadIdx.x, ch = tid % kLanes, grp = tid / kLanes;
  const int r0 = n * block, r1 = min(L, r0 + block);
  const T* base = static_cast<const T*>(x.ptr) + b * x.stride_b + h * x.stride_h + ch * 8;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int r = r0 + grp; r < r1; r += kGroups) {
    uint4 raw = *reinterpret_cast<const uint4*>(base + static_cast<int64_t>(r) * x.stride_l);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += MmaOp<T>::ToFloat(v[i]);
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

__device__ __forceinline__ float BlockReduceMax(float v, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int i = 1; i < kThreads / 32; ++i) r = fmaxf(r, scratch[i]);
  return r;
}

__device__ __forceinline__ float BlockReduceSum(float v, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = 0.f;
  for (int i = 0; i < kThreads / 32; ++i) r += scratch[i];
  return r;
}

// One CTA scores kRowsPerCta query blocks of one (b, h) and selects their kept key blocks.
// Shared memory: q[kRows][D], kmean[D], scores[kRows][np], keys[np] (u64), scan[kThreads] (f64).
__global__ void __launch_bounds__(kThreads) SelectKernel(MaskParams p, Workspace w, int np) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int D = p.head_dim;
  const int L = p.seqlen;
  const int nq = CeilDiv(L, p.block_q), nk = CeilDiv(L, p.block_k);
  const int words = CeilDiv(nq, 32);
  const int h = blockIdx.y, b = blockIdx.z;
  const int i0 = blockIdx.x * kRowsPerCta;
  const int nrows = min(kRowsPerCta, nq - i0);
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  uint64_t* keys = reinterpret_cast<uint64_t*>(smem_raw);           // [np]
  double* scan = reinterpret_cast<double*>(keys + np);               // [kThreads]
  float* sq = reinterpret_cast<float*>(scan + kThreads);             // [kRows][D]
  float* skm = sq + kRowsPerCta * D;                                 // [D]
  float* ss = skm + D;                                               // [kRows][np]
  __shared__ float red[kThreads / 32];
  __shared__ int s_n;
  __shared__ int s_np_count;

  for (int x = tid; x < kRowsPerCta * D; x += kThreads) {
    const int r = x / D;
    sq[x] = r < nrows ? w.qpool[((bh * nq) + i0 + r) * D + (x % D)] : 0.f;
  }
  for (int x = tid; x < D; x += kThreads) skm[x] = w.kmean[bh * D + x];
  __syncthreads();

  // Scores: warp per key block, lanes over D; fixed shuffle order keeps results deterministic.
  const float inv_sqrt_d = 1.f / sqrtf(static_cast<float>(D));
  const float* kp = w.kpool + bh * nk * D;
  // Four key blocks per warp iteration keep 4x more independent loads in flight (the loop is
  // L2-latency bound); per-lane order over d and the shuffle tree are unchanged.
  constexpr int kKeysPerWarp = 4;
  for (int j0 = warp * kKeysPerWarp; j0 < nk; j0 += (kThreads / 32) * kKeysPerWarp) {
    float acc[kKeysPerWarp][kRowsPerCta] = {};
    for (int d = lane; d < D; d += 32) {
      float kv[kKeysPerWarp];
#pragma unroll
      for (int jj = 0; jj < kKeysPerWarp; ++jj)
        kv[jj] = j0 + jj < nk ? kp[static_cast<int64_t>(j0 + jj) * D + d] - skm[d] : 0.f;
#pragma unroll
      for (int r = 0; r < kRowsPerCta; ++r) {
        const float qv = sq[r * D + d];
#pragma unroll
        for (int jj = 0; jj < kKeysPerWarp; ++jj) acc[jj][r] += qv * kv[jj];
      }
    }
#pragma unroll
    for (int jj = 0; jj < kKeysPerWarp; ++jj) {
#pragma unroll
      for (int r = 0; r < kRowsPerCta; ++r) {
        float v = acc[jj][r];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
        if (lane == 0 && j0 + jj < nk) ss[r * np + j0 + jj] = v * inv_sqrt_d;
      }
    }
  }
  __syncthreads();

  const int64_t knob = b * p.knob_stride_b + h * p.knob_stride_h;
  const int mode = p.mode[knob];
  const double topk = p.topk[knob], topp = p.topp[knob];
  for (int r = 0; r < nrows; ++r) {
    const int i = i0 + r;
    float* srow = ss + r * np;
    float mx = -INFINITY;
    for (int j = tid; j < nk; j += kThreads) mx = fmaxf(mx, srow[j]);
    mx = BlockReduceMax(mx, red);
    float sum = 0.f;
    for (int j = tid; j < nk; j += kThreads) {
      const float e = expf(srow[j] - mx);
      srow[j] = e;
      sum += e;
    }
    sum = BlockReduceSum(sum, red);
    // Sort key: descending probability (bit pattern of a non-negative float is monotone), then
    // ascending index. Padding sorts last.
    for (int j = tid; j < np; j += kThreads) {
      if (j < nk) {
        const float pr = srow[j] / sum;
        srow[j] = pr;
        keys[j] = (static_cast<uint64_t>(~__float_as_uint(pr)) << 32) | static_cast<uint32_t>(j);
      } else {
        keys[j] = ~0ull;
      }
    }
    __syncthreads();
    for (int size = 2; size <= np; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int x = tid; x < np / 2; x += kThreads) {
          const int lo = 2 * x - (x & (stride - 1));
          const int hi = lo + stride;
          const bool asc = (lo & size) == 0;
          const uint64_t a = keys[lo], c = keys[hi];
          if ((a > c) == asc) {
            keys[lo] = c;
            keys[hi] = a;
          }
        }
        __syncthreads();
      }
    }
    // Top-p count: 1 + #{t : cumsum(sorted P)[t] < p}, cumsum in double (order-insensitive to
    // far below fp32 rounding, so every implementation agrees).
    const int per = np / kThreads > 0 ? np / kThreads : 1;
    double local = 0.0;
    const int beg = tid * per;
    for (int t = beg; t < min(beg + per, nk); ++t)
      local += static_cast<double>(__uint_as_float(~static_cast<uint32_t>(keys[t] >> 32)));
    scan[tid] = local;
    if (tid == 0) s_np_count = 0;
    __syncthreads();
    if (warp == 0) {  // exclusive scan: 8 partials per lane, then a shuffle scan over lanes
      constexpr int kPer = kThreads / 32;
      double vals[kPer];
      double run = 0.0;
#pragma unroll
      for (int x = 0; x < kPer; ++x) {
        vals[x] = run;
        run += scan[lane * kPer + x];
      }
      double incl = run;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const double o = __shfl_up_sync(0xffffffff, incl, off);
        if (lane >= off) incl += o;
      }
      const double base = incl - run;
#pragma unroll
      for (int x = 0; x < kPer; ++x) scan[lane * kPer + x] = base + vals[x];
    }
    __syncthreads();
    {
      double c = scan[tid];
      int below = 0;
      for (int t = beg; t < min(beg + per, nk); ++t) {
        c += static_cast<double>(__uint_as_float(~static_cast<uint32_t>(keys[t] >> 32)));
        below += c < topp ? 1 : 0;
      }
      if (below) atomicAdd(&s_np_count, below);
    }
    __syncthreads();
    if (tid == 0) {
      const int n_p = s_np_count + 1;
      const int n_k = static_cast<int>(ceil(topk * nk - 1e-6));
      int n;
      switch (mode) {
        case kModeTopK: n = n_k; break;
        case kModeTopP: n = n_p; break;
        case kModeHybrid: n = max(n_k, n_p); break;
        default: n = nk; break;
      }
      s_n = min(max(n, 1), nk);
      p.counts[bh * nq + i] = s_n;
    }
    __syncthreads();
    const int n = s_n;
    // Mark kept blocks (reuse the score row as flags), then compact in ascending index order.
    for (int t = tid; t < nk; t += kThreads) srow[t] = 0.f;
    __syncthreads();
    for (int t = tid; t < n; t += kThreads) {
      const int j = static_cast<int>(keys[t] & 0xffffffffu);
      srow[j] = 1.f;
      atomicOr(&w.tbits[(bh * nk + j) * words + (i >> 5)], 1u << (i & 31));
    }
    __syncthreads();
    int32_t* out = p.indices + (bh * nq + i) * nk;
    if (warp == 0) {
      int base = 0;
      for (int j0 = 0; j0 < nk; j0 += 32) {
        const int j = j0 + lane;
        const bool kept = j < nk && srow[j] != 0.f;
        const uint32_t ballot = __ballot_sync(0xffffffff, kept);
        if (kept) out[base + __popc(ballot & ((1u << lane) - 1))] = j;
        base += __popc(ballot);
      }
    }
    for (int t = n + tid; t < nk; t += kThreads) out[t] = -1;
    __syncthreads();
  }
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

int NextPow2(int x) {
  int r = 1;
  while (r < x) r <<= 1;
  return r;
}

size_t SelectSmemBytes(int np, int D) {
  return np * 8 + kThreads * 8 + (kRowsPerCta * D + D + kRowsPerCta * np) * 4;
}

template <typename T>
cudaError_t Pool(const MaskParams& p, Tensor4 x, int block, float* out, cudaStream_t s) {
  dim3 grid(CeilDiv(p.seqlen, block), p.heads, p.batch);
  if (p.head_dim == 128) {
    PoolKernel<T, 128><<<grid, kThreads, 0, s>>>(x, p.seqlen, p.heads, block, out);
  } else {
    PoolKernel<T, 64><<<grid, kThreads, 0, s>>>(x, p.seqlen, p.heads, block, out);
  }
  return cudaGetLastError();
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
  if (!p.mode || !p.topk || !p.topp || !p.counts || !p.indices || !p.t_counts || !p.t_indices)
    return "missing pointer";
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
  cudaError_t err = cudaMemsetAsync(w.tbits, 0, bh * nk * CeilDiv(nq, 32) * 4, stream);
  if (err != cudaSuccess) return err;
  if (p.dtype == DType::kBF16) {
    if ((err = Pool<__nv_bfloat16>(p, p.q, p.block_q, w.qpool, stream)) != cudaSuccess) return err;
    if ((err = Pool<__nv_bfloat16>(p, p.k, p.block_k, w.kpool, stream)) != cudaSuccess) return err;
  } else {
    if ((err = Pool<__half>(p, p.q, p.block_q, w.qpool, stream)) != cudaSuccess) return err;
    if ((err = Pool<__half>(p, p.k, p.block_k, w.kpool, stream)) != cudaSuccess) return err;
  }
  KMeanKernel<<<dim3(static_cast<unsigned>(bh), p.head_dim / 32), 256, 0, stream>>>(
      w.kpool, nk, p.block_k, L, p.head_dim, w.kmean);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int np = NextPow2(nk < 2 ? 2 : nk);
  const size_t smem = SelectSmemBytes(np, p.head_dim);
  err = detail::SetMaxDynamicSmem(reinterpret_cast<const void*>(SelectKernel), static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  dim3 grid(CeilDiv(nq, kRowsPerCta), p.heads, p.batch);
  SelectKernel<<<grid, kThreads, smem, stream>>>(p, w, np);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t rows = bh * nk;
  TransposeKernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p, w);
  return cudaGetLastError();
}

}  // namespace sparge::kernels
