// Turns decoded RGB frames into a file the client can play: H.264 MP4 (faststart) or a ustar
// archive of PNG frames, entirely in memory through the FFmpeg libraries. Torch-free.
// Thread-safe: calls share no state besides FFmpeg's own (itself thread-safe).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/pipeline.h"

namespace sparge::engine {

enum class VideoContainer { kMp4, kPngTar };
const char* ToString(VideoContainer container);

struct EncodedVideo {
  std::string data;          // the whole file
  std::string content_type;  // "video/mp4" or "application/x-tar"
};

// Largest inputs EncodeVideo accepts; the server's own limits are tighter.
inline constexpr int kMaxVideoFps = 240;
inline constexpr int kMaxVideoDimension = 16384;  // pixels, width and height
inline constexpr int kMaxVideoFrames = 100000;    // PNG names stay frame_00000..frame_99999

// Encodes `frames` (uint8 RGB, frame-major, see VideoFrames) at `fps` frames per second.
//  - kMp4: H.264 (libx264 when available, else another working H.264 encoder), yuv420p with
//    BT.709 limited-range tags, CRF 20 / preset veryfast, moov atom first so players can start
//    before the download ends. Every input frame is in the file. Width and height must be even.
//  - kPngTar: POSIX ustar archive of frame_00000.png, frame_00001.png, ... (lossless RGB).
//    Bytes depend only on the frames (entry mtimes are 0), so equal inputs give equal archives.
// INVALID_ARGUMENT for empty frames, an rgb buffer whose size disagrees with the dimensions,
// fps outside [1, kMaxVideoFps], sizes over the limits above, or odd sizes for MP4;
// FAILED_PRECONDITION when this FFmpeg build has no usable H.264 encoder; RESOURCE_EXHAUSTED
// when out of memory; INTERNAL (with FFmpeg's error text) when FFmpeg fails otherwise.
absl::StatusOr<EncodedVideo> EncodeVideo(const VideoFrames& frames, int fps,
                                         VideoContainer container);

}  // namespace sparge::engine
