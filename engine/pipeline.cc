// Pipeline implementation for Wan2.1 text-to-video (the embedded tiny model, or
// weights loaded from a diffusers-layout model directory): umT5 text encoder, Wan
// DiT with per-element sparse self-attention, flow samplers with CFG, Wan VAE
// decoder.
#include "engine/pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <sys/stat.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <chrono>
#include <exception>
#include <string>
#include <utility>
#ifdef SPARGE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/attention/sparse_attention.h"
#include "engine/base/status_macros.h"
#include "engine/models/model_config.h"
#include "engine/models/model_loader.h"
#include "engine/models/tokenizer.h"
#include "engine/models/umt5_encoder.h"
#include "engine/models/wan_dit.h"
#include "engine/models/wan_vae_decoder.h"
#include "engine/sampling/flow_samplers.h"

namespace sparge::engine {

const char* ToString(AttentionMode mode) {
  switch (mode) {
    case AttentionMode::kDense:
      return "DENSE";
    case AttentionMode::kTopK:
      return "TOPK";
    case AttentionMode::kTopP:
      return "TOPP";
    case AttentionMode::kHybrid:
      return "HYBRID";
  }
  return "UNKNOWN";
}

const char* ToString(SamplerKind sampler) {
  switch (sampler) {
    case SamplerKind::kEuler:
      return "EULER";
    case SamplerKind::kUniPC:
      return "UNIPC";
  }
  return "UNKNOWN";
}

namespace {

constexpr int kVaeSpatialStride = 8;
constexpr int kVaeTemporalStride = 4;

// After a device OOM the failed call's temporaries are free but still cached by the allocator,
// fragmented into blocks that did not fit; hand them back to the driver so that a smaller retry
// (the server retries a batch job by job) and other processes can use them.
void ReleaseCachedDeviceMemory() {
#ifdef SPARGE_WITH_CUDA
  try {
    if (torch::cuda::is_available()) c10::cuda::CUDACachingAllocator::emptyCache();
  } catch (const std::exception&) {
    // Best effort: the OOM status is what the caller reports.
  }
#endif
}

// The module edge: LibTorch reports failures by throwing; everything above sees
// absl::Status.
template <typename Fn>
absl::Status GuardTorch(const char* what, Fn&& fn) {
  try {
    return fn();
  } catch (const c10::OutOfMemoryError& e) {
    ReleaseCachedDeviceMemory();
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": device out of memory: ", e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": host out of memory"));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what()));
  }
}

absl::StatusOr<torch::Device> ParseDevice(const std::string& name) {
  if (name == "cpu") return torch::Device(torch::kCPU);
  int index = 0;
  if (name == "cuda") {
    index = 0;
  } else if (name.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(name.substr(5), &index) &&
             index >= 0) {
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("device must be \"cpu\", \"cuda\" or \"cuda:N\", got \"", name, "\""));
  }
  if (!torch::cuda::is_available()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device \"", name, "\" requested but CUDA is not available in this build or machine"));
  }
  if (index >= static_cast<int>(torch::cuda::device_count())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device \"", name, "\": only ", torch::cuda::device_count(), " CUDA device(s) present"));
  }
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
}

absl::StatusOr<torch::ScalarType> ParseDtype(const std::string& name) {
  if (name == "float32") return torch::kFloat;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype must be \"float32\", \"bfloat16\" or \"float16\", got \"", name, "\""));
}

class TorchGenerationJob : public GenerationJob {
 public:
  TorchGenerationJob(GenerationRequest request, at::Tensor cond, at::Tensor uncond,
                     at::Tensor latents, std::unique_ptr<FlowSampler> sampler)
      : request_(std::move(request)),
        cond_(std::move(cond)),
        uncond_(std::move(uncond)),
        latents_(std::move(latents)),
        sampler_(std::move(sampler)) {}

