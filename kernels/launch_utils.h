// Host helper for the kernel launchers: raises a kernel's dynamic shared-memory limit once per
// (kernel, device, size) instead of on every launch. Thread-safe (mutex-guarded cache).
#pragma once

#include <cuda_runtime_api.h>

#include <mutex>
#include <set>
#include <tuple>

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

}  // namespace sparge::kernels::detail
