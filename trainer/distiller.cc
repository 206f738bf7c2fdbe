#include "trainer/distiller.h"

#include <ATen/CPUGeneratorImpl.h>
#include <sys/stat.h>
#include <torch/cuda.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <cerrno>
#include <climits>

#ifdef SPARGE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"
#include "engine/models/model_loader.h"
#include "engine/models/tokenizer.h"
#include "engine/models/umt5_encoder.h"
#include "engine/sampling/flow_samplers.h"
#include "engine/weights/safetensors.h"
#include "server/job_files.h"
#include "server/log.h"
#include "trainer/distributed.h"

namespace sparge::trainer {
using engine::AttentionKnobs;
using engine::AttentionMode;
using server::LogInfo;
using server::MakeDirectories;
using server::PathExists;
using server::RemoveTree;
using server::LogWarning;

namespace {

constexpr int kVaeSpatialStride = 8;
constexpr int kVaeTemporalStride = 4;

// Torch throws c10::Error; the trainer speaks absl::Status.
template <typename Fn>
absl::Status Guard(const char* what, Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    std::string message = e.what();
    // c10::Error carries a C++ backtrace after the first line; the first line says it all.
    const size_t newline = message.find('\n');
    if (newline != std::string::npos) message.resize(newline);
    return absl::InternalError(absl::StrCat(what, ": ", message));
  }
}

// A 64-bit seed from (seed, stream, index): splitmix64 over their combination.
uint64_t MixSeed(uint64_t seed, uint64_t stream, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull ^ (stream + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^
               (index + 1) * 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// FNV-1a: a hash that is the same in every process and run (absl::Hash is salted per process).
uint64_t StableHash(const std::string& text) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : text) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

at::Generator CpuGenerator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("data.prompts: cannot read ", path));
  std::vector<std::string> prompts;
  std::string line;
  while (std::getline(in, line)) {
    std::string text(absl::StripAsciiWhitespace(line));
    if (text.empty() || text[0] == '#') continue;
    prompts.push_back(text);
  }
  if (prompts.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("data.prompts: ", path, " holds no prompt (one per line; # starts a comment)"));
  }
  return prompts;
}

std::string StepDirName(int step) { return absl::StrFormat("step-%07d", step); }

// Complete checkpoints under dir, by step.
std::map<int, std::string> ListCheckpoints(const std::string& dir) {
  std::map<int, std::string> found;
  absl::StatusOr<std::vector<std::string>> names = server::ListDirectory(dir);
  if (!names.ok()) return found;
  static const std::regex kName("step-([0-9]{7})");
  for (const std::string& name : *names) {
    std::smatch m;
    const std::string path = absl::StrCat(dir, "/", name);
    if (!std::regex_match(name, m, kName)) continue;
    if (!PathExists(path + "/trainer_state/state.json")) continue;
    found[std::stoi(m[1].str())] = path;
  }
  return found;
}

// POSIX rename, as a Status.
absl::Status Rename(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    return server::ErrnoStatus(errno, "cannot rename to " + to + ":", from);
  }
  return absl::OkStatus();
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

std::string DiTConfigJson(const engine::WanDiTConfig& c) {
  return absl::StrFormat(
      "{\n  \"_class_name\": \"WanTransformer3DModel\",\n  \"_diffusers_version\": \"0.35.1\",\n"
      "  \"attention_head_dim\": %d,\n  \"cross_attn_norm\": true,\n  \"eps\": %g,\n"
      "  \"ffn_dim\": %d,\n  \"freq_dim\": %d,\n  \"in_channels\": %d,\n"
      "  \"num_attention_heads\": %d,\n  \"num_layers\": %d,\n  \"out_channels\": %d,\n"
      "  \"patch_size\": [%d, %d, %d],\n  \"qk_norm\": \"rms_norm_across_heads\",\n"
      "  \"rope_max_seq_len\": %d,\n  \"text_dim\": %d\n}\n",
      c.head_dim(), c.eps, c.ffn_dim, c.freq_dim, c.in_channels, c.num_heads, c.num_layers,
      c.out_channels, c.patch_size[0], c.patch_size[1], c.patch_size[2], c.rope_max_seq_len,
      c.text_dim);
}

int64_t PeakDeviceBytes(const torch::Device& device, bool reset) {
#ifdef SPARGE_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const size_t aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    const int64_t peak = stats.allocated_bytes[aggregate].peak;
    if (reset) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
    return peak;
  }
#endif
  return 0;
}

}  // namespace

struct Distiller::TextEncoderHolder {
  std::unique_ptr<engine::TextEncoder> encoder;
};

struct Distiller::Sample {
  int index = 0;
  bool uncond = false;
  at::Tensor x0;     // [16, T', H', W'] fp32, CPU
  at::Tensor noise;  // same shape
  float sigma = 0.0f;
};

Distiller::Distiller(TrainerConfig config, Communicator* comm, torch::Device device,
                     torch::ScalarType dtype)
    : config_(std::move(config)), comm_(comm), device_(device), dtype_(dtype) {}

