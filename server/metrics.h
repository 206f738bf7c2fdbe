// Prometheus metrics of the server: every metric name is defined and documented here (sparge_
// prefix, base units, low-cardinality labels), and MetricsHttpServer serves them at /metrics.
// ServerMetrics is thread-safe (prometheus-cpp metrics are atomic); create one per server.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace httplib {
class Server;
}

namespace sparge::server {

// Metric names (dashboards and alerts in deploy/ use exactly these).
inline constexpr char kRequestsTotal[] = "sparge_requests_total";
inline constexpr char kRequestDurationSeconds[] = "sparge_request_duration_seconds";
inline constexpr char kQueueWaitSeconds[] = "sparge_queue_wait_seconds";
inline constexpr char kQueueDepth[] = "sparge_queue_depth";
inline constexpr char kRunningJobs[] = "sparge_running_jobs";
inline constexpr char kBatchSize[] = "sparge_batch_size";
inline constexpr char kDenoiseStepSeconds[] = "sparge_denoise_step_seconds";
inline constexpr char kAttentionSecondsTotal[] = "sparge_attention_seconds_total";
inline constexpr char kTextEncodeSeconds[] = "sparge_text_encode_seconds";
inline constexpr char kVaeDecodeSeconds[] = "sparge_vae_decode_seconds";
inline constexpr char kVideoEncodeSeconds[] = "sparge_video_encode_seconds";
inline constexpr char kAttentionSparsityRatio[] = "sparge_attention_sparsity_ratio";
inline constexpr char kCancellationsTotal[] = "sparge_cancellations_total";
inline constexpr char kOutputBytesTotal[] = "sparge_output_bytes_total";
inline constexpr char kModelReady[] = "sparge_model_ready";
inline constexpr char kJobStateBytes[] = "sparge_job_state_bytes";
inline constexpr char kPreemptionsTotal[] = "sparge_preemptions_total";
inline constexpr char kDeviceMemoryBytes[] = "sparge_device_memory_bytes";
inline constexpr char kSchedulerOverheadSeconds[] = "sparge_scheduler_overhead_seconds";

class ServerMetrics {
 public:
  ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  // sparge_requests_total{status}: Generate calls by final gRPC status code name ("OK",
  // "INVALID_ARGUMENT", ...), including those rejected before queueing.
  void CountRequest(absl::string_view status_code_name);
  // sparge_request_duration_seconds: Generate call, accepted -> last event (successful ones).
  void ObserveRequestDuration(double seconds) { request_duration_->Observe(seconds); }
  // sparge_queue_wait_seconds: accepted -> first engine work (text encoding).
  void ObserveQueueWait(double seconds) { queue_wait_->Observe(seconds); }
  // sparge_queue_depth: jobs accepted and waiting to start.
  void SetQueueDepth(int depth) { queue_depth_->Set(depth); }
  // sparge_running_jobs: jobs between text encoding and their last event.
  void SetRunningJobs(int jobs) { running_jobs_->Set(jobs); }
  // sparge_batch_size: jobs sharing one denoising step call.
  void ObserveBatchSize(int jobs) { batch_size_->Observe(jobs); }
  // sparge_denoise_step_seconds: wall time of one (batched) denoising step.
  void ObserveDenoiseStep(double seconds) { denoise_step_->Observe(seconds); }
  // sparge_attention_seconds_total: time spent in DiT self-attention within denoising steps (per
  // batched step, as the engine measures it: CUDA event time on GPU, wall time on CPU). Divided
  // by the rate of sparge_denoise_step_seconds_sum it gives attention's share of step time.
  void AddAttentionSeconds(double seconds) {
    if (seconds > 0) attention_seconds_->Increment(seconds);
  }
  // sparge_text_encode_seconds: prompt encoding and noise setup of one job (Pipeline::Start).
  void ObserveTextEncode(double seconds) { text_encode_->Observe(seconds); }
  // sparge_vae_decode_seconds: latents -> RGB frames of one job.
  void ObserveVaeDecode(double seconds) { vae_decode_->Observe(seconds); }
  // sparge_video_encode_seconds: RGB frames -> MP4 / PNG tar of one job.
  void ObserveVideoEncode(double seconds) { video_encode_->Observe(seconds); }
  // sparge_attention_sparsity_ratio: per job and step, the fraction of self-attention token pairs
  // skipped (0 for dense steps).
  void ObserveSparsity(double ratio) { sparsity_->Observe(ratio); }
  // sparge_cancellations_total{reason}: jobs stopped early; reason is "client" (call cancelled),
  // "deadline" or "shutdown".
  void CountCancellation(absl::string_view reason);
  // sparge_output_bytes_total: bytes of finished video files streamed to clients.
  void AddOutputBytes(int64_t bytes) { output_bytes_->Increment(static_cast<double>(bytes)); }
  // sparge_model_ready: 1 once the model is loaded and warmed up (health SERVING), else 0.
  void SetModelReady(bool ready) { model_ready_->Set(ready ? 1 : 0); }
  // sparge_job_state_bytes: memory on the model's device held by the state of started jobs
  // (latents, text embeddings, sampler history; GenerationJob::state_bytes summed). Model weights
  // and step activations are not included.
  void SetJobStateBytes(int64_t bytes) { job_state_bytes_->Set(static_cast<double>(bytes)); }
  // sparge_preemptions_total: running jobs sent back to the queue at a step boundary so that a
  // higher-priority job could run (they keep their state and resume later).
  void CountPreemption() { preemptions_->Increment(); }
  // sparge_device_memory_bytes{kind}: the model device's memory after the latest denoising step.
  // kind="allocated": in live tensors; "reserved": held by the caching allocator (allocated plus
  // cached free blocks); "total": the device's capacity. On CPU allocated and reserved are 0 and
  // total is physical RAM (engine::DeviceMemoryStats).
  void SetDeviceMemory(int64_t allocated, int64_t reserved, int64_t total) {
    memory_allocated_->Set(static_cast<double>(allocated));
    memory_reserved_->Set(static_cast<double>(reserved));
    memory_total_->Set(static_cast<double>(total));
  }
  // sparge_scheduler_overhead_seconds: per executor iteration (one scheduling decision and its
  // execution), wall time outside engine calls and video encoding: policy, queue bookkeeping,
  // events, metrics. Issue #5 asks for < 1 ms.
  void ObserveSchedulerOverhead(double seconds) { scheduler_overhead_->Observe(seconds); }

