// Range checks that build the INVALID_ARGUMENT messages shared by config and request validation,
// e.g. "width: must be a multiple of 16 in [64, 1280], got 17". Internal to server/.
// Pure functions; thread-safe.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace sparge::server::internal {

inline absl::Status OutOfRange(absl::string_view field, absl::string_view rule,
                               absl::string_view got) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": must be ", rule, ", got ", got));
}

// lo <= value <= hi.
inline absl::Status CheckIntInRange(absl::string_view field, int64_t value, int64_t lo,
                                    int64_t hi) {
  if (value >= lo && value <= hi) return absl::OkStatus();
  return OutOfRange(field, absl::StrCat("in [", lo, ", ", hi, "]"), absl::StrCat(value));
}

// value % multiple == 0 and lo <= value <= hi.
inline absl::Status CheckMultipleInRange(absl::string_view field, int64_t value, int64_t multiple,
                                         int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi && multiple > 0 && value % multiple == 0) {
    return absl::OkStatus();
  }
  return OutOfRange(field, absl::StrCat("a multiple of ", multiple, " in [", lo, ", ", hi, "]"),
                    absl::StrCat(value));
}

// value == 4k+1 and lo <= value <= hi: the VAE compresses time by 4 after the first frame.
inline absl::Status CheckFourKPlusOne(absl::string_view field, int64_t value, int64_t lo,
                                      int64_t hi) {
  if (value >= lo && value <= hi && value % 4 == 1) return absl::OkStatus();
  return OutOfRange(field, absl::StrCat("4k+1 in [", lo, ", ", hi, "]"), absl::StrCat(value));
}

// lo <= value <= hi, or lo < value <= hi when lo_open. NaN always fails.
inline absl::Status CheckFloatInRange(absl::string_view field, double value, double lo, double hi,
                                      bool lo_open = false) {
  const bool lo_ok = lo_open ? value > lo : value >= lo;
  if (lo_ok && value <= hi) return absl::OkStatus();
  return OutOfRange(field, absl::StrCat("in ", lo_open ? "(" : "[", lo, ", ", hi, "]"),
                    std::isnan(value) ? std::string("nan") : absl::StrCat(value));
}

}  // namespace sparge::server::internal
