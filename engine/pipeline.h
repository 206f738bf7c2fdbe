// The engine's narrow, Torch-free interface: text prompt -> denoised latents -> RGB frames.
// The server's executor thread drives it stage by stage (Start, Step..., Decode) so that jobs can
// join and leave a batch at step boundaries. Not thread-safe: one thread owns a Pipeline and every
// GenerationJob it created.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace sparge::engine {

// Which key blocks each query block keeps in self-attention (SpargeAttention2, section 2 of
// shared/design/SPARSE_ATTENTION.md).
enum class AttentionMode { kDense = 0, kTopK = 1, kTopP = 2, kHybrid = 3 };
const char* ToString(AttentionMode mode);

enum class SamplerKind { kEuler = 0, kUniPC = 1 };
const char* ToString(SamplerKind sampler);

// Per-request sparsity knobs, carried down to the attention op for each batch element.
struct SparsityKnobs {
  AttentionMode mode = AttentionMode::kDense;
  float topk = 0.1f;    // fraction of key blocks kept, (0, 1]
  float topp = 0.9f;    // pooled probability mass kept, (0, 1]
  int dense_steps = 0;  // the first dense_steps steps run dense
};

// A fully resolved request: every field set (the server fills defaults and validates ranges).
struct GenerationRequest {
  std::string prompt;
  std::string negative_prompt;
  int width = 256;
  int height = 256;
  int num_frames = 17;  // 4k+1
  int num_steps = 4;
  float guidance_scale = 5.0f;  // <= 1: no classifier-free guidance
  uint64_t seed = 0;
  SamplerKind sampler = SamplerKind::kEuler;
  float shift = 5.0f;
  SparsityKnobs sparsity;
};

// What one denoising step of one job did.
struct StepStats {
  int step = 0;                    // index of the step just finished, 0-based
  float achieved_sparsity = 0.0f;  // fraction of self-attention token pairs skipped, mean over
                                   // layers, heads and CFG branches; 0 for dense steps
  double seconds = 0.0;            // wall time of the batched step this job took part in
  double attention_seconds = 0.0;  // of that step, time in DiT self-attention (SelfAttention
                                   // calls; device time from CUDA events on GPU)
};

// Decoded video, uint8 RGB, frame-major: rgb[((f * height + y) * width + x) * 3 + c].
struct VideoFrames {
  int num_frames = 0;
  int height = 0;
  int width = 0;
  std::vector<uint8_t> rgb;
};

// Memory of the pipeline's device, bytes. On CUDA: allocated = bytes in live tensors, reserved =
// held by the caching allocator (allocated plus cached free blocks), total = the GPU's memory.
// On CPU: allocated = reserved = 0 (LibTorch's CPU allocator keeps no statistics; the server's
// sparge_job_state_bytes covers job state) and total = physical RAM. 0 also means unknown.
struct DeviceMemoryStats {
  int64_t allocated_bytes = 0;
  int64_t reserved_bytes = 0;
  int64_t total_bytes = 0;
};

// Static description of the loaded model (reported by GetServerInfo).
struct ModelDescription {
  std::string name;
  std::string architecture = "wan2.1-t2v";
  int64_t num_parameters = 0;  // DiT parameters
  int dim = 0;
  int layers = 0;
  int heads = 0;
  int head_dim = 0;
  std::string dtype;
  int block_q = 0;  // sparse-attention block sizes, tokens
  int block_k = 0;
  int text_len = 0;            // context rows the text encoder produces
  int vae_stride_spatial = 8;  // pixels per latent cell
  int vae_stride_temporal = 4; // frames per latent frame (after the first)
  int patch_spatial = 2;       // latent cells per DiT token side
};

struct PipelineConfig {
  // "tiny": the embedded model (tiny Wan2.1-architecture configuration, deterministic weights
  // drawn from weight_seed). Otherwise the path of a diffusers-layout Wan2.1 T2V model directory
  // (transformer/, text_encoder/, tokenizer/spiece.model, vae/, scheduler/; docs/WAN21_ENGINE.md).
  std::string model = "tiny";
  std::string device = "cpu";     // "cpu", "cuda" or "cuda:N"
  std::string dtype = "float32";  // "float32" | "bfloat16" | "float16" (DiT and text encoder)
  uint64_t weight_seed = 42;
  int block_q = 64;  // sparse attention query block, tokens
  int block_k = 64;  // sparse attention key block, tokens
  int num_threads = 0;  // CPU intra-op threads; 0 keeps Torch's default
  // Optional: a transformer directory (config.json + safetensors, e.g. a sparge-train checkpoint's
  // transformer/) whose weights replace the model's DiT weights; its config must equal the
  // model's DiT config.
  std::string transformer;
};

// Opaque per-request state: text embeddings, latents, sampler history.
class GenerationJob {
 public:
  virtual ~GenerationJob() = default;
  virtual const GenerationRequest& request() const = 0;
  virtual int steps_done() const = 0;
  virtual int total_steps() const = 0;
  bool denoise_done() const { return steps_done() >= total_steps(); }
  // Jobs with equal keys (latent shape and CFG on/off) may share one Step() call.
  virtual std::string BatchKey() const = 0;
  // Bytes of device memory this job's state holds.
  virtual int64_t state_bytes() const = 0;
};

class Pipeline {
 public:
  virtual ~Pipeline() = default;

  // Builds the model described by config (weights loaded or generated, moved to the device).
  static absl::StatusOr<std::unique_ptr<Pipeline>> Create(const PipelineConfig& config);

  virtual const ModelDescription& model() const = 0;
  // "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)".
  virtual std::string device_name() const = 0;

  // Runs a small request end to end once so that the first real request pays no warm-up cost.
  virtual absl::Status Warmup() = 0;

  // Encodes the prompt and negative prompt and draws the initial noise from request.seed.
  // INVALID_ARGUMENT if the request does not fit the model (sizes not multiples of 16, ...).
  virtual absl::StatusOr<std::unique_ptr<GenerationJob>> Start(const GenerationRequest& request) = 0;

  // One denoising step for every job in `jobs` (all with the same BatchKey and not done), batched
  // into one DiT call; each element keeps its own timestep, guidance, sampler and sparsity knobs.
  // Appends one StepStats per job to *stats, in order. RESOURCE_EXHAUSTED on device OOM, after
  // the caching allocator's free blocks are released so that a smaller retry can fit.
  virtual absl::Status Step(absl::Span<GenerationJob* const> jobs, std::vector<StepStats>* stats) = 0;

  // Decodes a finished job's latents into frames (VAE decode, [-1, 1] -> uint8).
  virtual absl::StatusOr<VideoFrames> Decode(GenerationJob& job) = 0;

  // The device's memory now (cheap: the server reads it after every step). Implementations that
  // cannot tell report zeros.
  virtual DeviceMemoryStats memory_stats() const { return {}; }
};

// Empty unless config runs on CUDA with settings the sparge CUDA kernels do not take (dtype,
// block sizes); then one sentence for the operator: which settings, and that sparse attention
// falls back to the much slower ATen reference path.
std::string CudaSparseKernelMismatch(const PipelineConfig& config);

}  // namespace sparge::engine
