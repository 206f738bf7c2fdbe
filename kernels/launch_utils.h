// Host helpers for the kernel launchers: raising a kernel's dynamic shared-memory limit once per
// (kernel, device, size) instead of on every launch (thread-safe, mutex-guarded cache), and
// launching the kernels of a chain with programmatic dependent launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

namespace sparge::kernels::detail {

inline cudaError_t SetMaxDynamicSmem(const void* func, int bytes) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::set<std::tuple<const void*, int, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(func, dev, bytes);
  if (done.count(key)) return cudaSuccess;
  err = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.insert(key);
  return err;
}

// Stream-ordered workspace (the backward's fp32 dQ accumulator, the persistent forward's item
// counter) from a per-device memory pool that keeps its memory (like a caching allocator): after
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

// Programmatic dependent launch (Hopper). With SPARGE_PDL=1 the kernels of a chain (mask
// predictor, attention forward, backward) are launched with programmatic stream serialisation:
// the driver may schedule a kernel's CTAs while the previous kernel in the stream drains, which
// hides the launch latency and ramp between the chain's short kernels. Every kernel launched
// through LaunchChained() starts with GridDependencySync() (device_utils.cuh), which waits until
// the previous kernel has completed and its writes are visible before anything touches global
// memory, so results are identical either way. Off by default until measured (kernels/NOTES.md).
inline bool PdlEnabled() {
  const char* env = std::getenv("SPARGE_PDL");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx, with programmatic
// stream serialisation when PdlEnabled(). Returns the launch error.
template <typename... Params, typename... Args>
cudaError_t LaunchChained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = PdlEnabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace sparge::kernels::detail
