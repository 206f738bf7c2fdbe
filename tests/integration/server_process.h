// A real sparge-server child process for integration tests: writes a temporary YAML config,
// picks free loopback ports, starts the binary, waits for health SERVING, and stops it with a
// signal. Also helpers to run a Generate stream to its end. Not thread-safe (one owner thread);
// the stream helpers are thread-safe.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bench/serving/prometheus_scrape.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "sparge/v1/video_service.grpc.pb.h"

namespace sparge::integration {

class ServerProcess {
 public:
  // `config_yaml` is the YAML body without a `jobs:` section (stored results go to a temporary
  // folder); listen address and ports are set from the command line.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const std::string& server_binary,
                                                              const std::string& config_yaml,
                                                              absl::Duration ready_timeout);
  ~ServerProcess();  // SIGKILL if still running; removes the temporary folder

  const std::string& target() const { return target_; }  // "127.0.0.1:PORT"
  std::string metrics_url() const;
  std::shared_ptr<grpc::Channel> NewChannel() const;  // a channel of its own (own connection)
  pid_t pid() const { return pid_; }
  std::string log() const;  // the server's stdout and stderr so far

  absl::StatusOr<bench::MetricsSnapshot> Scrape() const;

  // Sends `signal` and waits up to `timeout` for the exit; returns the exit code (128+signal
  // when killed by one) or DEADLINE_EXCEEDED.
  absl::StatusOr<int> SignalAndWait(int signal, absl::Duration timeout);
  bool running();

 private:
  ServerProcess() = default;
  std::string dir_;
  std::string target_;
  int metrics_port_ = 0;
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
};

// Everything one Generate call returned.
struct StreamResult {
  grpc::Status status;
  std::vector<sparge::v1::GenerateEvent> events;
  std::string file;  // the concatenated chunks
  bool offsets_contiguous = true;
  std::optional<sparge::v1::GenerateCompleted> completed;
  int last_step = 0;
};

// Called on every event; may call context->TryCancel().
using EventHook =
    std::function<void(const sparge::v1::GenerateEvent&, grpc::ClientContext* context)>;

// Runs a Generate call to its end on `channel`.
StreamResult RunGenerate(const std::shared_ptr<grpc::Channel>& channel,
                         const sparge::v1::GenerateRequest& request,
                         std::optional<absl::Duration> deadline = std::nullopt,
                         EventHook hook = nullptr);

// A free TCP port on 127.0.0.1 (bound, then released).
absl::StatusOr<int> FreePort();

// ffprobe's "width,height,frames,codec" of a video file's first stream, or nullopt when ffprobe
// is not installed.
std::optional<std::string> FfprobeSummary(const std::string& file_bytes);

// How far apart two videos' decoded RGB frames are (0-255 levels), or nullopt when ffmpeg is
// not installed. Frame counts or sizes that differ give max_abs 255.
struct FrameDiff {
  double mean_abs = 0;
  int max_abs = 0;
};
std::optional<FrameDiff> CompareFrames(const std::string& video_a, const std::string& video_b);

}  // namespace sparge::integration