Distiller::~Distiller() = default;

int Distiller::num_prompts() const { return static_cast<int>(prompts_.size()); }

absl::StatusOr<std::unique_ptr<Distiller>> Distiller::Create(const TrainerConfig& config,
                                                             Communicator* comm) {
  SPARGE_RETURN_IF_ERROR(config.Validate());
  torch::Device device(torch::kCPU);
  SPARGE_RETURN_IF_ERROR(Guard("device", [&]() -> absl::Status {
    device = torch::Device(config.device);
    return absl::OkStatus();
  }));
  if (device.is_cuda()) {
    if (!torch::cuda::is_available()) {
      return absl::FailedPreconditionError(
          absl::StrCat("device: ", config.device, " asked for, but no CUDA device is visible"));
    }
    // One GPU per local rank when the config says just "cuda".
    if (!device.has_index()) {
      const char* local = std::getenv("LOCAL_RANK");
      device = torch::Device(torch::kCUDA, local != nullptr ? std::atoi(local) : 0);
    }
    if (device.index() >= static_cast<int>(torch::cuda::device_count())) {
      return absl::InvalidArgumentError(absl::StrCat("device: cuda:", device.index(),
                                                     " does not exist (", torch::cuda::device_count(),
                                                     " visible)"));
    }
  }
  const torch::ScalarType dtype = config.dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat;
  // The CUDA kernels' limits (kernels/README.md); outside them the student's sparse attention runs
  // the ATen reference, correct but far slower and hungrier.
  if (device.is_cuda() && config.sparsity.mode != AttentionMode::kDense &&
      (dtype != torch::kBFloat16 || config.sparsity.block_q != 128 ||
       config.sparsity.block_k % 64 != 0)) {
    LogWarning(absl::StrCat(
        "the sparse attention CUDA kernels need dtype bfloat16, sparsity.block_q 128 and "
        "sparsity.block_k a multiple of 64 (got ", config.dtype, ", ", config.sparsity.block_q,
        ", ", config.sparsity.block_k, "): the student's attention takes the slow ATen reference"));
  } else if (device.is_cuda() && config.sparsity.mode != AttentionMode::kDense &&
             config.sparsity.block_k % 128 != 0) {
    LogInfo(absl::StrCat(
        "sparsity.block_k ", config.sparsity.block_k, ": the backward pass takes the split "
        "kernels; the fused one needs block_k a multiple of 128 (at the Wan-1.3B shape it is "
        "1.68x faster, kernels/NOTES.md)"));
  }
  std::unique_ptr<Distiller> d(new Distiller(config, comm, device, dtype));
  SPARGE_RETURN_IF_ERROR(d->Build());
  return d;
}

absl::Status Distiller::Build() {
  const int64_t bq = config_.sparsity.block_q, bk = config_.sparsity.block_k;
  text_ = std::make_unique<TextEncoderHolder>();
  SPARGE_RETURN_IF_ERROR(Guard("building the models", [&]() -> absl::Status {
    if (config_.model == "tiny" || config_.model == "wan1.3b-random") {
      model_config_ =
          config_.model == "tiny" ? engine::TinyWanConfig() : engine::Wan13BRandomConfig();
      SPARGE_RETURN_IF_ERROR(model_config_.dit.Validate());
      SPARGE_ASSIGN_OR_RETURN(std::unique_ptr<engine::Tokenizer> tokenizer,
                              engine::Tokenizer::Embedded());
      // The same seeds as the server's pipeline: text encoder weight_seed, DiT weight_seed + 1.
      SPARGE_ASSIGN_OR_RETURN(text_->encoder,
                              engine::TextEncoder::Create(model_config_.text_encoder,
                                                          std::move(tokenizer),
                                                          config_.weight_seed, device_, dtype_));
      for (engine::WanDiT* dit : {&teacher_, &student_}) {
        *dit = engine::WanDiT(model_config_.dit, bq, bk);
        (*dit)->InitializeWeights(config_.weight_seed + 1);
        (*dit)->ToInference(device_, dtype_);
      }
    } else {
      struct stat st {};
      if (::stat(config_.model.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "model: \"", config_.model,
            "\" is neither a built-in model (tiny, wan1.3b-random) nor a model directory"));
      }
      char resolved[PATH_MAX];
      if (::realpath(config_.model.c_str(), resolved) == nullptr) {
        return server::ErrnoStatus(errno, "model: cannot resolve", config_.model);
      }
      model_dir_ = resolved;
      SPARGE_ASSIGN_OR_RETURN(engine::LoadedWanModel loaded,
                              engine::LoadModelDirectory(model_dir_, device_, dtype_, bq, bk));
      model_config_ = loaded.config.model;
      text_->encoder = std::move(loaded.text_encoder);
      teacher_ = loaded.dit;
      SPARGE_ASSIGN_OR_RETURN(student_, engine::LoadDiT(model_dir_ + "/transformer", device_,
                                                        dtype_, bq, bk));
    }
    teacher_->eval();
    for (at::Tensor& p : teacher_->parameters()) p.requires_grad_(false);
    student_->train();
    student_->SetActivationCheckpointing(config_.training.activation_checkpointing);

    // AdamW over fp32 masters; weight decay on matrices and convolutions only (not on biases,
    // norm weights or modulation tables).
    std::vector<at::Tensor> decay, no_decay;
    for (auto& item : student_->named_parameters(/*recurse=*/true)) {
      at::Tensor p = item.value();
      p.requires_grad_(true);
      at::Tensor master =
          p.scalar_type() == at::kFloat ? p : p.detach().to(at::kFloat).clone();
      params_.emplace_back(item.key(), p);
      masters_.push_back(master);
      const bool is_table = item.key().find("scale_shift_table") != std::string::npos;
      (p.dim() >= 2 && !is_table ? decay : no_decay).push_back(master);
    }
    const OptimizerConfig& o = config_.optimizer;
    auto options = torch::optim::AdamWOptions(o.lr)
                       .betas({o.beta1, o.beta2})
                       .eps(o.eps)
                       .weight_decay(o.weight_decay);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(options));
    auto no_decay_options = options;
    no_decay_options.weight_decay(0.0);
    groups.emplace_back(no_decay,
                        std::make_unique<torch::optim::AdamWOptions>(no_decay_options));
    optimizer_ = std::make_unique<torch::optim::AdamW>(std::move(groups), options);
    return absl::OkStatus();
  }));
  return absl::OkStatus();
}

