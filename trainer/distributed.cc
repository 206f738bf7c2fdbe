#include "trainer/distributed.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <optional>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <utility>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#if defined(SPARGE_WITH_CUDA) && defined(USE_C10D_NCCL)
#include <c10/cuda/CUDAFunctions.h>

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define SPARGE_HAVE_NCCL 1
#else
#define SPARGE_HAVE_NCCL 0
#endif

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "engine/base/status_macros.h"

namespace sparge::trainer {
namespace {

constexpr int kMaxWorldSize = 65536;

// The variable's value, or nullopt when it is unset (an empty value counts as set: it is an
// error below rather than silently the default).
std::optional<std::string> GetEnv(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}

absl::StatusOr<int> ParseIntInRange(const char* name, const std::string& text, int lo, int hi,
                                    absl::string_view range_text) {
  int value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < lo || value > hi) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: must be an integer in %s = [%d, %d], got '%s'", name, range_text, lo, hi, text));
  }
  return value;
}

// Turns whatever c10d threw into a Status that names the operation and this rank.
absl::Status StatusFromCurrentException(absl::string_view what, int rank) {
  try {
    throw;
  } catch (const c10::DistNetworkError& e) {
    return absl::UnavailableError(absl::StrCat("rank ", rank, ": ", what,
                                               ": peer unreachable: ", e.what_without_backtrace()));
  } catch (const c10::DistError& e) {
    std::string msg = e.what_without_backtrace();
    const bool timed_out =
        msg.find("imeout") != std::string::npos || msg.find("imed out") != std::string::npos;
    if (timed_out) {
      return absl::DeadlineExceededError(absl::StrCat("rank ", rank, ": ", what, ": ", msg));
    }
    return absl::InternalError(absl::StrCat("rank ", rank, ": ", what, ": ", msg));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("rank ", rank, ": ", what, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("rank ", rank, ": ", what, ": ", e.what()));
  }
}

std::chrono::milliseconds ToMillis(absl::Duration d) {
  return std::chrono::milliseconds(absl::ToInt64Milliseconds(d));
}

// A run of consecutive tensors of one dtype whose bytes add up to at most the bucket size (or one
// larger tensor on its own).
struct Bucket {
  std::vector<at::Tensor*> members;
  int64_t bytes = 0;
};

std::vector<Bucket> MakeBuckets(std::vector<at::Tensor>& tensors, int64_t bucket_bytes) {
  std::vector<Bucket> buckets;
  for (at::Tensor& t : tensors) {
    const int64_t nbytes = static_cast<int64_t>(t.nbytes());
    if (buckets.empty() || buckets.back().members.front()->scalar_type() != t.scalar_type() ||
        buckets.back().bytes + nbytes > bucket_bytes) {
      buckets.emplace_back();
    }
    buckets.back().members.push_back(&t);
    buckets.back().bytes += nbytes;
  }
  return buckets;
}

at::Tensor Flatten(const Bucket& bucket) {
  std::vector<at::Tensor> flat;
  flat.reserve(bucket.members.size());
  for (const at::Tensor* t : bucket.members) flat.push_back(t->reshape({-1}));
  return flat.size() == 1 ? flat[0].contiguous().clone() : at::cat(flat);
}

void Unflatten(const at::Tensor& flat, const Bucket& bucket) {
  int64_t offset = 0;
  for (at::Tensor* t : bucket.members) {
    const int64_t n = t->numel();
    t->copy_(flat.narrow(0, offset, n).view(t->sizes()));
    offset += n;
  }
}

}  // namespace

