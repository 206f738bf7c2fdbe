// Fused DiT block kernels (dit_fused.h). Each is memory-bound: one CTA per row for the two
// normalizations (the row lives in registers between the reduction and the write), a grid-stride
// loop for the residual add. 16-byte vector accesses throughout (8 half-precision elements).
#include "kernels/dit_fused.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace sparge::kernels {
namespace {

constexpr int kVec = 8;  // elements per 16-byte access
constexpr int kMaxThreads = 1024;

template <typename T>
struct Convert;
template <>
struct Convert<__nv_bfloat16> {
  static __device__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 FromFloat(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Convert<__half> {
  static __device__ float ToFloat(__half v) { return __half2float(v); }
  static __device__ __half FromFloat(float v) { return __float2half_rn(v); }
};

template <typename T>
__device__ void LoadVec(const T* p, float (&out)[kVec]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = Convert<T>::ToFloat(v[i]);
}

template <typename T>
__device__ void StoreVec(T* p, const float (&in)[kVec]) {
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = Convert<T>::FromFloat(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Sum over the CTA; every thread gets the result. `scratch` holds 32 floats.
__device__ float BlockSum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < warps ? scratch[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  return total;
}

template <typename T, int kVpt>
__global__ void LayerNormModulateKernel(LayerNormModulateParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  T* y = static_cast<T*>(p.y) + row * p.cols;
  const int64_t b = row / p.rows_per_batch;
  float v[kVpt][kVec];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int c = (j * blockDim.x + threadIdx.x) * kVec;
    if (c < p.cols) {
      LoadVec(x + c, v[j]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += v[j][i];
    }
  }
  const float mean = BlockSum(sum, scratch) / p.cols;
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int c = (j * blockDim.x + threadIdx.x) * kVec;
    if (c < p.cols) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float d = v[j][i] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(BlockSum(sq, scratch) / p.cols + p.eps);
  const float* mul = p.mul ? p.mul + b * p.mod_batch_stride : nullptr;
  const float* add = p.add ? p.add + b * p.mod_batch_stride : nullptr;
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int c = (j * blockDim.x + threadIdx.x) * kVec;
    if (c < p.cols) {
      float out[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        float t = __fmul_rn(v[j][i] - mean, rstd);
        if (mul) t = __fmul_rn(t, mul[c + i]);
        if (add) t = __fadd_rn(t, add[c + i]);
        out[i] = t;
      }
      StoreVec(y + c, out);
    }
  }
}

template <typename T>
__global__ void GatedResidualKernel(GatedResidualParams p) {
  const int64_t vecs = p.rows * p.cols / kVec;
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.r);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vecs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * kVec;
    float a[kVec], d[kVec];
    LoadVec(x + e, a);
    LoadVec(r + e, d);
    if (p.gate != nullptr) {
      const int64_t row = e / p.cols;
      const int c = static_cast<int>(e - row * p.cols);
      const float* g = p.gate + (row / p.rows_per_batch) * p.gate_batch_stride + c;
#pragma unroll
      for (int k = 0; k < kVec; ++k) a[k] = __fadd_rn(a[k], __fmul_rn(d[k], g[k]));
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) a[k] = __fadd_rn(a[k], d[k]);
    }
    StoreVec(y + e, a);
  }
}

template <typename T, int kVpt>
__global__ void RmsNormRopeKernel(RmsNormRopeParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  T* y = static_cast<T*>(p.y) + row * p.cols;
  float v[kVpt][kVec];
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int c = (j * blockDim.x + threadIdx.x) * kVec;
    if (c < p.cols) {
      LoadVec(x + c, v[j]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sq += v[j][i] * v[j][i];
    }
  }
  const float rstd = rsqrtf(BlockSum(sq, scratch) / p.cols + p.eps);
  const int64_t pos = row % p.rows_per_batch;
  const int half = p.head_dim / 2;
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int c = (j * blockDim.x + threadIdx.x) * kVec;
    if (c < p.cols) {
      float n[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        // The normalized value is rounded to the activation dtype before the rotation, as the
        // separate RMSNorm module's output is.
        const float t = __fmul_rn(__fmul_rn(v[j][i], rstd), p.weight[c + i]);
        n[i] = Convert<T>::ToFloat(Convert<T>::FromFloat(t));
      }
      if (p.cos != nullptr) {
        const int pair0 = (c % p.head_dim) / 2;
        const float* cs = p.cos + pos * half + pair0;
        const float* sn = p.sin + pos * half + pair0;
#pragma unroll
        for (int i = 0; i < kVec / 2; ++i) {
          const float x0 = n[2 * i], x1 = n[2 * i + 1];
          n[2 * i] = __fsub_rn(__fmul_rn(x0, cs[i]), __fmul_rn(x1, sn[i]));
          n[2 * i + 1] = __fadd_rn(__fmul_rn(x0, sn[i]), __fmul_rn(x1, cs[i]));
        }
      }
      StoreVec(y + c, n);
    }
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Threads per CTA and vectors per thread for a row of `cols` elements.
void RowShape(int cols, int* threads, int* vpt) {
  const int vecs = cols / kVec;
  *vpt = 1;
  while (*vpt < 4 && vecs > *vpt * kMaxThreads) *vpt *= 2;
  const int t = (vecs + *vpt - 1) / *vpt;
  *threads = std::max(32, (t + 31) / 32 * 32);
}

const char* CheckRow(const void* x, const void* y, int64_t rows, int64_t row_stride,
                     int64_t rows_per_batch, int cols) {
  if (x == nullptr || y == nullptr) return "null activation pointer";
  if (rows <= 0 || cols <= 0) return "rows and cols must be positive";
  if (cols % kVec != 0) return "cols must be a multiple of 8";
  if (cols > 4 * kMaxThreads * kVec) return "cols must be at most 32768";
  if (row_stride % kVec != 0 || row_stride < cols) {
    return "row stride must be >= cols and a multiple of 8";
  }
  if (rows_per_batch <= 0) return "rows_per_batch must be positive";
  if (!Aligned16(x) || !Aligned16(y)) return "activations must be 16-byte aligned";
  if (rows > 0x7fffffff) return "too many rows";
  return nullptr;
}

template <typename Params>
cudaError_t LaunchRows(const Params& p, int cols, int64_t rows, cudaStream_t stream,
                       void (*bf16[3])(Params), void (*fp16[3])(Params)) {
  int threads = 0, vpt = 0;
  RowShape(cols, &threads, &vpt);
  const int idx = vpt == 1 ? 0 : vpt == 2 ? 1 : 2;
  auto* fn = p.dtype == DType::kBF16 ? bf16[idx] : fp16[idx];
  fn<<<static_cast<unsigned>(rows), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

const char* CanImplementLayerNormModulate(const LayerNormModulateParams& p) {
  if (const char* why = CheckRow(p.x, p.y, p.rows, p.x_row_stride, p.rows_per_batch, p.cols)) {
    return why;
  }
  if (p.mod_batch_stride < 0) return "mod_batch_stride must be >= 0";
  return nullptr;
}

cudaError_t LaunchLayerNormModulate(const LayerNormModulateParams& p, cudaStream_t stream) {
  void (*bf16[3])(LayerNormModulateParams) = {LayerNormModulateKernel<__nv_bfloat16, 1>,
                                              LayerNormModulateKernel<__nv_bfloat16, 2>,
                                              LayerNormModulateKernel<__nv_bfloat16, 4>};
  void (*fp16[3])(LayerNormModulateParams) = {LayerNormModulateKernel<__half, 1>,
                                              LayerNormModulateKernel<__half, 2>,
                                              LayerNormModulateKernel<__half, 4>};
  return LaunchRows(p, p.cols, p.rows, stream, bf16, fp16);
}

const char* CanImplementGatedResidual(const GatedResidualParams& p) {
  if (p.x == nullptr || p.r == nullptr || p.y == nullptr) return "null activation pointer";
  if (p.rows <= 0 || p.cols <= 0 || p.cols % kVec != 0) {
    return "rows must be positive and cols a positive multiple of 8";
  }
  if (p.gate != nullptr && (p.rows_per_batch <= 0 || p.gate_batch_stride < 0)) {
    return "gate needs rows_per_batch > 0 and gate_batch_stride >= 0";
  }
  if (!Aligned16(p.x) || !Aligned16(p.r) || !Aligned16(p.y)) {
    return "activations must be 16-byte aligned";
  }
  return nullptr;
}

cudaError_t LaunchGatedResidual(const GatedResidualParams& p, cudaStream_t stream) {
  const int64_t vecs = p.rows * p.cols / kVec;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((vecs + threads - 1) / threads, 132 * 16);
  if (p.dtype == DType::kBF16) {
    GatedResidualKernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  } else {
    GatedResidualKernel<__half><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

const char* CanImplementRmsNormRope(const RmsNormRopeParams& p) {
  if (const char* why = CheckRow(p.x, p.y, p.rows, p.x_row_stride, p.rows_per_batch, p.cols)) {
    return why;
  }
  if (p.weight == nullptr) return "weight is required";
  if ((p.cos == nullptr) != (p.sin == nullptr)) return "cos and sin must both be given or neither";
  if (p.cos != nullptr &&
      (p.head_dim <= 0 || p.head_dim % kVec != 0 || p.cols % p.head_dim != 0)) {
    return "head_dim must be a multiple of 8 dividing cols";
  }
  return nullptr;
}

cudaError_t LaunchRmsNormRope(const RmsNormRopeParams& p, cudaStream_t stream) {
  void (*bf16[3])(RmsNormRopeParams) = {RmsNormRopeKernel<__nv_bfloat16, 1>,
                                        RmsNormRopeKernel<__nv_bfloat16, 2>,
                                        RmsNormRopeKernel<__nv_bfloat16, 4>};
  void (*fp16[3])(RmsNormRopeParams) = {RmsNormRopeKernel<__half, 1>,
                                        RmsNormRopeKernel<__half, 2>,
                                        RmsNormRopeKernel<__half, 4>};
  return LaunchRows(p, p.cols, p.rows, stream, bf16, fp16);
}

}  // namespace sparge::kernels
