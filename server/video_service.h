// The gRPC front end: VideoServiceImpl (callback API; Generate streams a job's events through a
// write reactor; the job RPCs, in job_rpcs.cc, go through the JobStore) and SpargeServer, which
// wires config, job store, executor, metrics, health and reflection.
// Usage: auto s = SpargeServer::Create(config, deps); int port = *s->Start(); ...; s->Shutdown().
// Thread-safe; Shutdown() blocks until in-flight calls end (after the configured grace period).
#pragma once

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/server.h"
#include "server/clock.h"
#include "server/config.h"
#include "server/executor.h"
#include "server/job_store.h"
#include "server/metrics.h"
#include "server/request_validation.h"
#include "sparge/v1/video_service.grpc.pb.h"

namespace sparge::server {

// The version reported by GetServerInfo (the CMake project version).
const char* ServerVersion();

class VideoServiceImpl final : public sparge::v1::VideoService::CallbackService {
 public:
  // Every pointer must outlive the service.
  VideoServiceImpl(const ServerConfig* config, Executor* executor, JobStore* jobs,
                   ServerMetrics* metrics, const Clock* clock, SeedSource seed_source);

  grpc::ServerWriteReactor<sparge::v1::GenerateEvent>* Generate(
      grpc::CallbackServerContext* context, const sparge::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const sparge::v1::GetServerInfoRequest* request,
                                          sparge::v1::ServerInfo* response) override;

  // Job API (job_rpcs.cc).
  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const sparge::v1::SubmitJobRequest* request,
                                      sparge::v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const sparge::v1::GetJobRequest* request,
                                   sparge::v1::Job* response) override;
  grpc::ServerWriteReactor<sparge::v1::GenerateEvent>* WatchJob(
      grpc::CallbackServerContext* context, const sparge::v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const sparge::v1::CancelJobRequest* request,
                                      sparge::v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const sparge::v1::ListJobsRequest* request,
                                     sparge::v1::ListJobsResponse* response) override;
  grpc::ServerWriteReactor<sparge::v1::JobResultChunk>* GetJobResult(
      grpc::CallbackServerContext* context,
      const sparge::v1::GetJobResultRequest* request) override;

  const ServerConfig& config() const { return *config_; }
  Executor& executor() { return *executor_; }
  JobStore& jobs() { return *jobs_; }
  ServerMetrics& metrics() { return *metrics_; }
  const Clock& clock() const { return *clock_; }
  const SeedSource& seed_source() const { return seed_source_; }

 private:
  const ServerConfig* config_;
  Executor* executor_;
  JobStore* jobs_;
  ServerMetrics* metrics_;
  const Clock* clock_;
  SeedSource seed_source_;
  // Serializes SubmitJob calls that carry an idempotency key, so that two concurrent calls with
  // the same key start one job.
  absl::Mutex keyed_submit_mu_;
};

// What the server runs on: the engine in production (engine_binding.h), fakes in tests.
struct ServerDeps {
  PipelineFactory create_pipeline;
  VideoEncodeFn encode_video;
  const Clock* clock = Clock::Real();
  SeedSource seed_source = RandomSeedSource();
};

class SpargeServer {
 public:
  // Validates the config; starts nothing.
  static absl::StatusOr<std::unique_ptr<SpargeServer>> Create(ServerConfig config,
                                                              ServerDeps deps);
  ~SpargeServer();  // Shutdown()

  // Opens the job store (config.jobs.output_dir), listens (gRPC on config.port, 0 = any free
  // port; metrics on config.metrics_port, 0 = off, -1 = any free port) and starts loading the
  // model in the background. Health reports
  // NOT_SERVING until the model is loaded and warmed, then SERVING. Returns the gRPC port.
  absl::StatusOr<int> Start();
  // Blocks until the model is ready (OK), failed to load (its status), or timeout.
  absl::Status WaitUntilReady(absl::Duration timeout);

  int port() const { return port_; }
  int metrics_port() const;  // 0 when off
  ServerMetrics& metrics() { return metrics_; }
  const ServerConfig& config() const { return config_; }
  // Null before Start().
  JobStore* jobs() { return jobs_.get(); }

  // Health NOT_SERVING, new calls refused, in-flight calls get config.shutdown_grace_seconds to
  // finish and are then cancelled; the model is released. Idempotent.
  void Shutdown();

 private:
  SpargeServer(ServerConfig config, ServerDeps deps);
  void OnModelReady(const absl::Status& status);

  const ServerConfig config_;
  ServerDeps deps_;
  ServerMetrics metrics_;
  // Declared before the executor: destroyed after it, since its jobs report to the store.
  std::unique_ptr<JobStore> jobs_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<VideoServiceImpl> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int port_ = 0;

  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  absl::Mutex shutdown_mu_;  // serializes Shutdown() callers
};

}  // namespace sparge::server