std::string Distiller::CachePath(int index) const {
  const DataConfig& d = config_.data;
  const std::string key = absl::StrCat(
      config_.model, "|", config_.weight_seed, "|", config_.dtype, "|", config_.seed, "|", d.width,
      "x", d.height, "x", d.num_frames, "|", d.teacher_steps, "|", d.guidance_scale, "|", d.shift,
      "|", d.negative_prompt, "|", prompts_[index]);
  return absl::StrFormat("%s/cache/x0-%016x-%06d.safetensors", config_.output_dir,
                         StableHash(key), index);
}

absl::StatusOr<at::Tensor> Distiller::CleanLatent(int index) const {
  std::string path;
  if (!config_.data.latents_dir.empty()) {
    path = absl::StrCat(config_.data.latents_dir, "/", index, ".safetensors");
    if (!PathExists(path)) path.clear();
  }
  if (path.empty()) path = CachePath(index);
  SPARGE_ASSIGN_OR_RETURN(auto checkpoint, engine::Checkpoint::Open(path));
  SPARGE_ASSIGN_OR_RETURN(at::Tensor latents, checkpoint->Get("latents"));
  const DataConfig& d = config_.data;
  const std::vector<int64_t> want = {model_config_.dit.in_channels,
                                     (d.num_frames - 1) / kVaeTemporalStride + 1,
                                     d.height / kVaeSpatialStride, d.width / kVaeSpatialStride};
  if (latents.sizes() != at::IntArrayRef(want)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": \"latents\" has shape [", absl::StrJoin(latents.sizes(), ", "),
        "], the data size asks for [", absl::StrJoin(want, ", "), "]"));
  }
  return latents.to(at::kFloat).clone();  // off the read-only mapping
}

absl::StatusOr<at::Tensor> Distiller::GenerateLatent(int index) {
  const DataConfig& d = config_.data;
  at::Tensor latents;
  SPARGE_RETURN_IF_ERROR(Guard("teacher sampling", [&]() -> absl::Status {
    torch::NoGradGuard no_grad;
    at::Generator gen = CpuGenerator(MixSeed(config_.seed, 2, index));
    latents = at::randn({1, model_config_.dit.in_channels,
                         (d.num_frames - 1) / kVaeTemporalStride + 1,
                         d.height / kVaeSpatialStride, d.width / kVaeSpatialStride},
                        gen, at::TensorOptions().dtype(at::kFloat))
                  .to(device_);
    auto sampler = engine::FlowSampler::Create(engine::SamplerKind::kUniPC, d.teacher_steps,
                                               d.shift);
    const bool cfg = d.guidance_scale > 1.0f;
    at::Tensor cond = context_.narrow(0, index, 1).to(device_);
    at::Tensor context = cfg ? at::cat({cond, negative_.to(device_)}, 0) : cond;
    std::vector<AttentionKnobs> dense(cfg ? 2 : 1);
    while (!sampler->done()) {
      at::Tensor input = cfg ? at::cat({latents, latents}, 0) : latents;
      at::Tensor t = at::full({input.size(0)}, sampler->timestep(),
                              at::TensorOptions().dtype(at::kFloat).device(device_));
      at::Tensor v = teacher_->Forward(input, t, context, dense).velocity;
      if (cfg) v = engine::CombineGuidance(v.narrow(0, 0, 1), v.narrow(0, 1, 1), d.guidance_scale);
      latents = sampler->Step(v, latents);
    }
    latents = latents[0].to(at::kCPU);
    return absl::OkStatus();
  }));
  return latents;
}

