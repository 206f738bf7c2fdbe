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
