// Owning handles for the FFmpeg objects the video encoder uses, and FFmpeg error codes as
// absl::Status. Internal to engine/video: wrap every allocation immediately, then use .get().
// Thread-compatible: each handle is owned by one encode call.
#pragma once

#include <memory>
#include <string>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavformat/avio.h>
#include <libavutil/dict.h>
#include <libavutil/error.h>
#include <libavutil/frame.h>
#include <libavutil/mem.h>
#include <libswscale/swscale.h>
}

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace sparge::engine::video_internal {

struct CodecContextDeleter {
  void operator()(AVCodecContext* context) const { avcodec_free_context(&context); }
};
struct FrameDeleter {
  void operator()(AVFrame* frame) const { av_frame_free(&frame); }
};
struct PacketDeleter {
  void operator()(AVPacket* packet) const { av_packet_free(&packet); }
};
struct SwsContextDeleter {
  void operator()(SwsContext* context) const { sws_freeContext(context); }
};
// For muxer contexts whose pb is a custom AVIOContext owned by an AvioContextPtr: freeing the
// format context leaves pb alone (AVFMT_FLAG_CUSTOM_IO), so declare the AvioContextPtr first.
struct OutputFormatContextDeleter {
  void operator()(AVFormatContext* context) const { avformat_free_context(context); }
};
// For contexts made by avio_alloc_context: the I/O buffer may have been reallocated by FFmpeg,
// so it is freed through the context rather than through the pointer originally passed in.
struct AvioContextDeleter {
  void operator()(AVIOContext* context) const {
    if (context == nullptr) return;
    av_freep(&context->buffer);
    avio_context_free(&context);
  }
};
struct DictionaryDeleter {
  void operator()(AVDictionary* dictionary) const { av_dict_free(&dictionary); }
};

using CodecContextPtr = std::unique_ptr<AVCodecContext, CodecContextDeleter>;
using FramePtr = std::unique_ptr<AVFrame, FrameDeleter>;
using PacketPtr = std::unique_ptr<AVPacket, PacketDeleter>;
using SwsContextPtr = std::unique_ptr<SwsContext, SwsContextDeleter>;
using OutputFormatContextPtr = std::unique_ptr<AVFormatContext, OutputFormatContextDeleter>;
using AvioContextPtr = std::unique_ptr<AVIOContext, AvioContextDeleter>;

// FFmpeg's text for an AVERROR code, e.g. "Invalid argument".
inline std::string AvErrorText(int error_code) {
  char text[AV_ERROR_MAX_STRING_SIZE] = {0};
  if (av_strerror(error_code, text, sizeof(text)) < 0) {
    return "unknown FFmpeg error " + std::to_string(error_code);
  }
  return text;
}

// "<what>: <FFmpeg text>" with a code that says whose fault it is: out of memory is
// RESOURCE_EXHAUSTED, everything else INTERNAL (inputs were validated before FFmpeg saw them).
inline absl::Status FfmpegError(int error_code, absl::string_view what) {
  std::string message = std::string(what) + ": " + AvErrorText(error_code);
  if (error_code == AVERROR(ENOMEM)) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

}  // namespace sparge::engine::video_internal
