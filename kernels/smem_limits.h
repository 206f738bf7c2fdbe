// The dynamic shared-memory limit each kernel has been raised to, per device (no CUDA calls, so
// the policy is tested on any machine: tests/kernels/smem_limits_test.cc).
//
// cudaFuncAttributeMaxDynamicSharedMemorySize *sets* the limit, lower as well as higher, and a
// launch asking for more than it fails with cudaErrorInvalidValue. Kernels whose dynamic size
// varies with the problem (the backward's schedule kernels: nq + 1 histogram ints, plus the key
// tiles' counts) must therefore only ever raise it: a cache of the sizes already set, the first
// version, let a smaller size lower the limit and then skipped the larger size it had seen
// before, and that launch failed (a backward at a long sequence after one at a short one).
#pragma once

#include <map>
#include <utility>

namespace sparge::kernels::detail {

class DynamicSmemLimits {
 public:
  // True when `bytes` is more than the limit set so far for (func, device): the caller sets the
  // attribute to `bytes` and, on success, calls Raised.
  bool NeedsRaise(const void* func, int device, int bytes) const {
    const auto it = limits_.find({func, device});
    return it == limits_.end() || bytes > it->second;
  }
  void Raised(const void* func, int device, int bytes) {
    int& limit = limits_[{func, device}];
    if (bytes > limit) limit = bytes;
  }

 private:
  std::map<std::pair<const void*, int>, int> limits_;
};

}  // namespace sparge::kernels::detail
