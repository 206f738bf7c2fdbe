#include "server/video_service.h"

#include <chrono>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "server/grpc_status.h"
#include "server/log.h"

#ifndef SPARGE_VERSION
#define SPARGE_VERSION "dev"
#endif

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;

constexpr char kServiceName[] = "sparge.v1.VideoService";

// Streams one job's events to the client. Lives until gRPC calls OnDone. Lock order: the
// channel's listener lock, then mu_, then the channel's data lock (inside TryPop).
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateEvent> {
 public:
  GenerateReactor(VideoServiceImpl* service, grpc::CallbackServerContext* context,
                  const v1::GenerateRequest& request)
      : service_(service), context_(context) {
    absl::StatusOr<ResolvedRequest> resolved =
        ResolveRequest(request, service->config().limits, service->config().defaults,
                       service->seed_source());
    if (!resolved.ok()) {
      absl::MutexLock lock(&mu_);
      FinishLocked(resolved.status());
      return;
    }
    absl::StatusOr<std::shared_ptr<JobHandle>> handle =
        service->executor().Submit(*std::move(resolved), DeadlineOnServiceClock());
    if (!handle.ok()) {
      absl::MutexLock lock(&mu_);
      FinishLocked(handle.status());
      return;
    }
    handle_ = *std::move(handle);
    // Before the first read: the store must see every event, chunks included.
    service->jobs().Track(handle_, v1::JOB_ORIGIN_GENERATE, "");
    handle_->events().SetListener([this] {
      absl::MutexLock lock(&mu_);
      WriteNextLocked();
    });
    absl::MutexLock lock(&mu_);
    WriteNextLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      // The stream is broken (client gone or its deadline passed): stop the job, end the call.
      const bool deadline = DeadlineReached();
      if (handle_) handle_->Cancel(deadline ? CancelReason::kDeadline : CancelReason::kClient);
      FinishLocked(deadline ? absl::DeadlineExceededError("the call's deadline passed")
                            : absl::CancelledError("the client stopped reading the stream"));
      return;
    }
    WriteNextLocked();
  }

  void OnCancel() override {
    // The executor notices at the next step boundary and closes the channel, which finishes us.
    if (handle_) {
      handle_->Cancel(DeadlineReached() ? CancelReason::kDeadline : CancelReason::kClient);
    }
  }

  void OnDone() override {
    if (handle_) {
      // Waits out a listener call in progress; chunks are no longer kept for this call.
      handle_->events().DetachPrimary();
      handle_->Cancel(CancelReason::kClient);  // no-op unless the job is still alive
    }
    delete this;
  }

 private:
  // gRPC sends the deadline as a timeout, so the server's copy ends a little after the client's,
  // whose expiry reaches us as a cancellation: one within kDeadlineSlack of our copy is the
  // deadline, not the client.
  bool DeadlineReached() const {
    constexpr auto kDeadlineSlack = std::chrono::milliseconds(250);
    return context_->deadline() - kDeadlineSlack <= std::chrono::system_clock::now();
  }

  // The call's deadline mapped onto the service clock (tests may inject a fake one).
  absl::Time DeadlineOnServiceClock() const {
    const auto deadline = context_->deadline();
    if (deadline >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
      return absl::InfiniteFuture();
    }
    return service_->clock().Now() + absl::FromChrono(deadline - std::chrono::system_clock::now());
  }

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return;
    JobEventChannel::Item item = handle_->events().TryPop();
    if (item.event.has_value()) {
      current_ = *std::move(item.event);
      writing_ = true;
      StartWrite(&current_);
    } else if (item.final_status.has_value()) {
      FinishLocked(*item.final_status);
    }
  }

  void FinishLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    service_->metrics().CountRequest(StatusCodeName(status.code()));
    Finish(ToGrpcStatus(status));
  }

  VideoServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  std::shared_ptr<JobHandle> handle_;  // set once in the constructor
  absl::Mutex mu_;
  v1::GenerateEvent current_ ABSL_GUARDED_BY(mu_);  // the event being written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

