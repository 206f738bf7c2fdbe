// Self-attention for the DiT with SpargeAttention2 block sparsity
// (shared/design/ SPARSE_ATTENTION.md sections 2-3): mask prediction, an ATen
// block-sparse reference that runs on any device, and SelfAttention(), the one
// dispatch point between dense SDPA, the reference and device kernels
// registered through RegisterSparseAttentionBackend(). Tensors are token-major
// [B, L, H, D]. Functions throw c10::Error on misuse (wrong shapes): they are
// engine-internal and the Pipeline converts exceptions to absl::Status at the
// module edge. Thread-safety: all functions are reentrant; the backend registry
// is guarded by a mutex.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Event.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "engine/pipeline.h"

namespace sparge::engine {

// The sparsity knobs of one batch element for one attention call (the step's
// dense_steps rule is already applied: such steps arrive as kDense).
struct AttentionKnobs {
  AttentionMode mode = AttentionMode::kDense;
  float topk = 1.0f;  // fraction of key blocks kept (TOPK, HYBRID)
  float topp = 1.0f;  // pooled probability mass kept (TOPP, HYBRID)
};

// Which key blocks each (batch element, head, query block) keeps.
struct BlockSparseMask {
  int64_t seq_len = 0;
  int64_t block_q = 0;
  int64_t block_k = 0;
  int64_t num_q_blocks = 0;  // ceil(seq_len / block_q)
  int64_t num_k_blocks = 0;  // ceil(seq_len / block_k)
  at::Tensor counts;         // int32 [B, H, Nq]: kept key blocks, in [1, Nk]
  at::Tensor indices;        // int32 [B, H, Nq, Nk]: kept block indices ascending,
                             // then -1 padding
};

// Predicts the block mask from q, k [B, L, H, D] (any float dtype, any device):
// K smoothed by its sequence mean, block mean pooling (a partial last block
// averages its real tokens), fp32 softmax of pooled scores / sqrt(D), then
// per-row selection (block_selection.h) with knobs[b]. The mask tensors live on
// the CPU.
BlockSparseMask PredictBlockMask(const at::Tensor& q, const at::Tensor& k,
                                 absl::Span<const AttentionKnobs> knobs, int64_t block_q,
                                 int64_t block_k);

// Achieved sparsity per batch element: 1 - kept token pairs / (L * L), averaged
// over heads, as a float32 [B] tensor on the mask's device, computed there from
// the counts and each row's last kept block (indices ascending), so a device
// mask is never copied to the host.
at::Tensor MaskSparsityTensor(const BlockSparseMask& mask);
// The same on the host (copies the [B] result).
std::vector<float> MaskSparsity(const BlockSparseMask& mask);

// A small host tensor (knobs, index lists) on `device` without waiting: the copy
// goes through pinned memory and is ordered on the current stream, so the host
// never blocks on the device inside a forward pass (a pageable copy would).
at::Tensor ToDeviceAsync(const at::Tensor& host, c10::Device device);

struct AttentionOutput {
  at::Tensor out;  // [B, L, H, D], q's dtype
  at::Tensor lse;  // [B, H, L] fp32, natural-log sum of exp(scaled scores) over
                   // kept keys
};

// Masked attention that only visits kept blocks (gathers each query block's
// kept K/V blocks), computed in fp32 with scale 1/sqrt(D). Reference semantics
// for the CUDA kernels.
AttentionOutput BlockSparseAttentionReference(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const BlockSparseMask& mask);

// The same attention through SDPA with a boolean [B, H, L, L] token mask
// expanded from the block mask: no LSE, but on CPU at video lengths of ~1e3
// tokens it beats gathering blocks.
at::Tensor MaskedSdpaAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const BlockSparseMask& mask);

// Dense attention (SDPA, scale 1/sqrt(D)) on token-major tensors: q [B, Lq, H,
// D], k and v [B, Lk, H, D] (Lk may differ from Lq, as in cross-attention).
at::Tensor DenseAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// A device implementation of the sparse path (mask prediction + block-sparse
// attention), e.g. the CUDA kernels of engine/ops. It receives only the batch
// elements whose mode is not kDense, returns the attention output [B', L, H, D]
// in q's dtype and writes the achieved sparsities to *sparsity as a float32
// [B'] tensor on q's device (no host copy: callers sum it over layers and read
// it once per forward).
struct SparseAttentionBackend {
  std::string name;
  // Whether this backend handles these inputs (dtype, head dim, block sizes);
  // when false the ATen reference runs instead.
  std::function<bool(const at::Tensor& q, int64_t block_q, int64_t block_k)> supports;
  std::function<at::Tensor(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           absl::Span<const AttentionKnobs> knobs, int64_t block_q, int64_t block_k,
                           at::Tensor* sparsity)>
      run;
};

