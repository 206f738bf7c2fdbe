#include "engine/video/internal/png_writer.h"

#include <algorithm>
#include <array>

namespace sparge::engine::video_internal {
namespace {

const std::array<uint32_t, 256>& CrcTable() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  return table;
}

uint32_t Crc32(const std::string& data, size_t begin) {
  uint32_t c = 0xFFFFFFFFu;
  const auto& table = CrcTable();
  for (size_t i = begin; i < data.size(); ++i) {
    c = table[(c ^ static_cast<uint8_t>(data[i])) & 0xFF] ^ (c >> 8);
  }
  return c ^ 0xFFFFFFFFu;
}

void PutBe32(std::string* out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out->push_back(static_cast<char>((v >> shift) & 0xFF));
}

// Appends one chunk: length, type, data, CRC over type and data.
void PutChunk(std::string* out, const char* type, const std::string& data) {
  PutBe32(out, static_cast<uint32_t>(data.size()));
  const size_t crc_begin = out->size();
  out->append(type, 4);
  out->append(data);
  PutBe32(out, Crc32(*out, crc_begin));
}

}  // namespace

std::string EncodePngStored(const uint8_t* rgb, int width, int height) {
  const size_t row_bytes = static_cast<size_t>(width) * 3;
  // The filtered image: each row is filter type 0 (None) followed by its pixels.
  std::string raw;
  raw.reserve((row_bytes + 1) * height);
  for (int y = 0; y < height; ++y) {
    raw.push_back('\0');
    raw.append(reinterpret_cast<const char*>(rgb + y * row_bytes), row_bytes);
  }

  // zlib stream: header (deflate, 32K window, no dictionary, check bits), stored blocks of at most
  // 65535 bytes, Adler-32 of the uncompressed bytes.
  std::string z;
  z.reserve(raw.size() + raw.size() / 65535 * 5 + 16);
  z.push_back(static_cast<char>(0x78));
  z.push_back(static_cast<char>(0x01));
  size_t pos = 0;
  do {
    const size_t len = std::min<size_t>(65535, raw.size() - pos);
    const bool final_block = pos + len == raw.size();
    z.push_back(final_block ? 1 : 0);  // BFINAL, BTYPE = 00 (stored), padded to the byte
    z.push_back(static_cast<char>(len & 0xFF));
    z.push_back(static_cast<char>(len >> 8));
    z.push_back(static_cast<char>(~len & 0xFF));
    z.push_back(static_cast<char>((~len >> 8) & 0xFF));
    z.append(raw, pos, len);
    pos += len;
  } while (pos < raw.size());
  uint32_t a = 1, b = 0;
  for (char ch : raw) {
    a = (a + static_cast<uint8_t>(ch)) % 65521;
    b = (b + a) % 65521;
  }
  PutBe32(&z, (b << 16) | a);

  std::string png("\x89PNG\r\n\x1a\n", 8);
  std::string ihdr;
  PutBe32(&ihdr, static_cast<uint32_t>(width));
  PutBe32(&ihdr, static_cast<uint32_t>(height));
  ihdr.append({8, 2, 0, 0, 0});  // bit depth 8, RGB, deflate, adaptive filtering, no interlace
  PutChunk(&png, "IHDR", ihdr);
  PutChunk(&png, "IDAT", z);
  PutChunk(&png, "IEND", "");
  return png;
}

}  // namespace sparge::engine::video_internal