absl::Status Distiller::PrepareData() {
  const int rank = comm_ != nullptr ? comm_->rank() : 0;
  const int world = comm_ != nullptr ? comm_->world_size() : 1;
  SPARGE_ASSIGN_OR_RETURN(prompts_, ReadPrompts(config_.data.prompts));
  SPARGE_RETURN_IF_ERROR(MakeDirectories(config_.output_dir + "/cache"));
  if (text_ == nullptr || text_->encoder == nullptr) {
    return absl::FailedPreconditionError("PrepareData: called twice");
  }
  const int n = num_prompts();
  LogInfo(absl::StrCat("encoding ", n, " prompts"));
  SPARGE_RETURN_IF_ERROR(Guard("text encoding", [&]() -> absl::Status {
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> parts;
    constexpr int kBatch = 8;
    for (int i = 0; i < n; i += kBatch) {
      std::vector<std::string> batch(prompts_.begin() + i,
                                     prompts_.begin() + std::min(n, i + kBatch));
      SPARGE_ASSIGN_OR_RETURN(at::Tensor encoded, text_->encoder->Encode(batch));
      parts.push_back(encoded.to(at::kCPU));
    }
    context_ = at::cat(parts, 0);
    SPARGE_ASSIGN_OR_RETURN(at::Tensor negative,
                            text_->encoder->Encode({config_.data.negative_prompt}));
    negative_ = negative.to(at::kCPU);
    return absl::OkStatus();
  }));
  text_.reset();  // the umT5 encoder is the largest part of the model; training needs it no more

  // Each rank generates the missing latents of its share, then everybody reads the cache.
  std::vector<int> missing;
  for (int i = rank; i < n; i += world) {
    const bool given = !config_.data.latents_dir.empty() &&
                       PathExists(absl::StrCat(config_.data.latents_dir, "/", i, ".safetensors"));
    if (!given && !PathExists(CachePath(i))) missing.push_back(i);
  }
  if (!missing.empty()) {
    LogInfo(absl::StrCat("rank ", rank, ": generating ", missing.size(),
                         " clean latents with the dense teacher (", config_.data.teacher_steps,
                         " UniPC steps each)"));
  }
  const auto start = std::chrono::steady_clock::now();
  for (size_t m = 0; m < missing.size(); ++m) {
    const int i = missing[m];
    SPARGE_ASSIGN_OR_RETURN(at::Tensor x0, GenerateLatent(i));
    const std::string path = CachePath(i);
    const std::string tmp = absl::StrCat(path, ".tmp-", ::getpid());
    SPARGE_RETURN_IF_ERROR(engine::WriteSafetensors(tmp, {{"latents", x0}},
                                                    {{"prompt", prompts_[i]}}));
    SPARGE_RETURN_IF_ERROR(Rename(tmp, path));
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    LogInfo(absl::StrFormat("rank %d: latent %d/%d (prompt %d) done, %.1f s each, ETA %.0f s", rank,
                            m + 1, missing.size(), i, elapsed / (m + 1),
                            elapsed / (m + 1) * (missing.size() - m - 1)));
  }
  if (comm_ != nullptr) SPARGE_RETURN_IF_ERROR(comm_->Barrier());
  // Fail now, not at step 9000, if any latent is unreadable or mis-shaped.
  for (int i = 0; i < n; ++i) {
    SPARGE_RETURN_IF_ERROR(CleanLatent(i).status());
  }
  return absl::OkStatus();
}