absl::StatusOr<DistEnv> DistEnvFromEnvironment() {
  const std::optional<std::string> rank_s = GetEnv("RANK");
  const std::optional<std::string> world_s = GetEnv("WORLD_SIZE");
  const std::optional<std::string> local_s = GetEnv("LOCAL_RANK");
  DistEnv env;
  if (!rank_s && !world_s && !local_s) return env;
  if (!rank_s || !world_s) {
    return absl::InvalidArgumentError(absl::StrCat(
        rank_s ? "WORLD_SIZE" : "RANK", ": must be set together with ",
        rank_s ? "RANK" : "WORLD_SIZE",
        (local_s && !rank_s && !world_s) ? " (LOCAL_RANK is set without RANK and WORLD_SIZE)"
                                         : " (the other one is set)"));
  }
  SPARGE_ASSIGN_OR_RETURN(env.world_size,
                          ParseIntInRange("WORLD_SIZE", *world_s, 1, kMaxWorldSize, "[1, 65536]"));
  SPARGE_ASSIGN_OR_RETURN(
      env.rank, ParseIntInRange("RANK", *rank_s, 0, env.world_size - 1, "[0, WORLD_SIZE-1]"));
  env.local_rank = env.rank;
  if (local_s) {
    SPARGE_ASSIGN_OR_RETURN(env.local_rank,
                            ParseIntInRange("LOCAL_RANK", *local_s, 0, env.rank, "[0, RANK]"));
  }
  const std::optional<std::string> addr = GetEnv("MASTER_ADDR");
  const std::optional<std::string> port = GetEnv("MASTER_PORT");
  if (env.world_size > 1) {
    // No silent 127.0.0.1 for a multi-process job: on several nodes that would hang every rank
    // but rank 0's until the timeout.
    if (!addr || addr->empty()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "MASTER_ADDR: must be set to rank 0's host name or address when WORLD_SIZE is %d",
          env.world_size));
    }
    if (!port) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "MASTER_PORT: must be set to an integer in [1, 65535] when WORLD_SIZE is %d",
          env.world_size));
    }
  }
  if (addr && !addr->empty()) env.master_addr = *addr;
  if (port) {
    SPARGE_ASSIGN_OR_RETURN(env.master_port,
                            ParseIntInRange("MASTER_PORT", *port, 1, 65535, "[1, 65535]"));
  }
  if (const std::optional<std::string> fd_s = GetEnv("SPARGE_MASTER_LISTEN_FD"); fd_s && env.rank == 0) {
    SPARGE_ASSIGN_OR_RETURN(const int fd,
                            ParseIntInRange("SPARGE_MASTER_LISTEN_FD", *fd_s, 0, 1 << 20, "[0, 1048576]"));
    sockaddr_in addr{};
    socklen_t len = sizeof(addr);
    int listening = 0;
    socklen_t optlen = sizeof(listening);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 || addr.sin_family != AF_INET ||
        getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || listening == 0 ||
        ntohs(addr.sin_port) != env.master_port) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "SPARGE_MASTER_LISTEN_FD: must be a listening IPv4 TCP socket bound to MASTER_PORT %d, got "
          "descriptor %d",
          env.master_port, fd));
    }
    env.master_listen_fd = fd;
  }
  return env;
}

// The multi-process state: the job's store and, on CUDA, the NCCL group.
class Communicator::Impl {
 public:
  Impl(const DistEnv& env, c10::Device device, absl::Duration timeout, int64_t bucket_bytes)
      : env_(env), device_(device), timeout_(timeout), bucket_bytes_(bucket_bytes) {}

  ~Impl() {
    if (store_ && env_.rank == 0 && rounds_complete_ && round_ > 0) WaitForPeersToFinish();
#if SPARGE_HAVE_NCCL
    if (nccl_) {
      try {
        if (broken_) {
          nccl_->abort();
        } else {
          nccl_->shutdown();
        }
      } catch (const std::exception&) {
        // Nothing to report to: the communicator is going away either way.
      }
    }
#endif
  }

