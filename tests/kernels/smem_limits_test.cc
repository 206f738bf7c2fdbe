// The dynamic shared-memory limit policy of the kernel launchers (kernels/smem_limits.h): raised
// only, never lowered, per kernel and device.
#include "kernels/smem_limits.h"

#include <gtest/gtest.h>

namespace sparge::kernels::detail {
namespace {

int kernel_a, kernel_b;  // stand-ins for kernel addresses

TEST(DynamicSmemLimits, FirstLaunchRaises) {
  DynamicSmemLimits limits;
  EXPECT_TRUE(limits.NeedsRaise(&kernel_a, 0, 900));
  limits.Raised(&kernel_a, 0, 900);
  EXPECT_FALSE(limits.NeedsRaise(&kernel_a, 0, 900));
}

// The sequence that failed with the per-size cache (a backward at a short sequence between two at
// a longer one): the smaller size must not lower the limit, so the larger one stays valid.
TEST(DynamicSmemLimits, SmallerSizeNeverLowersTheLimit) {
  DynamicSmemLimits limits;
  limits.Raised(&kernel_a, 0, 900);
  EXPECT_FALSE(limits.NeedsRaise(&kernel_a, 0, 132));
  EXPECT_FALSE(limits.NeedsRaise(&kernel_a, 0, 900));
  EXPECT_TRUE(limits.NeedsRaise(&kernel_a, 0, 901));
  limits.Raised(&kernel_a, 0, 64 * 1024);
  limits.Raised(&kernel_a, 0, 1000);  // a late, smaller report keeps the larger limit
  EXPECT_FALSE(limits.NeedsRaise(&kernel_a, 0, 64 * 1024));
  EXPECT_TRUE(limits.NeedsRaise(&kernel_a, 0, 64 * 1024 + 4));
}

TEST(DynamicSmemLimits, KernelsAndDevicesAreSeparate) {
  DynamicSmemLimits limits;
  limits.Raised(&kernel_a, 0, 100 * 1024);
  EXPECT_TRUE(limits.NeedsRaise(&kernel_b, 0, 1024));
  EXPECT_TRUE(limits.NeedsRaise(&kernel_a, 1, 1024));
  EXPECT_FALSE(limits.NeedsRaise(&kernel_a, 0, 1024));
}

}  // namespace
}  // namespace sparge::kernels::detail
