// The one place where absl::Status becomes grpc::Status (and back, for clients): the canonical
// codes are numerically identical, messages pass through unchanged. Pure functions; thread-safe.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace sparge::server {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);
// "OK", "INVALID_ARGUMENT", ...: the label value of sparge_requests_total.
std::string StatusCodeName(absl::StatusCode code);

}  // namespace sparge::server