  const GenerationRequest& request() const override { return request_; }
  int steps_done() const override { return sampler_->steps_done(); }
  int total_steps() const override { return sampler_->num_steps(); }
  std::string BatchKey() const override {
    return absl::StrFormat("%dx%dx%d/%s", latents_.size(2), latents_.size(3), latents_.size(4),
                           cfg() ? "cfg" : "nocfg");
  }
  int64_t state_bytes() const override {
    int64_t bytes = latents_.nbytes() + cond_.nbytes();
    if (uncond_.defined()) bytes += uncond_.nbytes();
    // UniPC keeps two x0 predictions and the last corrected sample.
    if (request_.sampler == SamplerKind::kUniPC) bytes += 3 * latents_.nbytes();
    return bytes;
  }

  bool cfg() const { return uncond_.defined(); }
  const at::Tensor& cond() const { return cond_; }
  const at::Tensor& uncond() const { return uncond_; }
  const at::Tensor& latents() const { return latents_; }
  FlowSampler& sampler() { return *sampler_; }
  void set_latents(at::Tensor latents) { latents_ = std::move(latents); }

  // The attention knobs for the next step: dense during the first dense_steps
  // steps.
  AttentionKnobs NextKnobs() const {
    const SparsityKnobs& s = request_.sparsity;
    AttentionKnobs knobs;
    if (s.mode != AttentionMode::kDense && steps_done() >= s.dense_steps) {
      knobs.mode = s.mode;
      knobs.topk = s.topk;
      knobs.topp = s.topp;
    }
    return knobs;
  }

 private:
  GenerationRequest request_;
  at::Tensor cond_;     // [1, text_len, text_dim]
  at::Tensor uncond_;   // negative-prompt context; undefined without CFG
  at::Tensor latents_;  // [1, 16, T', H', W'] float32 on the device
  std::unique_ptr<FlowSampler> sampler_;
};

class TinyWanPipeline : public Pipeline {
 public:
  TinyWanPipeline(PipelineConfig config, WanModelConfig model_config, torch::Device device,
                  torch::ScalarType dtype, std::unique_ptr<TextEncoder> text_encoder, WanDiT dit,
                  std::unique_ptr<VaeDecoder> vae)
      : config_(std::move(config)),
        model_config_(std::move(model_config)),
        device_(device),
        dtype_(dtype),
        text_encoder_(std::move(text_encoder)),
        dit_(std::move(dit)),
        vae_(std::move(vae)) {
    description_.name = config_.model;
    description_.num_parameters = dit_->num_parameters();
    description_.dim = model_config_.dit.dim;
    description_.layers = model_config_.dit.num_layers;
    description_.heads = model_config_.dit.num_heads;
    description_.head_dim = model_config_.dit.head_dim();
    description_.dtype = config_.dtype;
    description_.block_q = config_.block_q;
    description_.block_k = config_.block_k;
    description_.text_len = model_config_.text_encoder.text_len;
    description_.vae_stride_spatial = kVaeSpatialStride;
    description_.vae_stride_temporal = kVaeTemporalStride;
    description_.patch_spatial = model_config_.dit.patch_size[1];
  }

  const ModelDescription& model() const override { return description_; }

