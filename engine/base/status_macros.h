// Status helpers shared by every module: early-return macros for absl::Status / StatusOr.
// Usage: SPARGE_RETURN_IF_ERROR(DoThing());  SPARGE_ASSIGN_OR_RETURN(auto x, MakeThing());
// Header-only, no Torch; safe to include from server/ and trainer/.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SPARGE_STATUS_CONCAT_INNER(a, b) a##b
#define SPARGE_STATUS_CONCAT(a, b) SPARGE_STATUS_CONCAT_INNER(a, b)

#define SPARGE_RETURN_IF_ERROR(expr)               \
  do {                                             \
    const ::absl::Status _sparge_status = (expr);  \
    if (!_sparge_status.ok()) return _sparge_status; \
  } while (0)

#define SPARGE_ASSIGN_OR_RETURN(lhs, rexpr) \
  SPARGE_ASSIGN_OR_RETURN_IMPL(SPARGE_STATUS_CONCAT(_sparge_statusor_, __LINE__), lhs, rexpr)

#define SPARGE_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
