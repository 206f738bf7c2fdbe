// Builds a POSIX ustar archive (regular files only) in memory; used for PNG-frame output.
// Usage: UstarWriter w; SPARGE_RETURN_IF_ERROR(w.AddFile("a.png", png)); auto tar = w.Finish();
// Thread-compatible.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace sparge::engine::video_internal {

class UstarWriter {
 public:
  // Appends a regular file (mode 0644, uid/gid 0, mtime 0 so archives are reproducible).
  // INVALID_ARGUMENT if the name is empty, longer than 100 bytes or the data is 8 GiB or more
  // (the limits of ustar's name and size fields).
  absl::Status AddFile(absl::string_view name, absl::string_view data);

  // Appends the end-of-archive marker (two zero blocks) and returns the archive. The writer is
  // empty afterwards.
  std::string Finish();

 private:
  std::string archive_;
};

}  // namespace sparge::engine::video_internal