  DeviceMemoryStats memory_stats() const override {
    DeviceMemoryStats stats;
    if (device_.is_cpu()) {
      const long pages = ::sysconf(_SC_PHYS_PAGES);
      const long page_size = ::sysconf(_SC_PAGE_SIZE);
      if (pages > 0 && page_size > 0) stats.total_bytes = int64_t{pages} * page_size;
      return stats;
    }
#ifdef SPARGE_WITH_CUDA
    try {
      const c10::CachingDeviceAllocator::DeviceStats device_stats =
          c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index());
      const size_t aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
      stats.allocated_bytes = device_stats.allocated_bytes[aggregate].current;
      stats.reserved_bytes = device_stats.reserved_bytes[aggregate].current;
      stats.total_bytes =
          static_cast<int64_t>(at::cuda::getDeviceProperties(device_.index())->totalGlobalMem);
    } catch (const std::exception&) {
      return DeviceMemoryStats{};  // unknown rather than a failed step
    }
#endif
    return stats;
  }

  std::string device_name() const override {
    if (device_.is_cpu()) return "cpu";
    std::string name = device_.str();
#ifdef SPARGE_WITH_CUDA
    name = absl::StrCat(name, " (", at::cuda::getDeviceProperties(device_.index())->name, ")");
#endif
    return name;
  }

  absl::Status Warmup() override {
    // Smallest shape that exercises every stage: CFG, a dense step, then a
    // sparse step.
    GenerationRequest request;
    request.prompt = "warmup";
    request.width = 32;
    request.height = 32;
    request.num_frames = 5;
    request.num_steps = 2;
    request.guidance_scale = 5.0f;
    request.sparsity.mode = AttentionMode::kHybrid;
    request.sparsity.dense_steps = 1;
    SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<GenerationJob> job, Start(request));
    std::vector<StepStats> stats;
    while (!job->denoise_done()) {
      GenerationJob* batch[] = {job.get()};
      SPARGE_RETURN_IF_ERROR(Step(batch, &stats));
    }
    return Decode(*job).status();
  }

  absl::StatusOr<std::unique_ptr<GenerationJob>> Start(const GenerationRequest& request) override {
    SPARGE_RETURN_IF_ERROR(CheckFits(request));
    std::unique_ptr<GenerationJob> job;
    SPARGE_RETURN_IF_ERROR(GuardTorch("Start", [&]() -> absl::Status {
      c10::InferenceMode inference;
      const bool cfg = request.guidance_scale > 1.0f;
      std::vector<std::string> prompts = {request.prompt};
      if (cfg) prompts.push_back(request.negative_prompt);
      SPARGE_ASSIGN_OR_RETURN(at::Tensor context, text_encoder_->Encode(prompts));
      at::Tensor cond = context.narrow(0, 0, 1);
      at::Tensor uncond = cfg ? context.narrow(0, 1, 1) : at::Tensor();
      // Noise from a CPU generator so that a seed gives the same video on every
      // device.
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(request.seed);
      const int64_t latent_frames = (request.num_frames - 1) / kVaeTemporalStride + 1;
      at::Tensor noise =
          at::randn({1, model_config_.dit.in_channels, latent_frames,
                     request.height / kVaeSpatialStride, request.width / kVaeSpatialStride},
                    gen, at::TensorOptions().dtype(at::kFloat));
      job = std::make_unique<TorchGenerationJob>(
          request, cond, uncond, noise.to(device_),
          FlowSampler::Create(request.sampler, request.num_steps, request.shift));
      return absl::OkStatus();
    }));
    return job;
  }

  absl::Status Step(absl::Span<GenerationJob* const> jobs, std::vector<StepStats>* stats) override {
    if (jobs.empty()) return absl::InvalidArgumentError("Step: no jobs");
    std::vector<TorchGenerationJob*> batch;
    for (GenerationJob* job : jobs) {
      auto* torch_job = dynamic_cast<TorchGenerationJob*>(job);
      if (torch_job == nullptr) {
        return absl::InvalidArgumentError("Step: job was not created by this pipeline");
      }
      if (torch_job->denoise_done()) {
        return absl::FailedPreconditionError("Step: a job has already finished denoising");
      }
      if (torch_job->BatchKey() != jobs[0]->BatchKey()) {
        return absl::InvalidArgumentError(absl::StrCat("Step: jobs with different batch keys (",
                                                       jobs[0]->BatchKey(), " vs ",
                                                       torch_job->BatchKey(), ")"));
      }
      batch.push_back(torch_job);
    }
    const auto start = std::chrono::steady_clock::now();
    std::vector<float> job_sparsity(batch.size(), 0.0f);
    double attention_seconds = 0.0;
    attention_timer_.Start();
    absl::Status step_status = GuardTorch("Step", [&]() -> absl::Status {
      c10::InferenceMode inference;
      DenoiseStepBatch(batch, &job_sparsity);
      // On a GPU this waits for the step's last attention call, so the step's wall time below
      // covers at least its attention.
      attention_seconds = attention_timer_.Finish();
      return absl::OkStatus();
    });
    attention_timer_.Stop();
    SPARGE_RETURN_IF_ERROR(step_status);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (size_t j = 0; j < batch.size(); ++j) {
      stats->push_back(StepStats{batch[j]->steps_done() - 1, job_sparsity[j], seconds,
                                 attention_seconds});
    }
    return absl::OkStatus();
  }

  absl::StatusOr<VideoFrames> Decode(GenerationJob& job) override {
    auto* torch_job = dynamic_cast<TorchGenerationJob*>(&job);
    if (torch_job == nullptr) {
      return absl::InvalidArgumentError("Decode: job was not created by this pipeline");
    }
    if (!torch_job->denoise_done()) {
      return absl::FailedPreconditionError(absl::StrCat("Decode: job has done ",
                                                        torch_job->steps_done(), " of ",
                                                        torch_job->total_steps(), " steps"));
    }
    VideoFrames frames;
    SPARGE_RETURN_IF_ERROR(GuardTorch("Decode", [&]() -> absl::Status {
      c10::InferenceMode inference;
      SPARGE_ASSIGN_OR_RETURN(at::Tensor video, vae_->Decode(torch_job->latents()));
      // [1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8.
      at::Tensor rgb = ((video[0].to(at::kFloat).clamp(-1.0, 1.0) + 1.0) * 127.5)
                           .round()
                           .to(at::kByte)
                           .permute({1, 2, 3, 0})
                           .contiguous()
                           .to(at::kCPU);
      frames.num_frames = static_cast<int>(rgb.size(0));
      frames.height = static_cast<int>(rgb.size(1));
      frames.width = static_cast<int>(rgb.size(2));
      const uint8_t* data = rgb.data_ptr<uint8_t>();
      frames.rgb.assign(data, data + rgb.numel());
      return absl::OkStatus();
    }));
    return frames;
  }

 private:
  absl::Status CheckFits(const GenerationRequest& r) const {
    const int multiple = kVaeSpatialStride * model_config_.dit.patch_size[1];
    if (r.width <= 0 || r.width % multiple != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("width must be a positive multiple of ", multiple, ", got ", r.width));
    }
    if (r.height <= 0 || r.height % multiple != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("height must be a positive multiple of ", multiple, ", got ", r.height));
    }
    if (r.num_frames < 1 || (r.num_frames - 1) % kVaeTemporalStride != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_frames must be 4k+1 (1, 5, 9, ...), got ", r.num_frames));
    }
    const int64_t max_side = static_cast<int64_t>(model_config_.dit.rope_max_seq_len) * multiple;
    if (r.width > max_side || r.height > max_side) {
      return absl::InvalidArgumentError(
          absl::StrCat("width and height must be at most ", max_side));
    }
    if (r.num_steps < 1) {
      return absl::InvalidArgumentError(absl::StrCat("num_steps must be >= 1, got ", r.num_steps));
    }
    if (!(r.shift > 0.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("shift must be > 0, got ", r.shift));
    }
    const SparsityKnobs& s = r.sparsity;
    if (s.mode == AttentionMode::kTopK || s.mode == AttentionMode::kHybrid) {
      if (!(s.topk > 0.0f && s.topk <= 1.0f)) {
        return absl::InvalidArgumentError(
            absl::StrCat("sparsity.topk must be in (0, 1], got ", s.topk));
      }
    }
    if (s.mode == AttentionMode::kTopP || s.mode == AttentionMode::kHybrid) {
      if (!(s.topp > 0.0f && s.topp <= 1.0f)) {
        return absl::InvalidArgumentError(
            absl::StrCat("sparsity.topp must be in (0, 1], got ", s.topp));
      }
    }
    if (s.dense_steps < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsity.dense_steps must be >= 0, got ", s.dense_steps));
    }
    return absl::OkStatus();
  }

  // One DiT call for the whole batch (conditional rows first, then
  // unconditional rows when CFG is on), then each job's own guidance and
  // sampler update. Throws on Torch errors.
  void DenoiseStepBatch(const std::vector<TorchGenerationJob*>& batch,
                        std::vector<float>* job_sparsity) {
    const int64_t n = static_cast<int64_t>(batch.size());
    const bool cfg = batch[0]->cfg();
    std::vector<at::Tensor> latents, contexts;
    std::vector<float> timesteps;
    std::vector<AttentionKnobs> knobs;
    for (TorchGenerationJob* job : batch) {
      latents.push_back(job->latents());
      contexts.push_back(job->cond());
      timesteps.push_back(job->sampler().timestep());
      knobs.push_back(job->NextKnobs());
    }
    if (cfg) {
      for (int64_t j = 0; j < n; ++j) {
        latents.push_back(batch[j]->latents());
        contexts.push_back(batch[j]->uncond());
        timesteps.push_back(timesteps[j]);
        knobs.push_back(knobs[j]);
      }
    }
    // Pinned, asynchronous copy: the host does not wait for the previous step here.
    at::Tensor t =
        ToDeviceAsync(at::tensor(timesteps, at::TensorOptions().dtype(at::kFloat)), device_);
    DiTOutput out = dit_->Forward(at::cat(latents, 0), t, at::cat(contexts, 0), knobs);
    for (int64_t j = 0; j < n; ++j) {
      TorchGenerationJob* job = batch[j];
      at::Tensor v = out.velocity.narrow(0, j, 1);
      float sparsity = out.sparsity[j];
      if (cfg) {
        v = CombineGuidance(v, out.velocity.narrow(0, n + j, 1), job->request().guidance_scale);
        sparsity = 0.5f * (sparsity + out.sparsity[n + j]);
      }
      job->set_latents(job->sampler().Step(v, job->latents()));
      (*job_sparsity)[j] = sparsity;
    }
  }

  PipelineConfig config_;
  WanModelConfig model_config_;
  torch::Device device_;
  torch::ScalarType dtype_;
  std::unique_ptr<TextEncoder> text_encoder_;
  WanDiT dit_;
  std::unique_ptr<VaeDecoder> vae_;
  ModelDescription description_;
  AttentionTimer attention_timer_;  // reused across steps so its device events are pooled
};

}  // namespace

