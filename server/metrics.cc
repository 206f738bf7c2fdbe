#include "server/metrics.h"

#include <sys/socket.h>

#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "httplib.h"
#include "prometheus/text_serializer.h"

namespace sparge::server {
namespace {

using Buckets = prometheus::Histogram::BucketBoundaries;

// Powers of `factor` from `start`: latencies span milliseconds (a tiny-model step) to minutes
// (a long 14B request), so buckets grow geometrically.
Buckets Exponential(double start, double factor, int count) {
  Buckets b;
  for (int i = 0; i < count; ++i, start *= factor) b.push_back(start);
  return b;
}

prometheus::Histogram* AddHistogram(prometheus::Registry& registry, const char* name,
                                    const char* help, Buckets buckets) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(registry).Add(
      {}, std::move(buckets));
}

prometheus::Gauge* AddGauge(prometheus::Registry& registry, const char* name, const char* help) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(registry).Add({});
}

}  // namespace

ServerMetrics::ServerMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::Registry& r = *registry_;
  requests_family_ = &prometheus::BuildCounter()
                          .Name(kRequestsTotal)
                          .Help("Generate calls by final gRPC status code")
                          .Register(r);
  // Pre-create the common outcomes so dashboards see zeros instead of missing series.
  for (const char* code : {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED",
                           "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL"}) {
    requests_family_->Add({{"status", code}});
  }
  cancellations_family_ = &prometheus::BuildCounter()
                               .Name(kCancellationsTotal)
                               .Help("Jobs stopped before completion, by reason")
                               .Register(r);
  for (const char* reason : {"client", "deadline", "shutdown"}) {
    cancellations_family_->Add({{"reason", reason}});
  }
  request_duration_ =
      AddHistogram(r, kRequestDurationSeconds,
                   "Successful Generate calls, accepted to completed, seconds",
                   Exponential(0.05, 2.0, 16));  // 50 ms .. ~27 min
  queue_wait_ = AddHistogram(r, kQueueWaitSeconds, "Time jobs waited in the queue, seconds",
                             Exponential(0.001, 2.0, 22));  // 1 ms .. ~35 min
  queue_depth_ = AddGauge(r, kQueueDepth, "Jobs accepted and waiting to start");
  running_jobs_ = AddGauge(r, kRunningJobs, "Jobs started and not yet finished");
  batch_size_ = AddHistogram(r, kBatchSize, "Jobs per denoising step call",
                             {1, 2, 3, 4, 6, 8, 12, 16, 24, 32});
  denoise_step_ = AddHistogram(r, kDenoiseStepSeconds,
                               "Wall time of one batched denoising step, seconds",
                               Exponential(0.001, 2.0, 18));  // 1 ms .. ~2 min
  text_encode_ = AddHistogram(r, kTextEncodeSeconds, "Prompt encoding per job, seconds",
                              Exponential(0.001, 2.0, 16));
  vae_decode_ = AddHistogram(r, kVaeDecodeSeconds, "VAE decoding per job, seconds",
                             Exponential(0.001, 2.0, 18));
  video_encode_ = AddHistogram(r, kVideoEncodeSeconds, "MP4/PNG encoding per job, seconds",
                               Exponential(0.001, 2.0, 16));
  Buckets ratio;
  for (int i = 1; i <= 20; ++i) ratio.push_back(i / 20.0);  // exact decimals in labels
  sparsity_ = AddHistogram(r, kAttentionSparsityRatio,
                           "Fraction of self-attention token pairs skipped, per job and step",
                           std::move(ratio));
  attention_seconds_ = &prometheus::BuildCounter()
                            .Name(kAttentionSecondsTotal)
                            .Help("Time in DiT self-attention within denoising steps, seconds")
                            .Register(r)
                            .Add({});
  output_bytes_ = &prometheus::BuildCounter()
                       .Name(kOutputBytesTotal)
                       .Help("Bytes of finished video files streamed to clients")
                       .Register(r)
                       .Add({});
  model_ready_ = AddGauge(r, kModelReady, "1 once the model is loaded and warmed up");
  job_state_bytes_ = AddGauge(r, kJobStateBytes,
                              "Device memory held by the state of started jobs, bytes");
  preemptions_ = &prometheus::BuildCounter()
                      .Name(kPreemptionsTotal)
                      .Help("Running jobs preempted at a step boundary for higher priority")
                      .Register(r)
                      .Add({});
  auto& memory = prometheus::BuildGauge()
                     .Name(kDeviceMemoryBytes)
                     .Help("Model device memory after the latest step by kind (allocated, "
                           "reserved, total), bytes")
                     .Register(r);
  memory_allocated_ = &memory.Add({{"kind", "allocated"}});
  memory_reserved_ = &memory.Add({{"kind", "reserved"}});
  memory_total_ = &memory.Add({{"kind", "total"}});
  scheduler_overhead_ = AddHistogram(
      r, kSchedulerOverheadSeconds,
      "Executor time per scheduling iteration outside engine calls, seconds",
      Exponential(1e-6, 2.0, 20));  // 1 us .. ~0.5 s
}

void ServerMetrics::CountRequest(absl::string_view status_code_name) {
  requests_family_->Add({{"status", std::string(status_code_name)}}).Increment();
}

void ServerMetrics::CountCancellation(absl::string_view reason) {
  cancellations_family_->Add({{"reason", std::string(reason)}}).Increment();
}

std::string ServerMetrics::SerializeText() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const ServerMetrics* metrics, const std::string& address, int port) {
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->http_ = std::make_unique<httplib::Server>();
  // httplib's default adds SO_REUSEPORT, which would let a second server share the port
  // silently; keep only SO_REUSEADDR so a taken port is an error.
  server->http_->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  server->http_->Get("/metrics", [metrics](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics->SerializeText(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server->http_->Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  if (port == 0) {
    server->port_ = server->http_->bind_to_any_port(address);
    if (server->port_ < 0) server->port_ = 0;
  } else if (server->http_->bind_to_port(address, port)) {
    server->port_ = port;
  }
  if (server->port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", address, ":", port, " (port in use?)"));
  }
  httplib::Server* http = server->http_.get();
  server->thread_ = std::thread([http] { http->listen_after_bind(); });
  // httplib's stop() is a no-op until the listen loop has marked itself running, so a Stop()
  // right after Start() would leave the thread listening forever: wait for it first.
  for (int i = 0; i < 5000 && !http->is_running(); ++i) absl::SleepFor(absl::Milliseconds(1));
  if (!http->is_running()) {
    return absl::InternalError("metrics: the HTTP server thread did not start");
  }
  return server;
}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

void MetricsHttpServer::Stop() {
  if (http_) http_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace sparge::server