absl::StatusOr<Distiller::Sample> Distiller::MakeSample(int64_t g, uint64_t stream) const {
  const int64_t n = num_prompts();
  if (n == 0) return absl::FailedPreconditionError("no data: call PrepareData() first");
  Sample s;
  // The epoch's permutation of the prompts, then this sample's own randomness.
  at::Generator epoch_gen = CpuGenerator(MixSeed(config_.seed, stream * 2 + 1, g / n));
  at::Tensor perm = at::randperm(n, epoch_gen, at::TensorOptions().dtype(at::kLong));
  s.index = static_cast<int>(perm[g % n].item<int64_t>());
  SPARGE_ASSIGN_OR_RETURN(s.x0, CleanLatent(s.index));
  at::Generator gen = CpuGenerator(MixSeed(config_.seed, stream * 2, g));
  s.uncond = at::rand({1}, gen).item<float>() < config_.data.uncond_prob;
  s.noise = at::randn(s.x0.sizes(), gen, at::TensorOptions().dtype(at::kFloat));
  const TrainingConfig& t = config_.training;
  double u;
  if (t.sigma_sampler == SigmaSamplerKind::kLogitNormal) {
    const double z = at::randn({1}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>();
    u = 1.0 / (1.0 + std::exp(-(t.sigma_mean + t.sigma_std * z)));
  } else {
    u = at::rand({1}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>();
  }
  // The flow shift used at inference moves the training sigmas the same way.
  const double shift = t.sigma_shift;
  s.sigma = static_cast<float>(std::clamp(shift * u / (1.0 + (shift - 1.0) * u), 1e-4, 1.0));
  return s;
}

absl::StatusOr<double> Distiller::SampleLoss(const std::vector<Sample>& batch, bool grad,
                                             double* sparsity) {
  double loss_value = 0.0;
  SPARGE_RETURN_IF_ERROR(Guard("training step", [&]() -> absl::Status {
    std::vector<at::Tensor> x0s, noises, contexts;
    std::vector<float> sigmas;
    for (const Sample& s : batch) {
      x0s.push_back(s.x0);
      noises.push_back(s.noise);
      contexts.push_back(s.uncond ? negative_ : context_.narrow(0, s.index, 1));
      sigmas.push_back(s.sigma);
    }
    const auto fp32 = at::TensorOptions().dtype(at::kFloat).device(device_);
    at::Tensor x0 = at::stack(x0s).to(device_);
    at::Tensor noise = at::stack(noises).to(device_);
    at::Tensor sigma = at::tensor(sigmas, at::TensorOptions().dtype(at::kFloat)).to(device_);
    at::Tensor s5 = sigma.view({-1, 1, 1, 1, 1});
    at::Tensor xt = (1 - s5) * x0 + s5 * noise;
    at::Tensor t = (sigma * 1000.0).to(fp32);
    at::Tensor context = at::cat(contexts, 0).to(device_);
    const int64_t b = static_cast<int64_t>(batch.size());

    at::Tensor target;
    if (config_.training.loss == LossKind::kDistill) {
      torch::NoGradGuard no_grad;
      target = teacher_->Forward(xt, t, context, std::vector<AttentionKnobs>(b)).velocity;
    } else {
      target = noise - x0;
    }
    AttentionKnobs knobs;
    knobs.mode = config_.sparsity.mode;
    knobs.topk = config_.sparsity.topk;
    knobs.topp = config_.sparsity.topp;
    if (knobs.mode == AttentionMode::kDense) knobs = AttentionKnobs{};
    at::AutoGradMode grad_mode(grad);
    engine::DiTOutput out = student_->Forward(xt, t, context, std::vector<AttentionKnobs>(b, knobs));
    at::Tensor loss = at::mse_loss(out.velocity, target);
    if (grad) (loss / config_.training.grad_accumulation).backward();
    loss_value = loss.item<double>();
    double sum = 0.0;
    for (float s : out.sparsity) sum += s;
    *sparsity = sum / static_cast<double>(out.sparsity.size());
    return absl::OkStatus();
  }));
  if (!std::isfinite(loss_value)) {
    return absl::InternalError(absl::StrCat("loss is ", loss_value, " at step ", step_ + 1,
                                            ": lower optimizer.lr or check the data"));
  }
  return loss_value;
}

double Distiller::LearningRate(int step) const {
  return trainer::LearningRate(config_.optimizer, step, config_.training.max_steps);
}

absl::StatusOr<StepStats> Distiller::TrainStep() {
  const auto start = std::chrono::steady_clock::now();
  const int rank = comm_ != nullptr ? comm_->rank() : 0;
  const int world = comm_ != nullptr ? comm_->world_size() : 1;
  const TrainingConfig& tc = config_.training;
  StepStats stats;
  double loss_sum = 0.0, sparsity_sum = 0.0, sigma_sum = 0.0;
  for (auto& [name, p] : params_) p.mutable_grad().reset();
  for (int micro = 0; micro < tc.grad_accumulation; ++micro) {
    std::vector<Sample> batch;
    for (int j = 0; j < tc.batch_size; ++j) {
      const int64_t g =
          ((static_cast<int64_t>(step_) * tc.grad_accumulation + micro) * world + rank) *
              tc.batch_size + j;
      SPARGE_ASSIGN_OR_RETURN(Sample s, MakeSample(g, /*stream=*/0));
      sigma_sum += s.sigma;
      batch.push_back(std::move(s));
    }
    double sparsity = 0.0;
    SPARGE_ASSIGN_OR_RETURN(double loss, SampleLoss(batch, /*grad=*/true, &sparsity));
    loss_sum += loss;
    sparsity_sum += sparsity;
  }

  const double lr = LearningRate(step_);
  SPARGE_RETURN_IF_ERROR(Guard("optimizer step", [&]() -> absl::Status {
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> grads;
    grads.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i].second;
      // A parameter the loss did not reach (none in the DiT) gets a zero gradient, so that every
      // rank reduces the same list.
      grads.push_back(p.grad().defined() ? p.grad().to(at::kFloat) : at::zeros_like(masters_[i]));
    }
    if (comm_ != nullptr && world > 1) SPARGE_RETURN_IF_ERROR(comm_->AllReduceMean(grads));
    at::Tensor sq = at::zeros({}, grads[0].options());
    for (const at::Tensor& g : grads) sq += g.square().sum();
    const double norm = std::sqrt(sq.item<double>());
    stats.grad_norm = norm;
    double scale = 1.0;
    const double max_norm = config_.optimizer.max_grad_norm;
    if (max_norm > 0.0 && norm > max_norm) scale = max_norm / (norm + 1e-6);
    for (size_t i = 0; i < grads.size(); ++i) {
      if (scale != 1.0) grads[i].mul_(scale);
      masters_[i].mutable_grad() = grads[i];
    }
    for (auto& group : optimizer_->param_groups()) group.options().set_lr(lr);
    optimizer_->step();
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor& p = params_[i].second;
      if (!masters_[i].is_same(p)) p.copy_(masters_[i]);
      p.mutable_grad().reset();
      masters_[i].mutable_grad().reset();
    }
    return absl::OkStatus();
  }));
  ++step_;
  double loss_total = loss_sum, sparsity_total = sparsity_sum;
  if (comm_ != nullptr && world > 1) {
    SPARGE_ASSIGN_OR_RETURN(loss_total, comm_->AllReduceSum(loss_sum));
    SPARGE_ASSIGN_OR_RETURN(sparsity_total, comm_->AllReduceSum(sparsity_sum));
  }
  stats.step = step_;
  stats.loss = loss_total / (tc.grad_accumulation * world);
  stats.sparsity = sparsity_total / (tc.grad_accumulation * world);
  stats.mean_sigma = sigma_sum / (tc.grad_accumulation * tc.batch_size);
  stats.lr = lr;
  stats.samples = static_cast<int64_t>(tc.grad_accumulation) * tc.batch_size * world;
  stats.peak_memory_bytes = PeakDeviceBytes(device_, /*reset=*/true);
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

