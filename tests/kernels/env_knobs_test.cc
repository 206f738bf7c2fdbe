// The kernel launchers' environment knobs (kernels/env_knobs.h): defaults, accepted values, and a
// report on stderr (once per variable and value) for everything else.
#include "kernels/env_knobs.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

namespace sparge::kernels::detail {
namespace {

struct Env {
  Env(const char* name, const char* value) : name_(name) {
    if (value != nullptr) setenv(name, value, 1); else unsetenv(name);
  }
  ~Env() { unsetenv(name_); }
  const char* name_;
};

TEST(EnvKnobs, IntUnsetOrEmptyIsTheDefault) {
  Env e("SPARGE_TEST_INT", nullptr);
  EXPECT_EQ(EnvInt("SPARGE_TEST_INT", 32, 0, 100), 32);
  Env e2("SPARGE_TEST_INT", "");
  EXPECT_EQ(EnvInt("SPARGE_TEST_INT", 32, 0, 100), 32);
}

TEST(EnvKnobs, IntInRangeIsTaken) {
  Env e("SPARGE_TEST_INT", "0");
  EXPECT_EQ(EnvInt("SPARGE_TEST_INT", 32, 0, 100), 0);
  Env e2("SPARGE_TEST_INT", "100");
  EXPECT_EQ(EnvInt("SPARGE_TEST_INT", 32, 0, 100), 100);
}

TEST(EnvKnobs, BadIntIsReportedOnceAndMeansTheDefault) {
  for (const char* bad : {"4s", "abc", "-1", "101", "99999999999999999999"}) {
    Env e("SPARGE_TEST_BAD", bad);
    ::testing::internal::CaptureStderr();
    EXPECT_EQ(EnvInt("SPARGE_TEST_BAD", 32, 0, 100), 32) << bad;
    EXPECT_EQ(EnvInt("SPARGE_TEST_BAD", 32, 0, 100), 32) << bad;
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find(std::string("SPARGE_TEST_BAD=") + bad), std::string::npos) << err;
    EXPECT_NE(err.find("the default 32"), std::string::npos) << err;
    EXPECT_EQ(err.find("SPARGE_TEST_BAD", err.find('\n')), std::string::npos) << "reported twice: " << err;
  }
}

TEST(EnvKnobs, Flag) {
  Env e("SPARGE_TEST_FLAG", nullptr);
  EXPECT_FALSE(EnvFlagOn("SPARGE_TEST_FLAG"));
  Env e1("SPARGE_TEST_FLAG", "1");
  EXPECT_TRUE(EnvFlagOn("SPARGE_TEST_FLAG"));
  Env e0("SPARGE_TEST_FLAG", "0");
  ::testing::internal::CaptureStderr();
  EXPECT_FALSE(EnvFlagOn("SPARGE_TEST_FLAG"));
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  Env ey("SPARGE_TEST_FLAG", "yes");
  ::testing::internal::CaptureStderr();
  EXPECT_FALSE(EnvFlagOn("SPARGE_TEST_FLAG"));
  EXPECT_NE(::testing::internal::GetCapturedStderr().find("allowed: 0 or 1"), std::string::npos);
}

TEST(EnvKnobs, Choice) {
  static const char* const kAllowed[] = {"fused", "split", nullptr};
  Env e("SPARGE_TEST_CHOICE", "split");
  ::testing::internal::CaptureStderr();
  EXPECT_TRUE(EnvIs("SPARGE_TEST_CHOICE", "split", kAllowed));
  EXPECT_FALSE(EnvIs("SPARGE_TEST_CHOICE", "fused", kAllowed));
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  Env e2("SPARGE_TEST_CHOICE", "splt");
  ::testing::internal::CaptureStderr();
  EXPECT_FALSE(EnvIs("SPARGE_TEST_CHOICE", "split", kAllowed));
  EXPECT_NE(::testing::internal::GetCapturedStderr().find("allowed: fused, split"), std::string::npos);
}

}  // namespace
}  // namespace sparge::kernels::detail