  // Prometheus text exposition format (version 0.0.4) of every metric.
  std::string SerializeText() const;
  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_family_;
  prometheus::Family<prometheus::Counter>* cancellations_family_;
  prometheus::Histogram* request_duration_;
  prometheus::Histogram* queue_wait_;
  prometheus::Gauge* queue_depth_;
  prometheus::Gauge* running_jobs_;
  prometheus::Histogram* batch_size_;
  prometheus::Histogram* denoise_step_;
  prometheus::Counter* attention_seconds_;
  prometheus::Histogram* text_encode_;
  prometheus::Histogram* vae_decode_;
  prometheus::Histogram* video_encode_;
  prometheus::Histogram* sparsity_;
  prometheus::Counter* output_bytes_;
  prometheus::Gauge* model_ready_;
  prometheus::Gauge* job_state_bytes_;
  prometheus::Counter* preemptions_;
  prometheus::Gauge* memory_allocated_;
  prometheus::Gauge* memory_reserved_;
  prometheus::Gauge* memory_total_;
  prometheus::Histogram* scheduler_overhead_;
};

// Serves GET /metrics (text format) and GET /healthz over plain HTTP on its own thread.
// cpp-httplib rather than prometheus-cpp's civetweb Exposer, which fails in processes that link
// libtorch_cuda. Thread-safe; Stop() (or the destructor) joins the thread.
class MetricsHttpServer {
 public:
  // Binds address:port (port 0 picks a free one) and starts serving.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const ServerMetrics* metrics,
                                                                  const std::string& address,
                                                                  int port);
  ~MetricsHttpServer();
  int port() const { return port_; }
  void Stop();

 private:
  MetricsHttpServer() = default;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace sparge::server