absl::StatusOr<double> Distiller::EvalLoss(int count) {
  const int rank = comm_ != nullptr ? comm_->rank() : 0;
  const int world = comm_ != nullptr ? comm_->world_size() : 1;
  std::vector<int64_t> mine;
  for (int64_t g = rank; g < count; g += world) mine.push_back(g);
  double total = 0.0;
  for (size_t i = 0; i < mine.size();) {
    std::vector<Sample> batch;
    for (; i < mine.size() && static_cast<int>(batch.size()) < config_.training.batch_size; ++i) {
      SPARGE_ASSIGN_OR_RETURN(Sample s, MakeSample(mine[i], /*stream=*/1));
      batch.push_back(std::move(s));
    }
    double sparsity = 0.0;
    SPARGE_ASSIGN_OR_RETURN(double loss, SampleLoss(batch, /*grad=*/false, &sparsity));
    total += loss * static_cast<double>(batch.size());
  }
  if (comm_ != nullptr && world > 1) {
    SPARGE_ASSIGN_OR_RETURN(total, comm_->AllReduceSum(total));
  }
  return total / count;
}

absl::Status Distiller::WriteTransformer(const std::string& dir) const {
  SPARGE_RETURN_IF_ERROR(MakeDirectories(dir));
  SPARGE_RETURN_IF_ERROR(WriteText(dir + "/config.json", DiTConfigJson(model_config_.dit)));
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, p] : params_) tensors[name] = p.detach();
  return engine::WriteSafetensors(dir + "/diffusion_pytorch_model.safetensors", tensors,
                                  {{"format", "pt"}, {"sparge_train_step", absl::StrCat(step_)}});
}

absl::StatusOr<std::string> Distiller::SaveCheckpoint() {
  const int rank = comm_ != nullptr ? comm_->rank() : 0;
  const std::string final_dir = absl::StrCat(config_.output_dir, "/", StepDirName(step_));
  if (rank == 0) {
    const std::string tmp = absl::StrCat(final_dir, ".tmp-", ::getpid());
    SPARGE_RETURN_IF_ERROR(RemoveTree(tmp));
    SPARGE_RETURN_IF_ERROR(Guard("saving a checkpoint", [&]() -> absl::Status {
      SPARGE_RETURN_IF_ERROR(WriteTransformer(tmp + "/transformer"));
      const std::string state = tmp + "/trainer_state";
      SPARGE_RETURN_IF_ERROR(MakeDirectories(state));
      if (dtype_ != at::kFloat) {
        std::map<std::string, torch::Tensor> masters;
        for (size_t i = 0; i < params_.size(); ++i) masters[params_[i].first] = masters_[i];
        SPARGE_RETURN_IF_ERROR(engine::WriteSafetensors(state + "/master.safetensors", masters));
      }
      torch::save(*optimizer_, state + "/optimizer.pt");
      SPARGE_RETURN_IF_ERROR(WriteText(state + "/identity.txt", TrainingIdentity(config_) + "\n"));
      // A checkpoint of a model directory is itself a servable model directory: the parts the
      // trainer does not change point at the base model.
      if (!model_dir_.empty()) {
        for (const char* part :
             {"text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"}) {
          const std::string target = absl::StrCat(model_dir_, "/", part);
          const std::string link = absl::StrCat(tmp, "/", part);
          if (PathExists(target) && ::symlink(target.c_str(), link.c_str()) != 0) {
            return server::ErrnoStatus(errno, "cannot link to " + target + ":", link);
          }
        }
      }
      // Written last: its presence marks the checkpoint complete.
      return WriteText(state + "/state.json",
                       absl::StrFormat("{\"step\": %d, \"world_size\": %d, \"model\": \"%s\"}\n",
                                       step_, comm_ != nullptr ? comm_->world_size() : 1,
                                       config_.model));
    }));
    SPARGE_RETURN_IF_ERROR(RemoveTree(final_dir));
    SPARGE_RETURN_IF_ERROR(Rename(tmp, final_dir));
    if (config_.checkpoint.keep > 0) {
      std::map<int, std::string> all = ListCheckpoints(config_.output_dir);
      while (static_cast<int>(all.size()) > config_.checkpoint.keep) {
        SPARGE_RETURN_IF_ERROR(RemoveTree(all.begin()->second));
        all.erase(all.begin());
      }
    }
  }
  if (comm_ != nullptr) SPARGE_RETURN_IF_ERROR(comm_->Barrier());
  return final_dir;
}