  absl::Status Connect() {
    try {
      c10d::TCPStoreOptions opts;
      opts.port = static_cast<uint16_t>(env_.master_port);
      opts.isServer = env_.rank == 0;
      if (env_.rank == 0 && env_.master_listen_fd >= 0) opts.masterListenFd = env_.master_listen_fd;
      opts.numWorkers = env_.world_size;
      opts.waitWorkers = true;
      opts.timeout = ToMillis(timeout_);
      store_ = c10::make_intrusive<c10d::TCPStore>(env_.master_addr, opts);
    } catch (...) {
      return StatusFromCurrentException(
          absl::StrCat("connecting to the store at ", env_.master_addr, ":", env_.master_port),
          env_.rank);
    }
    if (device_.is_cuda()) {
#if SPARGE_HAVE_NCCL
      try {
        // Errors must come back from wait() as exceptions (and so as a Status), not take the
        // process down from ProcessGroupNCCL's watchdog thread. An explicit setting wins.
        setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", /*overwrite=*/0);  // CleanUpOnly
        setenv("TORCH_NCCL_BLOCKING_WAIT", "1", /*overwrite=*/0);
        c10::cuda::set_device(device_.index());
        auto opts = c10d::ProcessGroupNCCL::Options::create();
        opts->timeout = ToMillis(timeout_);
        nccl_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(
            c10::make_intrusive<c10d::PrefixStore>("nccl", store_), env_.rank, env_.world_size,
            opts);
      } catch (...) {
        return StatusFromCurrentException("creating the NCCL process group", env_.rank);
      }
#else
      return absl::FailedPreconditionError(
          "Communicator: this build has no NCCL (configured without CUDA); use device cpu");
#endif
    }
    return absl::OkStatus();
  }

