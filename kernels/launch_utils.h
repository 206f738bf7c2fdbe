// Host helpers for the kernel launchers: raising a kernel's dynamic shared-memory limit only when a
// launch needs more than it was raised to (per kernel and device, thread-safe), the
// launchers' stream-ordered workspace pool, the SM count and a launch wrapper. CUDA sources only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>

#include "kernels/env_knobs.h"
#include "kernels/smem_limits.h"

namespace sparge::kernels::detail {

inline cudaError_t SetMaxDynamicSmem(const void* func, int bytes) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static DynamicSmemLimits limits;  // raised only, never lowered (smem_limits.h says why)
  std::lock_guard<std::mutex> lock(mu);
  if (!limits.NeedsRaise(func, dev, bytes)) return cudaSuccess;
  err = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) limits.Raised(func, dev, bytes);
  return err;
}

// A second stream per device (non-blocking, created on first use, kept) for work a launcher can
// overlap with its own chain on the caller's stream, ordered by OrderAfter at both ends.
inline cudaError_t SideStream(cudaStream_t* out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 64) return cudaErrorInvalidDevice;
  static std::mutex mu;
  static cudaStream_t streams[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (streams[dev] == nullptr) {
    err = cudaStreamCreateWithFlags(&streams[dev], cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      streams[dev] = nullptr;
      (void)cudaGetLastError();  // returned here; not left for the next launch's check
      return err;
    }
  }
  *out = streams[dev];
  return cudaSuccess;
}

// Work enqueued on `later` from now on runs after everything enqueued on `earlier` so far (an
// event of its own per call, so concurrent callers on other streams cannot mix their points up;
// works under stream capture as a fork or join).
inline cudaError_t OrderAfter(cudaStream_t later, cudaStream_t earlier) {
  cudaEvent_t ev = nullptr;
  cudaError_t err = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  if (err != cudaSuccess) return err;
  err = cudaEventRecord(ev, earlier);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(later, ev, 0);
  const cudaError_t destroy_err = cudaEventDestroy(ev);  // legal once the wait is enqueued
  return err != cudaSuccess ? err : destroy_err;
}

// Stream-ordered workspace (the backward's fp32 dQ accumulator and work list) from a per-device
// memory pool that keeps its memory (like a caching allocator): after
// the first call of a shape, allocation costs no driver mapping. Free with cudaFreeAsync.
inline cudaError_t AllocFromLauncherPool(size_t bytes, cudaStream_t stream, void** out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static cudaMemPool_t pools[64] = {};
  if (dev >= 64) return cudaErrorInvalidDevice;
  cudaMemPool_t pool;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (pools[dev] == nullptr) {
      cudaMemPoolProps props = {};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = dev;
      err = cudaMemPoolCreate(&pools[dev], &props);
      if (err != cudaSuccess) return err;
      uint64_t keep = UINT64_MAX;
      err = cudaMemPoolSetAttribute(pools[dev], cudaMemPoolAttrReleaseThreshold, &keep);
      if (err != cudaSuccess) return err;
    }
    pool = pools[dev];
  }
  return cudaMallocFromPoolAsync(out, bytes, pool, stream);
}

// A per-device buffer that is all zeros whenever no launch holds it (the backward's persistent dQ
// accumulator and queue, SPARGE_BWD_FUSED_DQ=1: its kernels restore the zeros, so no call zeroes it). A
// lease holds the device's mutex until Finish; on `stream` it waits for the previous lease's
// work (an event), grows the buffer (stream-ordered free, allocation from the launcher pool and
// memset) and zeroes it again if the previous lease did not end with restored zeros. Not under
// stream capture (events recorded in a capture are not real ones): ok() is false there and the
// caller takes its other path. Capacity only grows; the buffer is kept for the process's life.
class ZeroedLease {
 public:
  ZeroedLease(size_t bytes, cudaStream_t stream) : stream_(stream) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone) {
      (void)cudaGetLastError();
      return;
    }
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return;
    static std::mutex mus[64];
    static Buffer bufs[64];
    lock_ = std::unique_lock<std::mutex>(mus[dev]);
    buf_ = &bufs[dev];
    err_ = Prepare(bytes);
    if (err_ != cudaSuccess) buf_->dirty = true;
  }
  bool ok() const { return buf_ != nullptr && err_ == cudaSuccess; }
  cudaError_t error() const { return err_; }
  void* ptr() const { return buf_->ptr; }
  // restored: everything enqueued on the stream since the lease began succeeded and leaves the
  // buffer all zeros again. Records the event the next lease waits for.
  cudaError_t Finish(bool restored) {
    if (buf_ == nullptr) return cudaSuccess;
    buf_->dirty = buf_->dirty || !restored || err_ != cudaSuccess;
    cudaError_t err = cudaSuccess;
    if (buf_->done == nullptr) err = cudaEventCreateWithFlags(&buf_->done, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventRecord(buf_->done, stream_);
    if (err != cudaSuccess) {  // the next lease cannot order itself after this one: drop the event
      buf_->dirty = true;
      if (buf_->done != nullptr) (void)cudaEventDestroy(buf_->done);
      buf_->done = nullptr;
    }
    buf_ = nullptr;
    lock_ = {};
    return err;
  }
  ~ZeroedLease() {
    if (buf_ != nullptr) (void)Finish(false);
  }
  ZeroedLease(const ZeroedLease&) = delete;
  ZeroedLease& operator=(const ZeroedLease&) = delete;

 private:
  struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    bool dirty = false;
    cudaEvent_t done = nullptr;
  };
  cudaError_t Prepare(size_t bytes) {
    cudaError_t err = cudaSuccess;
    if (buf_->done != nullptr) err = cudaStreamWaitEvent(stream_, buf_->done, 0);
    if (err != cudaSuccess) return err;
    if (buf_->bytes < bytes) {
      if (buf_->ptr != nullptr) err = cudaFreeAsync(buf_->ptr, stream_);
      buf_->ptr = nullptr;
      buf_->bytes = 0;
      if (err != cudaSuccess) return err;
      err = AllocFromLauncherPool(bytes, stream_, &buf_->ptr);
      if (err != cudaSuccess) {
        buf_->ptr = nullptr;
        return err;
      }
      buf_->bytes = bytes;
      buf_->dirty = true;
    }
    if (buf_->dirty) {
      err = cudaMemsetAsync(buf_->ptr, 0, buf_->bytes, stream_);
      if (err != cudaSuccess) return err;
      buf_->dirty = false;
    }
    return cudaSuccess;
  }
  cudaStream_t stream_;
  std::unique_lock<std::mutex> lock_;
  Buffer* buf_ = nullptr;
  cudaError_t err_ = cudaSuccess;
};

// Streaming multiprocessors of the current device (132 if the query fails).
inline int SmCount() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return n;
}

// kernel<<<grid, block, smem, stream>>>(args...); returns the launch error. (Programmatic
// dependent launch was tried here and measured no gain: kernels/NOTES.md, 2026-12-05.)
template <typename... Params, typename... Args>
cudaError_t LaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace sparge::kernels::detail