absl::Status Distiller::LoadCheckpoint(const std::string& dir) {
  return Guard("loading a checkpoint", [&]() -> absl::Status {
    torch::NoGradGuard no_grad;
    SPARGE_ASSIGN_OR_RETURN(auto weights, engine::Checkpoint::Open(
                                              dir + "/transformer/diffusion_pytorch_model.safetensors"));
    std::unique_ptr<engine::Checkpoint> masters;
    if (dtype_ != at::kFloat) {
      SPARGE_ASSIGN_OR_RETURN(masters,
                              engine::Checkpoint::Open(dir + "/trainer_state/master.safetensors"));
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string& name = params_[i].first;
      const engine::Checkpoint& source = masters != nullptr ? *masters : *weights;
      SPARGE_ASSIGN_OR_RETURN(at::Tensor value, source.Get(name));
      if (value.sizes() != masters_[i].sizes()) {
        return absl::InvalidArgumentError(absl::StrCat(
            dir, ": ", name, " has shape [", absl::StrJoin(value.sizes(), ", "),
            "], the model's is [", absl::StrJoin(masters_[i].sizes(), ", "), "]"));
      }
      masters_[i].copy_(value);
      if (!masters_[i].is_same(params_[i].second)) params_[i].second.copy_(masters_[i]);
    }
    torch::load(*optimizer_, dir + "/trainer_state/optimizer.pt");
    return absl::OkStatus();
  });
}

absl::StatusOr<int> Distiller::Resume() {
  if (!config_.checkpoint.resume) return step_;
  std::map<int, std::string> all = ListCheckpoints(config_.output_dir);
  if (all.empty()) return step_;
  const auto& [step, dir] = *all.rbegin();
  std::ifstream identity(dir + "/trainer_state/identity.txt");
  std::string line;
  std::getline(identity, line);
  if (line != TrainingIdentity(config_)) {
    LogWarning(absl::StrCat("resuming from ", dir, ", written by a different setup:\n  was: ", line,
                            "\n  now: ", TrainingIdentity(config_)));
  }
  SPARGE_RETURN_IF_ERROR(LoadCheckpoint(dir));
  step_ = step;
  LogInfo(absl::StrCat("resumed from ", dir, " at step ", step_));
  return step_;
}

namespace {

// One redrawn progress line on a terminal; nothing otherwise (the log lines carry progress).
class ProgressLine {
 public:
  ProgressLine() : tty_(::isatty(STDERR_FILENO) == 1) {}
  ~ProgressLine() {
    if (drawn_) std::fputc('\n', stderr);
  }
  void Show(const StepStats& s, int max_steps, double seconds_per_step) {
    if (!tty_) return;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(kWidth * static_cast<double>(s.step) / max_steps);
    const double eta = seconds_per_step * (max_steps - s.step);
    std::fprintf(stderr, "\r[%s%s] %d/%d loss %.4g sparsity %.1f%% %.2f s/step ETA %02d:%02d:%02d ",
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
                 s.step, max_steps, s.loss, 100.0 * s.sparsity, seconds_per_step,
                 static_cast<int>(eta / 3600), static_cast<int>(eta / 60) % 60,
                 static_cast<int>(eta) % 60);
    drawn_ = true;
  }
  void Clear() {
    if (drawn_) std::fputc('\n', stderr);
    drawn_ = false;
  }

 private:
  bool tty_;
  bool drawn_ = false;
};

}  // namespace

