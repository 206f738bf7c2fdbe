// Minimal timestamped logging to stderr for the server (Debian's Abseil predates absl/log).
// Usage: LogInfo("listening on " + address). Thread-safe: each line is written whole.
#pragma once

#include "absl/strings/string_view.h"

namespace sparge::server {

void LogInfo(absl::string_view message);
void LogWarning(absl::string_view message);
void LogError(absl::string_view message);

}  // namespace sparge::server
