// sparge-server: loads the configured model and serves sparge.v1.VideoService over gRPC, with
// health, reflection and Prometheus metrics. Stops gracefully on SIGINT / SIGTERM.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/config.h"
#include "server/engine_binding.h"
#include "server/internal/flag_parser.h"
#include "server/log.h"
#include "server/video_service.h"

namespace sparge::server {
namespace {

constexpr char kUsage[] =
    "sparge-server: SpargeServe text-to-video gRPC server (sparge.v1.VideoService).\n"
    "\n"
    "Usage: sparge-server [--config FILE] [--port N] [--metrics-port N] [--device cpu|cuda]\n"
    "                     [--output-dir DIR]\n"
    "\n"
    "Settings come from the YAML file given by --config (config/server.yaml documents every\n"
    "field and its default; without --config the built-in defaults apply), then the flags below\n"
    "override the fields operators change most. The health service (grpc.health.v1) reports\n"
    "NOT_SERVING until the model is loaded and warmed up, then SERVING; server reflection is on.\n"
    "SIGINT / SIGTERM: stop accepting calls, give in-flight calls shutdown_grace_seconds, exit.\n"
    "Finished jobs (SubmitJob / Generate results and metadata) are kept in jobs.output_dir and\n"
    "served again after a restart; jobs unfinished at exit are then reported FAILED\n"
    "\"interrupted\".\n"
    "\n"
    "Flags:\n";

int Run(int argc, char** argv) {
  std::string config_path;
  int port = -1;
  int metrics_port = -1;
  std::string device;
  std::string model;
  std::string transformer;
  std::string listen_address;
  std::string output_dir;
  bool help = false;
  internal::FlagParser flags;
  flags.AddString("config", &config_path,
                  "YAML configuration file; empty: built-in defaults (same as config/server.yaml)");
  flags.AddInt("port", &port,
               "gRPC port, overriding `port` (config default 50051); 0 picks a free port; -1 keeps "
               "the config's value");
  flags.AddInt("metrics-port", &metrics_port,
               "HTTP port of Prometheus /metrics, overriding `metrics_port` (config default "
               "9090); 0 disables metrics; -1 keeps the config's value");
  flags.AddString("device", &device,
                  "cpu, cuda or cuda:N, overriding `device` (config default cpu); empty keeps "
                  "the config's value");
  flags.AddString("model", &model,
                  "model to serve, overriding `model.name` (config default \"tiny\": the embedded "
                  "tiny Wan2.1-architecture model); empty keeps the config's value");
  flags.AddString("transformer", &transformer,
                  "DiT weights replacing the model's, overriding `model.transformer`: a "
                  "transformer directory such as a sparge-train checkpoint's "
                  "<output_dir>/step-N/transformer; empty keeps the config's value");
  flags.AddString("listen-address", &listen_address,
                  "address to bind, overriding `listen_address` (config default 0.0.0.0); empty "
                  "keeps the config's value");
  flags.AddString("output-dir", &output_dir,
                  "directory of finished jobs' videos and metadata, overriding `jobs.output_dir` "
                  "(config default sparge-jobs, relative to the working directory); empty keeps "
                  "the config's value");
  flags.AddBool("help", &help, "print this help and exit");
  std::vector<std::string> positional;
  if (absl::Status s = flags.Parse(argc, argv, &positional); !s.ok()) {
    std::fprintf(stderr, "sparge-server: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::printf("%s%s", kUsage, flags.Usage().c_str());
    return 0;
  }
  if (!positional.empty()) {
    std::fprintf(stderr, "sparge-server: unexpected argument '%s' (see --help)\n",
                 positional.front().c_str());
    return 2;
  }

  ServerConfig config;
  if (!config_path.empty()) {
    absl::StatusOr<ServerConfig> loaded = LoadServerConfig(config_path);
    if (!loaded.ok()) {
      std::fprintf(stderr, "sparge-server: %s\n", std::string(loaded.status().message()).c_str());
      return 2;
    }
    config = *std::move(loaded);
  }
  if (port >= 0 || flags.IsSet("port")) config.port = port;
  if (metrics_port >= 0 || flags.IsSet("metrics-port")) config.metrics_port = metrics_port;
  if (!device.empty()) config.model.device = device;
  if (!model.empty()) config.model.model = model;
  if (!transformer.empty()) config.model.transformer = transformer;
  if (!listen_address.empty()) config.listen_address = listen_address;
  if (!output_dir.empty()) config.jobs.output_dir = output_dir;
  if (absl::Status s = config.Validate(); !s.ok()) {
    std::fprintf(stderr, "sparge-server: %s\n", std::string(s.message()).c_str());
    return 2;
  }

  // Signals go to a sigwait() in this thread only: block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  LogInfo(absl::StrCat("SpargeServe ", ServerVersion(), " starting: model ", config.model.model,
                       " (", config.model.dtype, ", weight seed ", config.model.weight_seed,
                       config.model.transformer.empty()
                           ? std::string()
                           : absl::StrCat(", transformer ", config.model.transformer),
                       "), device ", config.model.device, ", jobs in ", config.jobs.output_dir,
                       ", config ",
                       config_path.empty() ? "built-in defaults" : config_path));
  if (const std::string why = engine::CudaSparseKernelMismatch(config.model); !why.empty()) {
    LogWarning(absl::StrCat("model.dtype / model.block_q / model.block_k: ", why));
  }
  absl::StatusOr<std::unique_ptr<SpargeServer>> server =
      SpargeServer::Create(config, ServerDeps{EnginePipelineFactory(config.model),
                                              EngineVideoEncoder()});
  if (!server.ok()) {
    LogError(server.status().ToString());
    return 1;
  }
  absl::StatusOr<int> bound = (*server)->Start();
  if (!bound.ok()) {
    LogError(bound.status().ToString());
    return 1;
  }

  // A load failure must end the process (exit 1) rather than leave a server that is never ready.
  std::atomic<bool> load_failed{false};
  std::thread watcher([&] {
    const absl::Status status = (*server)->WaitUntilReady(absl::InfiniteDuration());
    if (status.ok()) {
      LogInfo(absl::StrCat("ready: gRPC port ", *bound, ", metrics port ",
                           (*server)->metrics_port(), ", device ", config.model.device));
    } else {
      load_failed = true;
      kill(getpid(), SIGTERM);
    }
  });
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  if (!load_failed) {
    LogInfo(absl::StrCat("received ", signal_number == SIGINT ? "SIGINT" : "SIGTERM"));
  }
  (*server)->Shutdown();
  watcher.join();
  server->reset();
  LogInfo(load_failed ? "stopped: the model failed to load" : "stopped");
  return load_failed ? 1 : 0;
}

}  // namespace
}  // namespace sparge::server

int main(int argc, char** argv) { return sparge::server::Run(argc, argv); }