absl::Status Distiller::Run(const std::atomic<bool>* stop) {
  const int rank = comm_ != nullptr ? comm_->rank() : 0;
  const int world = comm_ != nullptr ? comm_->world_size() : 1;
  const int max_steps = config_.training.max_steps;
  int64_t num_params = 0;
  for (const auto& [name, p] : params_) num_params += p.numel();
  if (rank == 0) {
    LogInfo(absl::StrFormat(
        "training %s (%.1fM parameters) on %s x%d, %s, %s loss, student %s topk %g topp %g "
        "(blocks %dx%d), batch %d x %d accumulation x %d ranks, lr %g, steps %d..%d",
        config_.model, num_params / 1e6, device_.str(), world, config_.dtype,
        ToString(config_.training.loss), engine::ToString(config_.sparsity.mode),
        config_.sparsity.topk, config_.sparsity.topp, config_.sparsity.block_q,
        config_.sparsity.block_k, config_.training.batch_size,
        config_.training.grad_accumulation, world, config_.optimizer.lr, step_, max_steps));
  }
  std::ofstream log;
  if (rank == 0) {
    log.open(config_.output_dir + "/train_log.jsonl", std::ios::app);
    if (!log) return absl::InternalError("cannot append to " + config_.output_dir + "/train_log.jsonl");
  }
  auto evaluate = [&]() -> absl::Status {
    if (config_.eval_every_steps <= 0) return absl::OkStatus();
    SPARGE_ASSIGN_OR_RETURN(double eval, EvalLoss(config_.eval_samples));
    if (rank == 0) {
      LogInfo(absl::StrFormat("step %d/%d eval_loss %.5g (%d held-out samples)", step_, max_steps,
                              eval, config_.eval_samples));
      log << absl::StrFormat("{\"step\": %d, \"eval_loss\": %.9g, \"unix_time\": %d}\n", step_,
                             eval, static_cast<int64_t>(std::time(nullptr)))
          << std::flush;
    }
    return absl::OkStatus();
  };
  if (step_ < max_steps) SPARGE_RETURN_IF_ERROR(evaluate());
  ProgressLine progress;
  double window_seconds = 0.0, window_loss = 0.0, window_sparsity = 0.0, ema = 0.0;
  int window = 0, last_saved = step_;
  while (step_ < max_steps) {
    bool stopping = stop != nullptr && stop->load();
    if (world > 1) {
      // Every rank must stop at the same step: a signal reaches the ranks at different times, and
      // a rank that saved while another entered the next step's collectives would hang both.
      SPARGE_ASSIGN_OR_RETURN(double stops, comm_->AllReduceSum(stopping ? 1.0 : 0.0));
      stopping = stops > 0.0;
    }
    if (stopping) {
      progress.Clear();
      LogWarning(absl::StrCat("stop requested at step ", step_, ": saving a checkpoint"));
      SPARGE_RETURN_IF_ERROR(SaveCheckpoint().status());
      return absl::CancelledError(absl::StrCat("stopped at step ", step_, " of ", max_steps));
    }
    SPARGE_ASSIGN_OR_RETURN(StepStats s, TrainStep());
    ema = ema == 0.0 ? s.seconds : 0.9 * ema + 0.1 * s.seconds;
    window_seconds += s.seconds;
    window_loss += s.loss;
    window_sparsity += s.sparsity;
    ++window;
    if (rank == 0) progress.Show(s, max_steps, ema);
    if (s.step % config_.log_every_steps == 0 || s.step == max_steps) {
      if (rank == 0) {
        progress.Clear();
        const double per_step = window_seconds / window;
        LogInfo(absl::StrFormat(
            "step %d/%d loss %.5g (last %d) grad_norm %.3g lr %.3g sparsity %.2f%% %.3f s/step "
            "%.2f samples/s peak %.2f GB",
            s.step, max_steps, window_loss / window, window, s.grad_norm, s.lr,
            100.0 * window_sparsity / window, per_step, s.samples / per_step,
            s.peak_memory_bytes / 1e9));
        log << absl::StrFormat(
                   "{\"step\": %d, \"loss\": %.9g, \"grad_norm\": %.6g, \"lr\": %.6g, "
                   "\"sparsity\": %.6f, \"mean_sigma\": %.6f, \"seconds_per_step\": %.6f, "
                   "\"samples_per_second\": %.6f, \"peak_memory_bytes\": %d, \"unix_time\": %d}\n",
                   s.step, window_loss / window, s.grad_norm, s.lr, window_sparsity / window,
                   s.mean_sigma, per_step, s.samples / per_step, s.peak_memory_bytes,
                   static_cast<int64_t>(std::time(nullptr)))
            << std::flush;
      }
      window_seconds = window_loss = window_sparsity = 0.0;
      window = 0;
    }
    if (config_.eval_every_steps > 0 &&
        (s.step % config_.eval_every_steps == 0 || s.step == max_steps)) {
      if (rank == 0) progress.Clear();
      SPARGE_RETURN_IF_ERROR(evaluate());
    }
    const int every = config_.checkpoint.every_steps;
    if ((every > 0 && s.step % every == 0) || s.step == max_steps) {
      if (rank == 0) progress.Clear();
      SPARGE_ASSIGN_OR_RETURN(std::string dir, SaveCheckpoint());
      last_saved = s.step;
      if (rank == 0) LogInfo(absl::StrCat("saved ", dir));
    }
  }
  if (last_saved != step_) SPARGE_RETURN_IF_ERROR(SaveCheckpoint().status());
  return absl::OkStatus();
}

}  // namespace sparge::trainer
