// Client side of the standard gRPC health check (grpc.health.v1.Health/Check), for sparge-cli's
// `health` command and the tests. Encodes the two tiny messages by hand, so no generated health
// stubs are needed. Thread-safe (no shared state).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"

namespace sparge::server {

// grpc.health.v1.HealthCheckResponse.ServingStatus.
enum class HealthStatus { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };
const char* ToString(HealthStatus status);

// Asks the server about `service` ("" = the server as a whole). Transport failures (no server,
// timeout) come back as the call's status.
absl::StatusOr<HealthStatus> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                         const std::string& service, absl::Duration timeout);

}  // namespace sparge::server
