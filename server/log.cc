#include "server/log.h"

#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sparge::server {
namespace {

void Write(char severity, absl::string_view message) {
  // One fwrite per line: stderr is unbuffered, so concurrent lines do not interleave mid-line.
  const std::string line =
      absl::StrCat(std::string(1, severity), " ",
                   absl::FormatTime("%Y-%m-%d %H:%M:%E3S", absl::Now(), absl::LocalTimeZone()),
                   " sparge] ", message, "\n");
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace

void LogInfo(absl::string_view message) { Write('I', message); }
void LogWarning(absl::string_view message) { Write('W', message); }
void LogError(absl::string_view message) { Write('E', message); }

}  // namespace sparge::server
