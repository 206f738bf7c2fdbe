// SpargeAttention2 CUDA kernels: parameter structs and host launchers (framework-free, plain C++).
// Fill a params struct with device pointers and element strides, call CanImplement*() once, then
// Launch*() on a stream; launchers never synchronize. Stateless: safe to call from any thread.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sparge::kernels {

// Same numbering as sparge.v1.AttentionMode, so requests map straight through.
enum MaskMode : int32_t { kModeDense = 1, kModeTopK = 2, kModeTopP = 3, kModeHybrid = 4 };

enum class DType : int32_t { kBF16 = 0, kFP16 = 1 };

// Query rows per CTA tile and key rows per inner tile of the attention kernels. Mask query blocks
// must equal kTileQ; mask key blocks must be a multiple of kTileK.
inline constexpr int kTileQ = 128;
inline constexpr int kTileK = 64;

// A [B, L, H, D] activation addressed through element strides (stride over D must be 1), so both
// token-major and head-major ([B, H, L, D] viewed as [B, L, H, D]) tensors work without copies.
struct Tensor4 {
  void* ptr = nullptr;
  int64_t stride_b = 0, stride_l = 0, stride_h = 0;
};

// Mask predictor (SPARSE_ATTENTION.md section 2). Outputs, all int32, contiguous:
//   counts[B][H][Nq], indices[B][H][Nq][Nk] (kept key blocks, ascending; entries past the count
//   are -1), t_counts[B][H][Nk], t_indices[B][H][Nk][Nq] (query blocks keeping key block j,
//   ascending; -1 past the count). t_counts = t_indices = nullptr skips the transposed mask (only
//   the backward pass reads it): no bitmap, no memset, no transpose launch.
struct MaskParams {
  Tensor4 q, k;
  DType dtype = DType::kBF16;
  int batch = 0, seqlen = 0, heads = 0, head_dim = 0;
  int block_q = 128, block_k = 64;
  // Knobs indexed [b * knob_stride_b + h * knob_stride_h] (strides 0 broadcast a value).
  const int32_t* mode = nullptr;
  const float* topk = nullptr;  // fraction of key blocks
  const float* topp = nullptr;  // probability mass
  int64_t knob_stride_b = 0, knob_stride_h = 0;
  int32_t* counts = nullptr;
  int32_t* indices = nullptr;
  int32_t* t_counts = nullptr;
  int32_t* t_indices = nullptr;
  // Scratch of MaskWorkspaceBytes(*this) bytes, 256-byte aligned.
  void* workspace = nullptr;
};

// Forward kernel choice: Hopper warpgroup MMA (default) or the portable mma.sync kernel.
enum class FwdImpl : int32_t { kWgmma = 0, kMmaSync = 1 };

// Forward: O = softmax(Q K^T * scale + M) V over kept blocks, lse[B][H][L] (natural log, fp32).
struct FwdParams {
  Tensor4 q, k, v, o;
  DType dtype = DType::kBF16;
  int batch = 0, seqlen = 0, heads = 0, head_dim = 0;
  int block_q = 128, block_k = 64;
  float scale = 0.f;
  const int32_t* counts = nullptr;   // [B][H][Nq]
  const int32_t* indices = nullptr;  // [B][H][Nq][Nk]
  float* lse = nullptr;              // [B][H][L]
  FwdImpl impl = FwdImpl::kWgmma;
  // wgmma key tile: 0 = auto (128 keys when block_k allows, else 64), 64 = 64-key tiles at two
  // CTAs per SM. pipelined: selects the cp.async wgmma kernel (the default up to v6), for A/B.
  int tile_n = 0;
  bool pipelined = false;
};

// Backward: dQ, dK, dV from dO, O and lse, visiting kept blocks only (FlashAttention-2 style
// recomputation). dK/dV rows of key blocks that no query block keeps are written as zeros.
struct BwdParams {
  Tensor4 q, k, v, o, d_o, dq, dk, dv;
  DType dtype = DType::kBF16;
  int batch = 0, seqlen = 0, heads = 0, head_dim = 0;
  int block_q = 128, block_k = 64;
  float scale = 0.f;
  const int32_t* counts = nullptr;
  const int32_t* indices = nullptr;
  const int32_t* t_counts = nullptr;   // [B][H][Nk]
  const int32_t* t_indices = nullptr;  // [B][H][Nk][Nq]
  const float* lse = nullptr;
  float* delta = nullptr;  // scratch [B][H][L]: rowsum(dO * O)
  FwdImpl impl = FwdImpl::kWgmma;  // same choice as the forward pass: wgmma or mma.sync kernels
};

#if defined(__CUDACC__)
#define SPARGE_HOST_DEVICE __host__ __device__
#else
#define SPARGE_HOST_DEVICE
#endif

SPARGE_HOST_DEVICE inline int CeilDiv(int a, int b) { return (a + b - 1) / b; }

// Each CanImplement returns nullptr when the launcher supports the params, else a reason.
const char* CanImplementMask(const MaskParams& p);
size_t MaskWorkspaceBytes(const MaskParams& p);
cudaError_t LaunchMaskPredictor(const MaskParams& p, cudaStream_t stream);

const char* CanImplementFwd(const FwdParams& p);
cudaError_t LaunchBlockSparseFwd(const FwdParams& p, cudaStream_t stream);

const char* CanImplementBwd(const BwdParams& p);
cudaError_t LaunchBlockSparseBwd(const BwdParams& p, cudaStream_t stream);

}  // namespace sparge::kernels