// The plug-in point for device kernels. Replaces any backend registered for that device type.
// Without a registered backend, CUDA inputs use the "sparge" Torch ops of engine/ops
// (sparge::predict_block_mask + sparge::block_sparse_attention_fwd, looked up in the dispatcher at
// call time, so the engine needs no link dependency: linking or dlopen-ing libsparge_ops is
// enough) when they have a CUDA kernel and the inputs are bf16/fp16 with head dim 64 or 128.
void RegisterSparseAttentionBackend(c10::DeviceType device_type, SparseAttentionBackend backend);
// Removes the backend of that device type.
void UnregisterSparseAttentionBackend(c10::DeviceType device_type);
// Why a configuration's sparse self-attention would not reach the sparge CUDA kernels (they take
// bfloat16/float16, head dim 64 or 128, block_q 128 and block_k a multiple of 64), as one
// sentence naming the offending settings; empty when it would. head_dim <= 0: not checked.
std::string CudaKernelMismatch(const std::string& dtype, int64_t block_q, int64_t block_k,
                               int64_t head_dim);
// The backend that calls the "sparge" dispatcher ops (engine/ops) on any device they implement;
// its supports() is false while the ops are not loaded or lack a kernel for q's device.
SparseAttentionBackend SpargeOpsBackend();
// Name of the backend SelfAttention would use for this device type: a registered one,
// "sparge-ops" (CUDA with the ops loaded), else "aten-reference".
std::string SparseAttentionBackendName(c10::DeviceType device_type);

// Largest [B, H, L, L] boolean token mask the CPU path builds before it gathers blocks instead.
inline constexpr int64_t kMaxTokenMaskElements = int64_t{1} << 26;

// The DiT's self-attention: q, k, v [B, L, H, D]; knobs has B entries. Dense
// elements run SDPA; the others run the registered backend for q's device when
// it supports the inputs, else the ATen reference: PredictBlockMask, then
// MaskedSdpaAttention while the token mask stays small (at most
// kMaxTokenMaskElements), else BlockSparseAttentionReference. Writes the B
// achieved sparsities (0 for dense elements) to *sparsity_out when it is not
// null, as a float32 [B] tensor on q's device. On a device the call never
// waits for it (no device-to-host copy, knobs copied asynchronously).
// Returns [B, L, H, D].
// When an AttentionTimer is active on the calling thread, the call's time is added to it.
at::Tensor SelfAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         absl::Span<const AttentionKnobs> knobs, int64_t block_q, int64_t block_k,
                         at::Tensor* sparsity_out);

// Sums the time SelfAttention calls on one thread take between Start() and Finish(), e.g. over one
// denoising step. CPU tensors: wall time around each call. Device tensors: a pair of timing events
// recorded on the current stream around each call, so the host never waits inside the step;
// Finish() waits for the last event and sums the pairs' elapsed times. Events are pooled and
// reused across Start/Finish rounds. Not thread-safe: use one timer per thread (the pipeline's
// owner thread); timers on one thread nest (the innermost one records).
class AttentionTimer {
 public:
  AttentionTimer() = default;
  ~AttentionTimer();
  AttentionTimer(const AttentionTimer&) = delete;
  AttentionTimer& operator=(const AttentionTimer&) = delete;

  // Makes this timer the calling thread's active one and clears what it had measured.
  void Start();
  // Deactivates it and returns the seconds measured since Start() (waits for the last device
  // event); may throw c10::Error from the device runtime.
  double Finish();
  // Deactivates it without measuring, e.g. after a failed step.
  void Stop();

  // Used by SelfAttention: the calling thread's active timer, or null.
  static AttentionTimer* Current();
  void AddHostSeconds(double seconds) { host_seconds_ += seconds; }
  // Records the start event of one device call on the current stream of `device`.
  void RecordDeviceStart(c10::Device device);
  // Records the matching end event.
  void RecordDeviceEnd(c10::Device device);

 private:
  struct EventPair {
    explicit EventPair(c10::DeviceType type);
    c10::Event start;
    c10::Event end;
  };

  bool active_ = false;
  AttentionTimer* previous_ = nullptr;
  double host_seconds_ = 0.0;
  c10::Device event_device_{c10::kCPU};
  std::vector<std::unique_ptr<EventPair>> events_;
  size_t events_used_ = 0;
};

}  // namespace sparge::engine