  absl::Status AllReduceMean(std::vector<at::Tensor>& tensors) {
    SPARGE_RETURN_IF_ERROR(CheckTensors(tensors, "AllReduceMean"));
    const std::vector<Bucket> buckets = MakeBuckets(tensors, bucket_bytes_);
    if (device_.is_cuda()) return NcclBuckets(buckets, /*root=*/-1);
    for (const Bucket& bucket : buckets) {
      at::Tensor flat = Flatten(bucket);
      SPARGE_ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> parts,
                              AllGather(flat, "all-reduce"));
      // Sum in rank order on every rank (bit-identical results), in fp32 for 16-bit types.
      const at::ScalarType acc_type =
          at::isReducedFloatingType(flat.scalar_type()) ? at::kFloat : flat.scalar_type();
      at::Tensor acc = at::zeros({flat.numel()}, flat.options().dtype(acc_type));
      for (size_t q = 0; q < parts.size(); ++q) {
        if (static_cast<int64_t>(parts[q].size()) != bucket.bytes) {
          broken_ = true;
          return absl::InvalidArgumentError(absl::StrFormat(
              "rank %d: AllReduceMean: rank %d sent %d bytes for a bucket of %d bytes: the "
              "ranks' tensor lists differ in shape or dtype",
              env_.rank, q, parts[q].size(), bucket.bytes));
        }
        acc.add_(at::from_blob(parts[q].data(), {flat.numel()}, flat.options()));
      }
      acc.div_(env_.world_size);
      Unflatten(acc.to(flat.scalar_type()), bucket);
    }
    return absl::OkStatus();
  }

  absl::Status Broadcast(std::vector<at::Tensor>& tensors, int root) {
    if (root < 0 || root >= env_.world_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Broadcast: root must be in [0, %d], got %d", env_.world_size - 1, root));
    }
    SPARGE_RETURN_IF_ERROR(CheckTensors(tensors, "Broadcast"));
    const std::vector<Bucket> buckets = MakeBuckets(tensors, bucket_bytes_);
    if (device_.is_cuda()) return NcclBuckets(buckets, root);
    for (const Bucket& bucket : buckets) {
      at::Tensor flat = env_.rank == root ? Flatten(bucket) : at::Tensor();
      SPARGE_ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> parts,
                              AllGather(flat, "broadcast"));
      if (env_.rank == root) continue;
      std::vector<uint8_t>& bytes = parts[root];
      if (static_cast<int64_t>(bytes.size()) != bucket.bytes) {
        broken_ = true;
        return absl::InvalidArgumentError(absl::StrFormat(
            "rank %d: Broadcast: root %d sent %d bytes for a bucket of %d bytes: the ranks' "
            "tensor lists differ in shape or dtype",
            env_.rank, root, bytes.size(), bucket.bytes));
      }
      const at::ScalarType dtype = bucket.members.front()->scalar_type();
      const int64_t numel = bucket.bytes / static_cast<int64_t>(c10::elementSize(dtype));
      Unflatten(at::from_blob(bytes.data(), {numel}, at::TensorOptions().dtype(dtype)), bucket);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<double> AllReduceSum(double value) {
    at::Tensor t = at::tensor({value}, at::TensorOptions().dtype(at::kDouble));
    SPARGE_ASSIGN_OR_RETURN(std::vector<std::vector<uint8_t>> parts, AllGather(t, "sum"));
    double sum = 0;
    for (const std::vector<uint8_t>& p : parts) {
      double v = 0;
      if (p.size() != sizeof(v)) {
        broken_ = true;
        return absl::InternalError("AllReduceSum: a rank sent a malformed value");
      }
      std::memcpy(&v, p.data(), sizeof(v));
      sum += v;
    }
    return sum;
  }

  absl::Status Barrier() { return AllGather(at::Tensor(), "barrier").status(); }

 private:
  absl::Status CheckTensors(const std::vector<at::Tensor>& tensors, absl::string_view op) {
    if (broken_) {
      return absl::FailedPreconditionError(absl::StrCat(
          op, ": an earlier collective failed; the communicator cannot be used again"));
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (!t.defined() || !at::isFloatingType(t.scalar_type())) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: tensor %d must be a defined floating-point tensor", op, i));
      }
      if (t.device().type() != device_.type() ||
          (device_.has_index() && t.device().index() != device_.index())) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: tensor %d is on %s, the communicator on %s", op, i,
                            t.device().str(), device_.str()));
      }
    }
    return absl::OkStatus();
  }

  // Every rank's bytes of `local` (undefined: none), in rank order. Each call uses fresh keys;
  // the last rank to finish reading deletes them, so the store holds one round at a time.
  absl::StatusOr<std::vector<std::vector<uint8_t>>> AllGather(const at::Tensor& local,
                                                              absl::string_view what) {
    if (broken_) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, ": an earlier collective failed; the communicator cannot be used again"));
    }
    const std::string prefix = absl::StrCat("sparge/", round_++, "/");
    auto header_key = [&](int q) { return absl::StrCat(prefix, q); };
    auto chunk_key = [&](int q, size_t c) { return absl::StrCat(prefix, q, "/", c); };
    auto num_chunks = [](size_t bytes) {
      return (bytes + kStoreChunkBytes - 1) / kStoreChunkBytes;
    };
    try {
      std::vector<std::vector<uint8_t>> parts(env_.world_size);
      std::vector<uint8_t>& mine = parts[env_.rank];
      if (local.defined()) {
        at::Tensor c = local.contiguous();
        const auto* p = static_cast<const uint8_t*>(c.data_ptr());
        mine.assign(p, p + c.nbytes());
      }
      // Chunks first, then the header with the byte count: a rank that sees the header finds
      // every chunk in place.
      for (size_t c = 0; c < num_chunks(mine.size()); ++c) {
        const size_t begin = c * kStoreChunkBytes;
        const size_t end = std::min(mine.size(), begin + kStoreChunkBytes);
        store_->set(chunk_key(env_.rank, c),
                    std::vector<uint8_t>(mine.begin() + begin, mine.begin() + end));
      }
      // The header names the collective too, so that ranks that issued different ones (a bug
      // of the caller, e.g. one rank stopping a step early) fail instead of mixing up data.
      store_->set(header_key(env_.rank), BytesOf(absl::StrCat(what, "|", mine.size())));
      std::vector<std::string> headers;
      for (int q = 0; q < env_.world_size; ++q) headers.push_back(header_key(q));
      store_->wait(headers, ToMillis(timeout_));
      std::vector<size_t> sizes(env_.world_size, mine.size());
      std::string other_op;
      int other_rank = -1;
      for (int q = 0; q < env_.world_size; ++q) {
        if (q == env_.rank) continue;
        const std::vector<uint8_t> bytes = store_->get(header_key(q));
        const std::string header(bytes.begin(), bytes.end());
        const size_t bar = header.rfind('|');
        if (bar == std::string::npos || !absl::SimpleAtoi(header.substr(bar + 1), &sizes[q])) {
          broken_ = true;
          rounds_complete_ = false;
          return absl::InternalError(
              absl::StrCat("rank ", env_.rank, ": ", what, ": malformed header from rank ", q));
        }
        if (header.compare(0, bar, what.data(), what.size()) != 0 && other_rank < 0) {
          other_op = header.substr(0, bar);
          other_rank = q;
        }
        parts[q].reserve(sizes[q]);
        for (size_t c = 0; c < num_chunks(sizes[q]); ++c) {
          const std::vector<uint8_t> chunk = store_->get(chunk_key(q, c));
          parts[q].insert(parts[q].end(), chunk.begin(), chunk.end());
        }
      }
      if (store_->add(prefix + "done", 1) == env_.world_size) {
        // The last rank to finish this round: everyone else is done with its keys.
        for (int q = 0; q < env_.world_size; ++q) {
          for (size_t c = 0; c < num_chunks(sizes[q]); ++c) store_->deleteKey(chunk_key(q, c));
          store_->deleteKey(header_key(q));
        }
        store_->deleteKey(prefix + "done");
        store_->set(kFinishedRoundKey, BytesOf(absl::StrCat(round_ - 1)));
      }
      if (other_rank >= 0) {
        broken_ = true;
        return absl::InternalError(absl::StrFormat(
            "rank %d: %s: rank %d was in %s: the ranks issued different collectives", env_.rank,
            what, other_rank, other_op));
      }
      return parts;
    } catch (...) {
      broken_ = true;
      rounds_complete_ = false;
      return StatusFromCurrentException(what, env_.rank);
    }
  }

  // Rank 0 hosts the store: leaving while another rank is still inside the last round would cut
  // that rank off (it would fail with UNAVAILABLE). Waits until the last round's last reader
  // has marked it finished, at most the timeout.
  void WaitForPeersToFinish() {
    const std::string want = absl::StrCat(round_ - 1);
    const absl::Time deadline = absl::Now() + timeout_;
    try {
      while (absl::Now() < deadline) {
        if (store_->check({kFinishedRoundKey})) {
          const std::vector<uint8_t> v = store_->get(kFinishedRoundKey);
          if (std::string(v.begin(), v.end()) == want) return;
        }
        absl::SleepFor(absl::Milliseconds(2));
      }
    } catch (const std::exception&) {
      // The store is going away with this object either way.
    }
  }

  static std::vector<uint8_t> BytesOf(const std::string& s) {
    return std::vector<uint8_t>(s.begin(), s.end());
  }
  static constexpr const char* kFinishedRoundKey = "sparge/finished_round";
  // TCPStore's server refuses values over 8 MiB; larger buffers travel in chunks of this size.
  static constexpr size_t kStoreChunkBytes = size_t{4} << 20;

  // NCCL all-reduce (root < 0, then mean) or broadcast from `root`, a few buckets in flight.
  absl::Status NcclBuckets(const std::vector<Bucket>& buckets, int root) {
#if SPARGE_HAVE_NCCL
    constexpr size_t kInFlight = 4;  // bounds the extra memory to ~4 buckets
    struct Pending {
      const Bucket* bucket;
      at::Tensor flat;
      c10::intrusive_ptr<c10d::Work> work;
    };
    std::deque<Pending> pending;
    auto finish_oldest = [&]() -> absl::Status {
      Pending p = std::move(pending.front());
      pending.pop_front();
      try {
        p.work->wait(ToMillis(timeout_));
        if (root < 0) p.flat.div_(env_.world_size);
        Unflatten(p.flat, *p.bucket);
      } catch (...) {
        broken_ = true;
        return StatusFromCurrentException(root < 0 ? "NCCL all-reduce" : "NCCL broadcast",
                                          env_.rank);
      }
      return absl::OkStatus();
    };
    for (const Bucket& bucket : buckets) {
      try {
        std::vector<at::Tensor> io = {Flatten(bucket)};
        c10::intrusive_ptr<c10d::Work> work;
        if (root < 0) {
          c10d::AllreduceOptions opts;
          opts.reduceOp = c10d::ReduceOp::SUM;
          opts.timeout = ToMillis(timeout_);
          work = nccl_->allreduce(io, opts);
        } else {
          c10d::BroadcastOptions opts;
          opts.rootRank = root;
          opts.timeout = ToMillis(timeout_);
          work = nccl_->broadcast(io, opts);
        }
        pending.push_back({&bucket, io[0], std::move(work)});
      } catch (...) {
        broken_ = true;
        return StatusFromCurrentException("NCCL collective", env_.rank);
      }
      if (pending.size() >= kInFlight) SPARGE_RETURN_IF_ERROR(finish_oldest());
    }
    while (!pending.empty()) SPARGE_RETURN_IF_ERROR(finish_oldest());
    return absl::OkStatus();
#else
    return absl::FailedPreconditionError("this build has no NCCL");
#endif
  }

  const DistEnv env_;
  const c10::Device device_;
  const absl::Duration timeout_;
  const int64_t bucket_bytes_;
  c10::intrusive_ptr<c10d::Store> store_;
