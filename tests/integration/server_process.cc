#include "tests/integration/server_process.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "server/health_client.h"

namespace sparge::integration {

namespace v1 = ::sparge::v1;

absl::StatusOr<int> FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return absl::InternalError("bind() to a free port failed");
  }
  const int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::string& server_binary, const std::string& config_yaml,
    absl::Duration ready_timeout) {
  std::unique_ptr<ServerProcess> p(new ServerProcess());
  char dir_template[] = "/tmp/sparge-integration-XXXXXX";
  if (mkdtemp(dir_template) == nullptr) return absl::InternalError("mkdtemp failed");
  p->dir_ = dir_template;
  const std::string config_path = p->dir_ + "/server.yaml";
  // Stored job results go to the temporary folder, not the working directory.
  std::ofstream(config_path) << config_yaml << "\njobs:\n  output_dir: " << p->dir_ << "/jobs\n";
  absl::StatusOr<int> port = FreePort();
  if (!port.ok()) return port.status();
  absl::StatusOr<int> metrics_port = FreePort();
  if (!metrics_port.ok()) return metrics_port.status();
  p->target_ = absl::StrCat("127.0.0.1:", *port);
  p->metrics_port_ = *metrics_port;

  const std::string log_path = p->dir_ + "/server.log";
  const std::string port_text = std::to_string(*port);
  const std::string metrics_text = std::to_string(*metrics_port);
  std::vector<std::string> args = {server_binary, "--config",         config_path,
                                   "--port",      port_text,          "--metrics-port",
                                   metrics_text,  "--listen-address", "127.0.0.1"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // fork + exec rather than posix_spawn: the child asks to be killed when the test process dies,
  // so a crashed or killed test leaves no server behind.
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the parent died before prctl
    const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
      close(fd);
    }
    execv(argv[0], argv.data());
    _exit(127);
  }
  p->pid_ = pid;

  std::shared_ptr<grpc::Channel> channel = p->NewChannel();
  const absl::Time give_up = absl::Now() + ready_timeout;
  while (absl::Now() < give_up) {
    if (!p->running()) {
      return absl::InternalError(
          absl::StrCat("sparge-server exited with ", p->exit_code_.value_or(-1), ":\n", p->log()));
    }
    absl::StatusOr<server::HealthStatus> health =
        server::CheckHealth(channel, "", absl::Milliseconds(500));
    if (health.ok() && *health == server::HealthStatus::kServing) return p;
    absl::SleepFor(absl::Milliseconds(100));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "sparge-server not SERVING after ", absl::FormatDuration(ready_timeout), ":\n", p->log()));
}

ServerProcess::~ServerProcess() {
  if (running()) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (!dir_.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
}

std::string ServerProcess::metrics_url() const {
  return absl::StrCat("http://127.0.0.1:", metrics_port_, "/metrics");
}

std::shared_ptr<grpc::Channel> ServerProcess::NewChannel() const {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Distinct arguments keep gRPC from sharing one subchannel (TCP connection) between channels.
  static int counter = 0;
  args.SetInt("sparge.test.channel", ++counter);
  return grpc::CreateCustomChannel(target_, grpc::InsecureChannelCredentials(), args);
}

std::string ServerProcess::log() const {
  std::ifstream in(dir_ + "/server.log");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::StatusOr<bench::MetricsSnapshot> ServerProcess::Scrape() const {
  return bench::ScrapeMetrics(metrics_url(), absl::Seconds(5));
}

bool ServerProcess::running() {
  if (pid_ < 0 || exit_code_.has_value()) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == 0) return true;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return false;
}

absl::StatusOr<int> ServerProcess::SignalAndWait(int signal, absl::Duration timeout) {
  if (running()) kill(pid_, signal);
  const absl::Time give_up = absl::Now() + timeout;
  while (running()) {
    if (absl::Now() > give_up) {
      return absl::DeadlineExceededError(absl::StrCat(
          "sparge-server still running ", absl::FormatDuration(timeout), " after signal ", signal));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return *exit_code_;
}

StreamResult RunGenerate(const std::shared_ptr<grpc::Channel>& channel,
                         const v1::GenerateRequest& request, std::optional<absl::Duration> deadline,
                         EventHook hook) {
  StreamResult result;
  std::unique_ptr<v1::VideoService::Stub> stub = v1::VideoService::NewStub(channel);
  grpc::ClientContext context;
  if (deadline.has_value()) {
    context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMicroseconds(*deadline));
  }
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader = stub->Generate(&context, request);
  v1::GenerateEvent event;
  while (reader->Read(&event)) {
    if (event.has_chunk()) {
      if (event.chunk().offset() != static_cast<int64_t>(result.file.size())) {
        result.offsets_contiguous = false;
      }
      result.file += event.chunk().data();
    } else if (event.has_completed()) {
      result.completed = event.completed();
    } else if (event.has_progress() && event.progress().stage() == v1::STAGE_DENOISE) {
      result.last_step = event.progress().step();
    }
    if (hook) hook(event, &context);
    if (!event.has_chunk()) result.events.push_back(event);  // chunks are kept in `file`
  }
  result.status = reader->Finish();
  return result;
}

namespace {

std::string RunCommand(const std::string& command) {
  std::string out;
  if (FILE* p = popen(command.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    pclose(p);
  }
  return out;
}

bool HaveCommand(const char* name) {
  return std::system(absl::StrCat("command -v ", name, " >/dev/null 2>&1").c_str()) == 0;
}

// The bytes in a temporary file, removed when this goes out of scope.
class TempFile {
 public:
  explicit TempFile(const std::string& bytes) {
    char path[] = "/tmp/sparge-video-XXXXXX";
    const int fd = mkstemp(path);
    if (fd < 0) return;
    path_ = path;
    ok_ = write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size());
    close(fd);
  }
  ~TempFile() {
    if (!path_.empty()) unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  bool ok_ = false;
};

}  // namespace

std::optional<std::string> FfprobeSummary(const std::string& file_bytes) {
  if (!HaveCommand("ffprobe")) return std::nullopt;
  TempFile file(file_bytes);
  if (!file.ok()) return std::string("cannot write a temporary file");
  const std::string out =
      RunCommand(absl::StrCat("ffprobe -v error -count_frames -select_streams v:0 -show_entries "
                              "stream=width,height,nb_read_frames,codec_name -of csv=p=0 ",
                              file.path(), " 2>&1"));
  return std::string(absl::StripTrailingAsciiWhitespace(out));
}

std::optional<FrameDiff> CompareFrames(const std::string& video_a, const std::string& video_b) {
  if (!HaveCommand("ffmpeg")) return std::nullopt;
  TempFile a(video_a), b(video_b);
  auto decode = [](const TempFile& f) {
    return RunCommand(
        absl::StrCat("ffmpeg -v error -i ", f.path(), " -f rawvideo -pix_fmt rgb24 - 2>/dev/null"));
  };
  const std::string ra = decode(a), rb = decode(b);
  FrameDiff diff;
  if (ra.empty() || ra.size() != rb.size()) {
    diff.mean_abs = 255;
    diff.max_abs = 255;
    return diff;
  }
  double sum = 0;
  for (size_t i = 0; i < ra.size(); ++i) {
    const int d = std::abs(static_cast<int>(static_cast<uint8_t>(ra[i])) -
                           static_cast<int>(static_cast<uint8_t>(rb[i])));
    sum += d;
    diff.max_abs = std::max(diff.max_abs, d);
  }
  diff.mean_abs = sum / ra.size();
  return diff;
}

}  // namespace sparge::integration
