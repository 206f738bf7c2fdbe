// A dependency-free PNG encoder for 8-bit RGB images: zlib "stored" (uncompressed) deflate blocks,
// so no compression library is needed. Used for PNG-frame output in builds without FFmpeg (the
// GPU machine's minimal build); FFmpeg's compressing PNG encoder is used otherwise.
// Thread-safe: pure function.
#pragma once

#include <cstdint>
#include <string>

namespace sparge::engine::video_internal {

// rgb: height rows of width * 3 bytes. Returns the PNG file (color type 2, bit depth 8, no
// interlace, filter type 0 on every row). Width and height must be in [1, 2^31).
std::string EncodePngStored(const uint8_t* rgb, int width, int height);

}  // namespace sparge::engine::video_internal