void FillLimits(const RequestLimits& l, v1::RequestLimits* out) {
  out->set_min_width(l.min_width);
  out->set_max_width(l.max_width);
  out->set_min_height(l.min_height);
  out->set_max_height(l.max_height);
  out->set_size_multiple(l.size_multiple);
  out->set_min_frames(l.min_frames);
  out->set_max_frames(l.max_frames);
  out->set_max_steps(l.max_steps);
  out->set_max_prompt_bytes(l.max_prompt_bytes);
  out->set_max_guidance_scale(l.max_guidance_scale);
  out->set_max_shift(l.max_shift);
}

}  // namespace

const char* ServerVersion() { return SPARGE_VERSION; }

VideoServiceImpl::VideoServiceImpl(const ServerConfig* config, Executor* executor,
                                   JobStore* jobs, ServerMetrics* metrics, const Clock* clock,
                                   SeedSource seed_source)
    : config_(config),
      executor_(executor),
      jobs_(jobs),
      metrics_(metrics),
      clock_(clock),
      seed_source_(std::move(seed_source)) {}

grpc::ServerWriteReactor<v1::GenerateEvent>* VideoServiceImpl::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return new GenerateReactor(this, context, *request);
}

grpc::ServerUnaryReactor* VideoServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* /*request*/,
    v1::ServerInfo* response) {
  response->set_version(ServerVersion());
  response->set_ready(executor_->ready());
  std::optional<LoadedModelInfo> info = executor_->model_info();
  if (info.has_value()) {
    const engine::ModelDescription& m = info->description;
    response->set_device(info->device_name);
    v1::ModelInfo* model = response->mutable_model();
    model->set_name(m.name);
    model->set_architecture(m.architecture);
    model->set_num_parameters(m.num_parameters);
    model->set_dit_dim(m.dim);
    model->set_dit_layers(m.layers);
    model->set_dit_heads(m.heads);
    model->set_head_dim(m.head_dim);
    model->set_dtype(m.dtype);
    model->set_block_q(m.block_q);
    model->set_block_k(m.block_k);
  } else {
    response->set_device(config_->model.device);
    response->mutable_model()->set_name(config_->model.model);
  }
  FillLimits(config_->limits, response->mutable_limits());
  *response->mutable_defaults() = DefaultsAsProto(config_->defaults);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

absl::StatusOr<std::unique_ptr<SpargeServer>> SpargeServer::Create(ServerConfig config,
                                                                   ServerDeps deps) {
  absl::Status valid = config.Validate();
  // -1 (any free metrics port) is for tests and is not a YAML value, so Validate() rejects it.
  if (!valid.ok() && !(config.metrics_port == -1 &&
                       absl::StartsWith(valid.message(), "metrics_port:"))) {
    return valid;
  }
  if (!deps.create_pipeline || !deps.encode_video || deps.clock == nullptr ||
      !deps.seed_source) {
    return absl::InvalidArgumentError(
        "SpargeServer: create_pipeline, encode_video, clock and seed_source are required");
  }
  return std::unique_ptr<SpargeServer>(new SpargeServer(std::move(config), std::move(deps)));
}

SpargeServer::SpargeServer(ServerConfig config, ServerDeps deps)
    : config_(std::move(config)), deps_(std::move(deps)) {}

SpargeServer::~SpargeServer() { Shutdown(); }

int SpargeServer::metrics_port() const { return metrics_http_ ? metrics_http_->port() : 0; }

absl::StatusOr<int> SpargeServer::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_) return absl::FailedPreconditionError("SpargeServer::Start called twice");
    started_ = true;
  }
  if (config_.metrics_port != 0) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http = MetricsHttpServer::Start(
        &metrics_, config_.metrics_address, config_.metrics_port < 0 ? 0 : config_.metrics_port);
    if (!http.ok()) return http.status();
    metrics_http_ = *std::move(http);
  }

  JobStoreOptions store_options = JobStoreOptionsFrom(config_.jobs, deps_.clock);
  // Jobs of Generate calls are counted when their call ends (GenerateReactor); server-owned jobs
  // when they end.
  store_options.on_finished = [this](const v1::Job& job) {
    if (job.origin() != v1::JOB_ORIGIN_SUBMIT_JOB) return;
    metrics_.CountRequest(job.state() == v1::JOB_STATE_SUCCEEDED
                              ? std::string("OK")
                              : StatusCodeName(static_cast<absl::StatusCode>(job.error().code())));
  };
  absl::StatusOr<std::unique_ptr<JobStore>> jobs = JobStore::Open(std::move(store_options));
  if (!jobs.ok()) return jobs.status();
  jobs_ = *std::move(jobs);

  ExecutorOptions options;
  options.create_pipeline = deps_.create_pipeline;
  options.encode_video = deps_.encode_video;
  options.clock = deps_.clock;
  options.metrics = &metrics_;
  options.scheduler = config_.scheduler;
  options.output_chunk_bytes = config_.output_chunk_bytes;
  options.warmup = config_.warmup;
  options.on_ready = [this](const absl::Status& status) { OnModelReady(status); };

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // IPv6 literals need brackets before the port.
  const std::string host = config_.listen_address.find(':') != std::string::npos
                               ? absl::StrCat("[", config_.listen_address, "]")
                               : config_.listen_address;
  const std::string address = absl::StrCat(host, ":", config_.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port_);

  absl::StatusOr<std::unique_ptr<Executor>> executor = Executor::Create(std::move(options));
  if (!executor.ok()) return executor.status();
  executor_ = *std::move(executor);
  service_ = std::make_unique<VideoServiceImpl>(&config_, executor_.get(), jobs_.get(),
                                                &metrics_, deps_.clock, deps_.seed_source);
  builder.RegisterService(service_.get());
  {
    // Held across BuildAndStart so that OnModelReady (executor thread) sees grpc_server_ set.
    absl::MutexLock lock(&mu_);
    grpc_server_ = builder.BuildAndStart();
    if (grpc_server_ == nullptr || port_ == 0) {
      grpc_server_.reset();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", address, " (port in use?)"));
    }
    // The default health service starts out SERVING; nobody has had time to ask yet. The model
    // may have become ready before grpc_server_ existed (OnModelReady then did nothing).
    if (grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService()) {
      const bool ready = executor_->ready();
      health->SetServingStatus(ready);
      health->SetServingStatus(kServiceName, ready);
    }
  }
  LogInfo(absl::StrCat("gRPC listening on ", address, " (port ", port_, "), metrics ",
                       metrics_http_ ? absl::StrCat("on :", metrics_http_->port(), "/metrics")
                                     : std::string("off")));
  return port_;
}

