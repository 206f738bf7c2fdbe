// Time source injected into the executor and the service so that tests can drive time by hand
// (server/testing/fake_clock.h). Use Clock::Real() in production. Implementations are thread-safe.
#pragma once

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sparge::server {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;

  // The process-wide wall clock (absl::Now()); never deleted.
  static const Clock* Real();
};

}  // namespace sparge::server