namespace {

// A replacement transformer must have the model's architecture (its weights are the only change).
absl::Status CheckSameDiT(const WanDiTConfig& model, const WanDiTConfig& replacement,
                          const std::string& dir) {
  const bool same = model.dim == replacement.dim && model.ffn_dim == replacement.ffn_dim &&
                    model.num_heads == replacement.num_heads &&
                    model.num_layers == replacement.num_layers &&
                    model.patch_size == replacement.patch_size &&
                    model.in_channels == replacement.in_channels &&
                    model.out_channels == replacement.out_channels &&
                    model.text_dim == replacement.text_dim &&
                    model.freq_dim == replacement.freq_dim;
  if (same) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "model.transformer: ", dir, " is a DiT of dim ", replacement.dim, ", ", replacement.num_layers,
      " layers, ", replacement.num_heads, " heads, text_dim ", replacement.text_dim,
      "; the model's is dim ", model.dim, ", ", model.num_layers, " layers, ", model.num_heads,
      " heads, text_dim ", model.text_dim));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Pipeline>> Pipeline::Create(const PipelineConfig& config) {
  SPARGE_ASSIGN_OR_RETURN(torch::Device device, ParseDevice(config.device));
  SPARGE_ASSIGN_OR_RETURN(torch::ScalarType dtype, ParseDtype(config.dtype));
  if (config.block_q <= 0 || config.block_k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("block_q and block_k must be > 0, got ",
                                                   config.block_q, " and ", config.block_k));
  }
  if (config.num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_threads must be >= 0, got ", config.num_threads));
  }
  std::unique_ptr<Pipeline> pipeline;
  const bool built_in = config.model == "tiny" || config.model == "wan1.3b-random";
  if (!built_in) {
    struct stat st{};
    if (::stat(config.model.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model \"", config.model,
          "\" is not available: use \"tiny\" (the embedded model), \"wan1.3b-random\" (1.3B DiT "
          "with seeded random weights, for load tests) or the path of a "
          "diffusers-layout Wan2.1 model directory (transformer/, text_encoder/, tokenizer/, vae/, "
          "scheduler/)"));
    }
    SPARGE_RETURN_IF_ERROR(GuardTorch("Pipeline::Create", [&]() -> absl::Status {
      if (config.num_threads > 0) at::set_num_threads(config.num_threads);
      SPARGE_ASSIGN_OR_RETURN(
          LoadedWanModel loaded,
          LoadModelDirectory(config.model, device, dtype, config.block_q, config.block_k));
      if (!config.transformer.empty()) {
        SPARGE_ASSIGN_OR_RETURN(WanDiTConfig replacement,
                                ReadDiTConfig(config.transformer + "/config.json"));
        SPARGE_RETURN_IF_ERROR(
            CheckSameDiT(loaded.config.model.dit, replacement, config.transformer));
        loaded.dit = WanDiT(nullptr);  // free the base weights before loading the replacement
        SPARGE_ASSIGN_OR_RETURN(loaded.dit, LoadDiT(config.transformer, device, dtype,
                                                    config.block_q, config.block_k));
      }
      pipeline = std::make_unique<TinyWanPipeline>(
          config, loaded.config.model, device, dtype, std::move(loaded.text_encoder),
          std::move(loaded.dit), std::move(loaded.vae));
      return absl::OkStatus();
    }));
    return pipeline;
  }
  WanModelConfig model_config =
      config.model == "tiny" ? TinyWanConfig() : Wan13BRandomConfig();
  if (!config.transformer.empty()) {
    SPARGE_ASSIGN_OR_RETURN(WanDiTConfig replacement,
                            ReadDiTConfig(config.transformer + "/config.json"));
    SPARGE_RETURN_IF_ERROR(CheckSameDiT(model_config.dit, replacement, config.transformer));
  }
  SPARGE_RETURN_IF_ERROR(model_config.dit.Validate());

  SPARGE_RETURN_IF_ERROR(GuardTorch("Pipeline::Create", [&]() -> absl::Status {
    if (config.num_threads > 0) at::set_num_threads(config.num_threads);
    SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Embedded());
    // Each component draws from its own seed so that resizing one leaves the
    // others unchanged.
    SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<TextEncoder> text_encoder,
                            TextEncoder::Create(model_config.text_encoder, std::move(tokenizer),
                                                config.weight_seed, device, dtype));
    WanDiT dit(model_config.dit, config.block_q, config.block_k);
    dit->InitializeWeights(config.weight_seed + 1);
    dit->ToInference(device, dtype);
    dit->eval();
    if (!config.transformer.empty()) {
      SPARGE_ASSIGN_OR_RETURN(dit, LoadDiT(config.transformer, device, dtype, config.block_q,
                                           config.block_k));
      dit->eval();
    }
    SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<VaeDecoder> vae,
                            VaeDecoder::Create(model_config.vae, config.weight_seed + 2, device));
    pipeline =
        std::make_unique<TinyWanPipeline>(config, model_config, device, dtype,
                                          std::move(text_encoder), std::move(dit), std::move(vae));
    return absl::OkStatus();
  }));
  return pipeline;
}

std::string CudaSparseKernelMismatch(const PipelineConfig& config) {
  if (config.device.rfind("cuda", 0) != 0) return "";
  return CudaKernelMismatch(config.dtype, config.block_q, config.block_k, /*head_dim=*/0);
}

}  // namespace sparge::engine