#if SPARGE_HAVE_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_;
#endif
  uint64_t round_ = 0;
  // No collective can be issued after one failed (the ranks may disagree on where they are).
  bool broken_ = false;
  // Every store round so far completed on this rank (a later check may still have failed):
  // the peers can finish theirs, so rank 0 keeps the store up for them when it leaves.
  bool rounds_complete_ = true;
};

Communicator::Communicator(const DistEnv& env, std::unique_ptr<Impl> impl)
    : env_(env), impl_(std::move(impl)) {}

Communicator::~Communicator() = default;

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::Create(const DistEnv& env,
                                                                   c10::Device device,
                                                                   absl::Duration timeout,
                                                                   int64_t bucket_bytes) {
  if (env.world_size < 1 || env.rank < 0 || env.rank >= env.world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Communicator: rank must be in [0, world_size-1], got rank %d of %d",
                        env.rank, env.world_size));
  }
  if (bucket_bytes <= 0) {
    return absl::InvalidArgumentError("Communicator: bucket_bytes must be positive");
  }
  if (timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("Communicator: timeout must be positive");
  }
  if (!device.is_cpu() && !device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Communicator: device must be cpu or cuda, got ", device.str()));
  }
  if (env.world_size == 1) {
    return std::unique_ptr<Communicator>(new Communicator(env, nullptr));
  }
  if (device.is_cuda() && !device.has_index()) {
    device = c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(env.local_rank));
  }
  auto impl = std::make_unique<Impl>(env, device, timeout, bucket_bytes);
  SPARGE_RETURN_IF_ERROR(impl->Connect());
  return std::unique_ptr<Communicator>(new Communicator(env, std::move(impl)));
}

absl::Status Communicator::AllReduceMean(std::vector<at::Tensor>& tensors) {
  if (impl_ == nullptr) return absl::OkStatus();
  return impl_->AllReduceMean(tensors);
}

absl::Status Communicator::Broadcast(std::vector<at::Tensor>& tensors, int root) {
  if (impl_ == nullptr) {
    if (root != 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Broadcast: root must be in [0, 0], got %d", root));
    }
    return absl::OkStatus();
  }
  return impl_->Broadcast(tensors, root);
}

absl::StatusOr<double> Communicator::AllReduceSum(double value) {
  if (impl_ == nullptr) return value;
  return impl_->AllReduceSum(value);
}

absl::Status Communicator::Barrier() {
  if (impl_ == nullptr) return absl::OkStatus();
  return impl_->Barrier();
}

}  // namespace sparge::trainer
