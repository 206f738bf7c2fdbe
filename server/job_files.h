// POSIX file helpers of the job store: mkdir -p, atomic whole-file writes (tmp + rename), small
// reads, directory listing, removal, an advisory directory lock, and an append-only writer.
// std::filesystem is deliberately avoided: it crashes in processes that load LibTorch (a symbol
// clash). Stateless functions are thread-safe; an AppendOnlyFile is used by one thread at a time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sparge::server {

// "<what> <path>: <strerror(errno)>" with a status code fitting errno (NOT_FOUND for ENOENT,
// PERMISSION_DENIED for EACCES, RESOURCE_EXHAUSTED for ENOSPC, else INTERNAL).
absl::Status ErrnoStatus(int error_number, absl::string_view what, absl::string_view path);

// Creates `path` and its missing parents (mode 0755); OK if it already is a directory.
absl::Status MakeDirectories(const std::string& path);

// Writes `data` to "<path>.tmp" then renames it over `path`: readers see the old or the new file,
// never a partial one (safe against a process crash; not fsync'ed, so not against power loss).
absl::Status WriteFileAtomically(const std::string& path, absl::string_view data);

// The whole file; INVALID_ARGUMENT if it is larger than max_bytes.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, int64_t max_bytes);

// Names of the entries of `dir` (not "." or ".."), unsorted.
absl::StatusOr<std::vector<std::string>> ListDirectory(const std::string& dir);

// Unlinks `path`; OK if it does not exist.
absl::Status RemoveFile(const std::string& path);

// Removes `path` and, for a directory, everything below it (symbolic links are removed, not
// followed); OK if it does not exist.
absl::Status RemoveTree(const std::string& path);

// Whether `path` exists (following symbolic links).
bool PathExists(const std::string& path);

// Size in bytes of a regular file.
absl::StatusOr<int64_t> FileSize(const std::string& path);

// An exclusive advisory lock (flock) on a file, held until destruction. Move-only.
class FileLock {
 public:
  // FAILED_PRECONDITION when another open file description holds it (another process, or
  // another FileLock in this one).
  static absl::StatusOr<FileLock> TryAcquire(const std::string& path);
  FileLock(FileLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  FileLock& operator=(FileLock&& other) noexcept;
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  ~FileLock();

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

// A file written front to back, then published with Commit() (rename onto its final name) or
// dropped with Abandon() / destruction (the partial file is removed). Move-only.
class AppendOnlyFile {
 public:
  // Creates (truncates) `temp_path`.
  static absl::StatusOr<AppendOnlyFile> Create(std::string temp_path);
  AppendOnlyFile(AppendOnlyFile&& other) noexcept;
  AppendOnlyFile& operator=(AppendOnlyFile&& other) noexcept;
  AppendOnlyFile(const AppendOnlyFile&) = delete;
  AppendOnlyFile& operator=(const AppendOnlyFile&) = delete;
  ~AppendOnlyFile();  // Abandon()

  absl::Status Append(absl::string_view data);
  // Closes the file and renames it to `final_path`.
  absl::Status Commit(const std::string& final_path);
  void Abandon();
  int64_t size() const { return size_; }

 private:
  AppendOnlyFile(std::string temp_path, int fd) : temp_path_(std::move(temp_path)), fd_(fd) {}
  std::string temp_path_;
  int fd_ = -1;
  int64_t size_ = 0;
};

}  // namespace sparge::server