void SpargeServer::OnModelReady(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  if (!status.ok()) {
    LogError(absl::StrCat("model failed to load: ", status.ToString()));
    return;
  }
  if (shutting_down_ || grpc_server_ == nullptr) return;
  if (grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService()) {
    health->SetServingStatus(true);
    health->SetServingStatus(kServiceName, true);
  }
  LogInfo("ready: health SERVING");
}

absl::Status SpargeServer::WaitUntilReady(absl::Duration timeout) {
  if (executor_ == nullptr) return absl::FailedPreconditionError("server not started");
  return executor_->WaitUntilReady(timeout);
}

void SpargeServer::Shutdown() {
  absl::MutexLock shutdown_lock(&shutdown_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
    if (grpc_server_ != nullptr) {
      if (grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService()) {
        health->SetServingStatus(false);
      }
    }
  }
  if (grpc_server_ != nullptr) {
    LogInfo(absl::StrFormat("shutting down (grace %.1f s)", config_.shutdown_grace_seconds));
    // In-flight streams may finish within the grace period; then gRPC cancels them, the executor
    // stops their jobs at the next step boundary, and Shutdown returns once every call is done.
    grpc_server_->Shutdown(std::chrono::system_clock::now() +
                           std::chrono::milliseconds(
                               static_cast<int64_t>(config_.shutdown_grace_seconds * 1000)));
  }
  if (executor_ != nullptr) executor_->Stop();
  if (metrics_http_ != nullptr) metrics_http_->Stop();
}

}  // namespace sparge::server
