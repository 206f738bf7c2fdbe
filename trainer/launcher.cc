#include "trainer/launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/base/status_macros.h"

extern char** environ;

namespace sparge::trainer {
namespace {

// The variables a launcher sets for its workers (an inherited value of these is replaced).
constexpr const char* kWorkerVars[] = {
    "RANK",        "LOCAL_RANK",  "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SPARGE_MASTER_LISTEN_FD"};

absl::StatusOr<int> IntFromEnv(const char* name, int default_value, int lo, int hi) {
  const char* v = std::getenv(name);
  if (v == nullptr) return default_value;
  int value = 0;
  if (!absl::SimpleAtoi(v, &value) || value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: must be an integer in [%d, %d], got '%s'", name, lo, hi, v));
  }
  return value;
}

// A TCP socket listening on a port the kernel picks, for rank 0's store to take over
// (SPARGE_MASTER_LISTEN_FD): the port stays taken from the pick to the store's start, so no other
// process can grab it in between (torchrun's free-port pick leaves that window open). Returns
// the descriptor (inheritable: no close-on-exec) and sets *port.
absl::StatusOr<int> ListenOnFreePort(int* port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, SOMAXCONN) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("listening on a free MASTER_PORT: ", std::strerror(err)));
  }
  *port = static_cast<int>(ntohs(addr.sin_port));
  return fd;
}

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return absl::StrCat("was killed by signal ", sig, " (", strsignal(sig), ")");
  }
  return absl::StrCat("ended with wait status ", status);
}

struct Worker {
  int rank = 0;
  int local_rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;
};

}  // namespace

bool ShouldLaunchWorkers(int nproc_per_node) {
  if (std::getenv("RANK") != nullptr) return false;
  if (nproc_per_node > 1) return true;
  const char* nnodes = std::getenv("NNODES");
  int n = 1;
  return nnodes != nullptr && absl::SimpleAtoi(nnodes, &n) && n > 1;
}

absl::Status LaunchWorkers(int nproc_per_node, int argc, char** argv) {
  return LaunchWorkers(nproc_per_node, argc, argv, LaunchOptions());
}

