// Data parallelism for sparge-train: the torchrun-style process environment and the collectives
// the trainer needs (gradient mean, initial-weight broadcast, scalar sums, barriers).
// Usage: SPARGE_ASSIGN_OR_RETURN(DistEnv env, DistEnvFromEnvironment());
//        SPARGE_ASSIGN_OR_RETURN(auto comm, Communicator::Create(env, device, absl::Minutes(10)));
//        SPARGE_RETURN_IF_ERROR(comm->AllReduceMean(grads));
// Thread-safety: a Communicator is used by one thread; every rank must issue the same collectives
// in the same order (as with any process group).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace sparge::trainer {

// Where this process sits in the job. The defaults are a single process.
struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // Rank 0 only: a socket already listening on master_port, inherited from LaunchWorkers
  // (SPARGE_MASTER_LISTEN_FD), which the store's server takes over, so no other process can take
  // the port between the launcher's pick and rank 0's bind. -1: rank 0 binds the port itself.
  int master_listen_fd = -1;
};

// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (as torchrun and LaunchWorkers
// set them), and on rank 0 SPARGE_MASTER_LISTEN_FD (LaunchWorkers: it must be a listening TCP
// socket bound to MASTER_PORT). None set: a single process. RANK and WORLD_SIZE come together; LOCAL_RANK defaults
// to RANK. Invalid or inconsistent values are INVALID_ARGUMENT naming the variable and its range.
absl::StatusOr<DistEnv> DistEnvFromEnvironment();

// Gradients are flattened into buckets of about this many bytes, so that a 1.3B-parameter DiT's
// ~800 gradient tensors (5.2 GB in fp32) take ~200 collectives instead of 800 small ones.
inline constexpr int64_t kBucketBytes = int64_t{25} << 20;

// Collectives over all ranks of a DistEnv.
//  - world size 1: no process group and no store; every call is a cheap no-op.
//  - CUDA device: tensors travel through NCCL (LibTorch's c10d ProcessGroupNCCL), the scalar and
//    barrier calls through the job's c10d TCPStore.
//  - CPU device: everything travels through the TCPStore that rank 0 hosts at
//    MASTER_ADDR:MASTER_PORT. (The torch wheel ships no Gloo headers, so c10d's ProcessGroupGloo
//    cannot be built against from C++; CPU runs train only small models, so the store's bandwidth
//    is enough.) Sums run in rank order, so every rank gets bit-identical results.
// Errors (a peer that died, a timeout, a bad tensor) are returned as a Status; after a failed
// collective the communicator is unusable and the job should exit. One case is not bounded by the
// timeout: NCCL creates its communicator at the first CUDA collective, and a peer that is gone by
// then leaves the others waiting in that setup (seen on 2 H200s); the launcher's terminating the
// other workers when one fails is what ends such a job.
class Communicator {
 public:
  // Connects to the job's store (rank 0 creates it) and, for CUDA devices, the NCCL group on
  // `device` (which must be this rank's GPU). `timeout` bounds the rendezvous and every
  // collective. Fails with DEADLINE_EXCEEDED when the peers do not show up in time. A CUDA
  // device without an index means cuda:LOCAL_RANK. `bucket_bytes` is for tests.
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(const DistEnv& env,
                                                              c10::Device device,
                                                              absl::Duration timeout,
                                                              int64_t bucket_bytes = kBucketBytes);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }

  // In place: each tensor becomes the mean of that tensor over all ranks. Tensors must be on
  // the communicator's device, floating point, and of the same shapes on every rank; they are
  // bucketed (kBucketBytes, by dtype) into few collectives.
  absl::Status AllReduceMean(std::vector<at::Tensor>& tensors);
  // In place: every rank's tensors become rank `root`'s (e.g. the initial weights).
  absl::Status Broadcast(std::vector<at::Tensor>& tensors, int root);
  // Sum of `value` over all ranks (e.g. a loss or a sample count), the same on every rank.
  absl::StatusOr<double> AllReduceSum(double value);
  // Returns once every rank has called it.
  absl::Status Barrier();

 private:
  class Impl;
  Communicator(const DistEnv& env, std::unique_ptr<Impl> impl);

  DistEnv env_;
  std::unique_ptr<Impl> impl_;  // null for world size 1
};

}  // namespace sparge::trainer
