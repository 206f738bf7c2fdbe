// The torchrun part of sparge-train: `sparge-train --nproc_per_node N ...` re-executes itself once
// per local GPU with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, supervises the
// workers and reports how they ended.
// Usage (first thing in main, before any thread starts):
//   if (ShouldLaunchWorkers(nproc)) {
//     absl::Status s = LaunchWorkers(nproc, argc, argv);
//     if (!s.ok()) std::cerr << s << "\n";
//     return s.ok() ? 0 : 1;
//   }
// Thread-safety: call from the main thread of a process that has started no other threads (it
// blocks SIGINT/SIGTERM/SIGCHLD in the calling thread while it waits).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace sparge::trainer {

// True when this process is the launcher: RANK is not set (it is no worker of a job already) and
// the job has more than one process (nproc_per_node > 1, or NNODES > 1).
bool ShouldLaunchWorkers(int nproc_per_node);

struct LaunchOptions {
  // After the first worker fails, or the launcher gets SIGINT/SIGTERM, the other workers get
  // SIGTERM (to save and exit) and, this long after, SIGKILL.
  absl::Duration termination_grace = absl::Seconds(30);
  // The program each worker runs with argv; the running binary by default.
  std::string executable = "/proc/self/exe";
};

// Starts nproc_per_node workers of this node (executable with argv[0..argc), this environment
// plus the job's variables) and waits for all of them:
//   WORLD_SIZE = NNODES * nproc_per_node, RANK = NODE_RANK * nproc_per_node + LOCAL_RANK,
//   LOCAL_WORLD_SIZE = nproc_per_node.
// NNODES defaults to 1; NODE_RANK to JOB_COMPLETION_INDEX (a Kubernetes Indexed Job's pod index),
// then 0. MASTER_ADDR/MASTER_PORT come from the environment; on one node they default to
// 127.0.0.1 and a free port, on several nodes MASTER_ADDR is required and the port defaults to
// 29500. SIGINT and SIGTERM are forwarded to the workers; when one worker fails the others are
// terminated. OK only if every worker exits 0. CANCELLED when the launcher forwarded SIGINT/SIGTERM
// and every worker then exited 0 or with 128 + that signal (stopped as asked; sparge-train exits
// 143 after saving a checkpoint). Otherwise the error names the first worker that failed (rank,
// local rank, pid) and its exit status or signal.
absl::Status LaunchWorkers(int nproc_per_node, int argc, char** argv, const LaunchOptions& options);
absl::Status LaunchWorkers(int nproc_per_node, int argc, char** argv);

}  // namespace sparge::trainer