absl::Status LaunchWorkers(int nproc_per_node, int argc, char** argv,
                           const LaunchOptions& options) {
  if (nproc_per_node < 1 || nproc_per_node > 1024) {
    return absl::InvalidArgumentError(
        absl::StrFormat("nproc_per_node: must be an integer in [1, 1024], got %d", nproc_per_node));
  }
  if (argc < 1 || argv == nullptr || argv[0] == nullptr) {
    return absl::InvalidArgumentError("LaunchWorkers: argv must hold at least the program name");
  }
  if (std::getenv("RANK") != nullptr) {
    return absl::FailedPreconditionError(
        "LaunchWorkers: RANK is set, so this process is already a worker of a job");
  }
  SPARGE_ASSIGN_OR_RETURN(const int nnodes, IntFromEnv("NNODES", 1, 1, 65536));
  SPARGE_ASSIGN_OR_RETURN(const int completion_index,
                          IntFromEnv("JOB_COMPLETION_INDEX", 0, 0, nnodes - 1));
  SPARGE_ASSIGN_OR_RETURN(const int node_rank,
                          IntFromEnv("NODE_RANK", completion_index, 0, nnodes - 1));
  const int64_t world_size = int64_t{nnodes} * nproc_per_node;
  if (world_size > 65536) {
    return absl::InvalidArgumentError(
        absl::StrFormat("NNODES * nproc_per_node: must be at most 65536, got %d", world_size));
  }
  std::string master_addr = "127.0.0.1";
  if (const char* a = std::getenv("MASTER_ADDR"); a != nullptr && *a != '\0') {
    master_addr = a;
  } else if (nnodes > 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MASTER_ADDR: must be set to node 0's host name when NNODES is %d", nnodes));
  }
  int master_port = 0;
  int listen_fd = -1;  // held from here until every worker is started (rank 0 keeps its copy)
  if (std::getenv("MASTER_PORT") != nullptr || nnodes > 1) {
    SPARGE_ASSIGN_OR_RETURN(master_port, IntFromEnv("MASTER_PORT", 29500, 1, 65535));
  } else {
    SPARGE_ASSIGN_OR_RETURN(listen_fd, ListenOnFreePort(&master_port));
  }
  struct FdCloser {
    int& fd;
    void Close() {
      if (fd >= 0) close(fd);
      fd = -1;
    }
    ~FdCloser() { Close(); }
  } listen_closer{listen_fd};

  // Every worker's environment is built before the first fork: between fork and exec the child
  // may only make async-signal-safe calls (the parent may hold malloc's lock on another thread).
  std::vector<std::string> base_env;
  for (char** e = environ; *e != nullptr; ++e) {
    bool ours = false;
    for (const char* var : kWorkerVars) {
      ours = ours || (absl::StartsWith(*e, var) && (*e)[std::strlen(var)] == '=');
    }
    if (!ours) base_env.emplace_back(*e);
  }
  std::vector<Worker> workers(nproc_per_node);
  std::vector<std::vector<std::string>> envs(nproc_per_node);
  for (int local = 0; local < nproc_per_node; ++local) {
    Worker& w = workers[local];
    w.local_rank = local;
    w.rank = node_rank * nproc_per_node + local;
    envs[local] = base_env;
    envs[local].push_back(absl::StrCat("RANK=", w.rank));
    envs[local].push_back(absl::StrCat("LOCAL_RANK=", local));
    envs[local].push_back(absl::StrCat("WORLD_SIZE=", world_size));
    envs[local].push_back(absl::StrCat("LOCAL_WORLD_SIZE=", nproc_per_node));
    envs[local].push_back(absl::StrCat("NODE_RANK=", node_rank));
    envs[local].push_back(absl::StrCat("MASTER_ADDR=", master_addr));
    envs[local].push_back(absl::StrCat("MASTER_PORT=", master_port));
    if (listen_fd >= 0 && w.rank == 0) envs[local].push_back(absl::StrCat("SPARGE_MASTER_LISTEN_FD=", listen_fd));
  }
  std::vector<char*> child_argv(argv, argv + argc);
  child_argv.push_back(nullptr);

  // SIGINT/SIGTERM/SIGCHLD are taken synchronously with sigtimedwait below.
  sigset_t watched, old_mask;
  sigemptyset(&watched);
  sigaddset(&watched, SIGINT);
  sigaddset(&watched, SIGTERM);
  sigaddset(&watched, SIGCHLD);
  pthread_sigmask(SIG_BLOCK, &watched, &old_mask);
  const pid_t launcher_pid = getpid();

  std::optional<int> first_failure;         // index into workers
  std::optional<int> forwarded_signal;      // SIGINT/SIGTERM the launcher received
  std::optional<absl::Time> kill_deadline;  // SIGKILL whoever still runs then
  int running = 0;
  auto terminate_all = [&](int sig) {
    for (Worker& w : workers) {
      if (w.running) kill(w.pid, sig);
    }
    if (!kill_deadline) kill_deadline = absl::Now() + options.termination_grace;
  };

  absl::Status spawn_error;
  for (int local = 0; local < nproc_per_node; ++local) {
    std::vector<char*> child_env;
    for (std::string& s : envs[local]) child_env.push_back(s.data());
    child_env.push_back(nullptr);
    const pid_t pid = fork();
    if (pid < 0) {
      spawn_error = absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
      break;
    }
    if (pid == 0) {
      // Worker: die with the launcher, take signals normally again, become the program.
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != launcher_pid) _exit(128 + SIGTERM);
      if (listen_fd >= 0 && workers[local].rank != 0) close(listen_fd);  // rank 0's alone
      pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
      execve(options.executable.c_str(), child_argv.data(), child_env.data());
      static constexpr char kMsg[] = "sparge-train launcher: exec failed\n";
      ssize_t ignored = write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
      (void)ignored;
      _exit(127);
    }
    workers[local].pid = pid;
    workers[local].running = true;
    ++running;
  }
  listen_closer.Close();  // rank 0 holds the listening socket now (or nobody needs it)
  if (!spawn_error.ok()) terminate_all(SIGTERM);

  while (running > 0) {
    // Reap whoever ended.
    for (int i = 0; i < nproc_per_node; ++i) {
      Worker& w = workers[i];
      if (!w.running) continue;
      int status = 0;
      const pid_t r = waitpid(w.pid, &status, WNOHANG);
      if (r != w.pid) continue;
      w.running = false;
      w.status = status;
      --running;
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!ok && !first_failure) {
        first_failure = i;
        if (!kill_deadline) terminate_all(SIGTERM);
      }
    }
    if (running == 0) break;
    if (kill_deadline && absl::Now() >= *kill_deadline) {
      for (Worker& w : workers) {
        if (w.running) kill(w.pid, SIGKILL);
      }
    }
    timespec wait_for{0, 100 * 1000 * 1000};  // also the SIGKILL deadline's resolution
    siginfo_t info;
    const int sig = sigtimedwait(&watched, &info, &wait_for);
    if (sig == SIGINT || sig == SIGTERM) {
      // The first one is forwarded as it is; a second one of either kind ends it now.
      if (!forwarded_signal) {
        forwarded_signal = sig;
        terminate_all(sig);
      } else {
        kill_deadline = absl::Now();
      }
    }
  }
  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);

  if (!spawn_error.ok()) return spawn_error;
  if (forwarded_signal) {
    // A stop the launcher passed on: workers that exit 0 or with 128 + the signal (sparge-train
    // saves a checkpoint first) stopped as asked.
    bool all_stopped = true;
    for (const Worker& w : workers) {
      all_stopped =
          all_stopped && WIFEXITED(w.status) &&
          (WEXITSTATUS(w.status) == 0 || WEXITSTATUS(w.status) == 128 + *forwarded_signal);
    }
    if (all_stopped && first_failure) {
      return absl::CancelledError(absl::StrCat("stopped by ", strsignal(*forwarded_signal),
                                               ": every worker exited after it"));
    }
  }
  if (first_failure) {
    const Worker& w = workers[*first_failure];
    std::string others;
    for (const Worker& o : workers) {
      if (&o == &w) continue;
      absl::StrAppend(&others, others.empty() ? "" : ", ", "rank ", o.rank, " ",
                      DescribeWaitStatus(o.status));
    }
    return absl::InternalError(absl::StrCat(
        "worker rank ", w.rank, " (local rank ", w.local_rank, ", pid ", w.pid, ") ",
        DescribeWaitStatus(w.status),
        forwarded_signal
            ? absl::StrCat(" after the launcher forwarded ", strsignal(*forwarded_signal))
            : "",
        others.empty() ? "" : absl::StrCat("; the other workers were terminated: ", others)));
  }
  return absl::OkStatus();
}

}  // namespace sparge::trainer
