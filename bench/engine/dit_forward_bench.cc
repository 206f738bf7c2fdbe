// Times one forward of the engine's WanDiT (engine/models/wan_dit.h) at a given latent grid on CUDA
// with random bf16 weights, for comparison with diffusers (diffusers_dit_bench.py, run_device.sh).
// Prints one JSON line on stdout. Usage:
//   dit_forward_bench [--mode dense|topk] [--topk 0.05] [--frames 21 --height 60 --width 104]
//                     [--text_len 512] [--warmup 2] [--iters 5] [--ops_lib libsparge_ops.so]
//                     [--fused both|on|off] [--profile trace_prefix]
// --fused both times the fused block ops (engine/models/dit_fused.h; they need --ops_lib) and the
// unfused ATen path in one process and reports their output difference; --profile writes a
// Kineto (chrome) trace of one forward per variant to <prefix>_<variant>.json.
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <set>
#include <vector>

#include "engine/attention/sparse_attention.h"
#include "engine/models/dit_fused.h"
#include "engine/models/model_config.h"
#include "engine/models/wan_dit.h"

namespace sparge::engine {
namespace {

struct Args {
  std::string mode = "dense";
  float topk = 0.05f;
  int64_t frames = 21, height = 60, width = 104, text_len = 512;
  int warmup = 2, iters = 5;
  std::string ops_lib;
  std::string fused = "both";
  std::string profile;
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--mode") a.mode = v;
    else if (k == "--topk") a.topk = std::stof(v);
    else if (k == "--frames") a.frames = std::stoll(v);
    else if (k == "--height") a.height = std::stoll(v);
    else if (k == "--width") a.width = std::stoll(v);
    else if (k == "--text_len") a.text_len = std::stoll(v);
    else if (k == "--warmup") a.warmup = std::stoi(v);
    else if (k == "--iters") a.iters = std::stoi(v);
    else if (k == "--ops_lib") a.ops_lib = v;
    else if (k == "--fused") a.fused = v;
    else if (k == "--profile") a.profile = v;
    else { std::fprintf(stderr, "unknown flag %s\n", k.c_str()); std::exit(2); }
  }
  return a;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Random weights drawn on the GPU: the engine's InitializeWeights draws on the CPU (deterministic
// across devices), which for 1.3B parameters costs more than the whole benchmark. Values only need
// to keep activations finite: N(0, 1/fan_in) for matrices/convs, small biases, tables N(0, 1/D).
void RandomizeOnDevice(WanDiTImpl& dit) {
  at::NoGradGuard no_grad;
  for (const auto& item : dit.named_parameters()) {
    at::Tensor p = item.value();
    const std::string& name = item.key();
    if (name.find("norm") != std::string::npos && p.dim() == 1) {
      p.fill_(1.0);
    } else if (p.dim() >= 2 && name.find("scale_shift_table") == std::string::npos) {
      p.normal_(0.0, 1.0 / std::sqrt(static_cast<double>(p[0].numel())));
    } else if (name.find("scale_shift_table") != std::string::npos) {
      p.normal_(0.0, 1.0 / std::sqrt(static_cast<double>(dit.config().dim)));
    } else {
      p.normal_(0.0, 0.02);
    }
  }
}

int Main(int argc, char** argv) {
  const Args args = Parse(argc, argv);
  if (!args.ops_lib.empty() && dlopen(args.ops_lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "dlopen %s: %s\n", args.ops_lib.c_str(), dlerror());
    return 1;
  }
  const torch::Device device(torch::kCUDA, 0);
  const WanDiTConfig config = Wan13BConfig().dit;
  auto t0 = std::chrono::steady_clock::now();
  WanDiT dit(config, /*block_q=*/128, /*block_k=*/64);
  const double construct_s = Seconds(t0);
  t0 = std::chrono::steady_clock::now();
  dit->ToInference(device, torch::kBFloat16);
  RandomizeOnDevice(*dit);
  torch::cuda::synchronize();
  const double to_device_s = Seconds(t0);

  at::manual_seed(0);
  const auto f32 = at::TensorOptions().device(device).dtype(at::kFloat);
  at::Tensor latents =
      at::randn({1, config.in_channels, args.frames, args.height, args.width}, f32)
          .to(at::kBFloat16);
  at::Tensor timesteps = at::full({1}, 500.0f, f32);
  at::Tensor context = at::randn({1, args.text_len, config.text_dim}, f32).to(at::kBFloat16);
  AttentionKnobs knobs;
  if (args.mode == "topk") {
    knobs.mode = AttentionMode::kTopK;
    knobs.topk = args.topk;
  }
  std::vector<AttentionKnobs> knob_list = {knobs};

  at::NoGradGuard no_grad;
  std::vector<std::string> variants;
  if (args.fused == "both" || args.fused == "on") variants.push_back("fused");
  if (args.fused == "both" || args.fused == "off") variants.push_back("unfused");
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  const c10::Stream stream = impl->getStream(device);
  std::string results;
  at::Tensor first_velocity;
  for (const std::string& variant : variants) {
    EnableFusedDiTOps(variant == "fused");
    const bool fused_active = variant == "fused" && UseFusedDiTOps(latents);
    at::accelerator::resetPeakStats(0);
    const int64_t base_alloc = at::accelerator::getDeviceStats(0).allocated_bytes[0].current;
    DiTOutput out;
    for (int i = 0; i < args.warmup; ++i) out = dit->Forward(latents, timesteps, context, knob_list);
    torch::cuda::synchronize();
    std::vector<double> ms;
    for (int i = 0; i < args.iters; ++i) {
      c10::Event start(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
      c10::Event stop(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
      start.record(stream);
      out = dit->Forward(latents, timesteps, context, knob_list);
      stop.record(stream);
      stop.synchronize();
      ms.push_back(start.elapsedTime(stop));
    }
    const int64_t peak = at::accelerator::getDeviceStats(0).allocated_bytes[0].peak;
    if (!args.profile.empty()) {
      namespace prof = torch::profiler::impl;
      const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
      const std::set<prof::ActivityType> activities = {prof::ActivityType::CPU,
                                                       prof::ActivityType::CUDA};
      torch::autograd::profiler::prepareProfiler(config, activities);
      torch::autograd::profiler::enableProfiler(config, activities);
      dit->Forward(latents, timesteps, context, knob_list);
      torch::cuda::synchronize();
      torch::autograd::profiler::disableProfiler()->save(args.profile + "_" + variant + ".json");
    }
    double rel_diff = 0;
    if (!first_velocity.defined()) {
      first_velocity = out.velocity.clone();
    } else {
      rel_diff = ((out.velocity - first_velocity).abs().max() /
                  first_velocity.abs().max().clamp_min(1e-12)).item<double>();
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[sorted.size() / 2];
    const bool finite = out.velocity.isfinite().all().item<bool>();
    std::string list;
    for (size_t i = 0; i < ms.size(); ++i) list += (i ? "," : "") + std::to_string(ms[i]);
    char line[2048];
    std::snprintf(
        line, sizeof(line),
        "{\"impl\": \"spargeserve\", \"variant\": \"%s\", \"fused_ops_active\": %s, "
        "\"mode\": \"%s\", \"topk\": %.4f, \"attention_backend\": \"%s\", \"tokens\": %lld, "
        "\"params\": %lld, \"median_ms\": %.3f, \"step_ms\": [%s], \"peak_alloc_bytes\": %lld, "
        "\"resident_before_forward_bytes\": %lld, \"achieved_sparsity\": %.4f, "
        "\"output_finite\": %s, \"max_rel_diff_vs_first_variant\": %.3e, \"construct_s\": %.2f, "
        "\"to_device_and_init_s\": %.2f}",
        variant.c_str(), fused_active ? "true" : "false", args.mode.c_str(),
        args.mode == "dense" ? 0.0f : args.topk,
        SparseAttentionBackendName(c10::DeviceType::CUDA).c_str(),
        static_cast<long long>(args.frames * (args.height / 2) * (args.width / 2)),
        static_cast<long long>(dit->num_parameters()), median, list.c_str(),
        static_cast<long long>(peak), static_cast<long long>(base_alloc),
        out.sparsity.empty() ? 0.0f : out.sparsity[0], finite ? "true" : "false", rel_diff,
        construct_s, to_device_s);
    std::fprintf(stderr, "%s\n", line);
    results += (results.empty() ? "" : ", ") + std::string("\"") + variant + "\": " + line;
  }
  std::printf("{%s}\n", results.c_str());
  return 0;
}

}  // namespace
}  // namespace sparge::engine

int main(int argc, char** argv) {
  try {
    return sparge::engine::Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dit_forward_bench failed: %s\n", e.what());
    return 1;
  }
}
