#include "engine/video/internal/ustar_writer.h"

#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace sparge::engine::video_internal {
namespace {

constexpr size_t kBlockSize = 512;
// Field offsets and widths of the POSIX.1-1988 ustar header.
constexpr size_t kNameOffset = 0, kNameSize = 100;
constexpr size_t kModeOffset = 100, kUidOffset = 108, kGidOffset = 116, kIdFieldSize = 8;
constexpr size_t kSizeOffset = 124, kMtimeOffset = 136, kNumberFieldSize = 12;
constexpr size_t kChecksumOffset = 148, kChecksumSize = 8;
constexpr size_t kTypeflagOffset = 156;
constexpr size_t kMagicOffset = 257, kVersionOffset = 263;
// 11 octal digits: the largest size the 12-byte field holds with its terminating NUL.
constexpr uint64_t kMaxFileSize = (uint64_t{1} << 33) - 1;

// Writes `value` as zero-padded octal filling width-1 bytes, then a NUL.
void PutOctal(char* field, size_t width, uint64_t value) {
  std::snprintf(field, width, "%0*llo", static_cast<int>(width - 1),
                static_cast<unsigned long long>(value));
}

}  // namespace

absl::Status UstarWriter::AddFile(absl::string_view name, absl::string_view data) {
  if (name.empty() || name.size() > kNameSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("tar entry name must be 1..", kNameSize, " bytes, got '", name, "'"));
  }
  if (data.size() > kMaxFileSize) {
    return absl::InvalidArgumentError(absl::StrCat("tar entry '", name, "' is ", data.size(),
                                                   " bytes; ustar allows less than 8 GiB"));
  }
  char header[kBlockSize];
  std::memset(header, 0, sizeof(header));
  std::memcpy(header + kNameOffset, name.data(), name.size());
  PutOctal(header + kModeOffset, kIdFieldSize, 0644);
  PutOctal(header + kUidOffset, kIdFieldSize, 0);
  PutOctal(header + kGidOffset, kIdFieldSize, 0);
  PutOctal(header + kSizeOffset, kNumberFieldSize, data.size());
  PutOctal(header + kMtimeOffset, kNumberFieldSize, 0);
  header[kTypeflagOffset] = '0';
  std::memcpy(header + kMagicOffset, "ustar", 6);  // including its NUL
  std::memcpy(header + kVersionOffset, "00", 2);
  // The checksum is taken with its own field read as spaces, then stored as six octal digits,
  // a NUL and a space (the historical layout every tar reader accepts).
  std::memset(header + kChecksumOffset, ' ', kChecksumSize);
  unsigned int checksum = 0;
  for (char c : header) checksum += static_cast<unsigned char>(c);
  std::snprintf(header + kChecksumOffset, kChecksumSize, "%06o", checksum);
  header[kChecksumOffset + 7] = ' ';

  archive_.append(header, kBlockSize);
  archive_.append(data.data(), data.size());
  archive_.append((kBlockSize - data.size() % kBlockSize) % kBlockSize, '\0');
  return absl::OkStatus();
}

std::string UstarWriter::Finish() {
  archive_.append(2 * kBlockSize, '\0');
  std::string archive = std::move(archive_);
  archive_.clear();
  return archive;
}

}  // namespace sparge::engine::video_internal
