#include "engine/video/video_encoder.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <utility>
#include <vector>

#if SPARGE_HAVE_FFMPEG
extern "C" {
#include <libavutil/imgutils.h>
#include <libavutil/opt.h>
#include <libavutil/pixfmt.h>
}
#endif

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"
#if SPARGE_HAVE_FFMPEG
#include "engine/video/internal/ffmpeg_handles.h"
#endif
#include "engine/video/internal/png_writer.h"
#include "engine/video/internal/ustar_writer.h"

namespace sparge::engine {

#if SPARGE_HAVE_FFMPEG
using video_internal::AvioContextPtr;
using video_internal::CodecContextPtr;
using video_internal::FfmpegError;
using video_internal::FramePtr;
using video_internal::OutputFormatContextPtr;
using video_internal::PacketPtr;
using video_internal::SwsContextPtr;
#endif

const char* ToString(VideoContainer container) {
  switch (container) {
    case VideoContainer::kMp4:
      return "MP4";
    case VideoContainer::kPngTar:
      return "PNG_TAR";
  }
  return "UNKNOWN";
}

namespace {

#if SPARGE_HAVE_FFMPEG
// x264 quality: CRF 20 is visually near-transparent for generated video; veryfast keeps a
// 17-frame 256x256 clip at a few tens of milliseconds, small next to the diffusion itself.
constexpr char kX264Preset[] = "veryfast";
constexpr char kX264Crf[] = "20";
// Encoders without CRF get a bitrate instead: 0.2 bit per pixel is roughly what CRF 20 spends on
// smooth generated content (256x256 at 16 fps -> 210 kbit/s), with a floor for tiny clips.
constexpr double kFallbackBitsPerPixel = 0.2;
constexpr int64_t kFallbackMinBitRate = 200'000;
constexpr int kAvioBufferSize = 1 << 16;
#endif

absl::Status ValidateFrames(const VideoFrames& frames, int fps) {
  if (frames.num_frames <= 0 || frames.width <= 0 || frames.height <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("video frames must be non-empty, got num_frames=", frames.num_frames,
                     " width=", frames.width, " height=", frames.height));
  }
  if (frames.num_frames > kMaxVideoFrames || frames.width > kMaxVideoDimension ||
      frames.height > kMaxVideoDimension) {
    return absl::InvalidArgumentError(absl::StrCat(
        "video too large: num_frames=", frames.num_frames, " (max ", kMaxVideoFrames,
        "), width=", frames.width, " height=", frames.height, " (max ", kMaxVideoDimension, ")"));
  }
  // With the limits above the product fits in int64 (< 2^47).
  const int64_t expected = int64_t{frames.num_frames} * frames.height * frames.width * 3;
  if (static_cast<int64_t>(frames.rgb.size()) != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rgb has ", frames.rgb.size(), " bytes but num_frames*height*width*3 = ", frames.num_frames,
        "*", frames.height, "*", frames.width, "*3 = ", expected));
  }
  if (fps < 1 || fps > kMaxVideoFps) {
    return absl::InvalidArgumentError(
        absl::StrCat("fps must be in [1, ", kMaxVideoFps, "], got ", fps));
  }
  return absl::OkStatus();
}

const uint8_t* FramePixels(const VideoFrames& frames, int index) {
  return frames.rgb.data() + static_cast<size_t>(index) * frames.height * frames.width * 3;
}

#if SPARGE_HAVE_FFMPEG

// ---------------------------------------------------------------------------------------------
// In-memory, seekable output for the MP4 muxer.
//
// faststart needs a second pass: after writing mdat the mov muxer re-opens its own output for
// reading (through AVFormatContext::io_open) and shifts the data to make room for moov at the
// front. MemoryFile serves both the writing context and that read-back context.

struct MemoryFile {
  std::string data;
  int64_t write_position = 0;
};

int64_t SeekIn(const std::string& data, int64_t* position, int64_t offset, int whence) {
  const int64_t size = static_cast<int64_t>(data.size());
  int64_t target;
  switch (whence & ~AVSEEK_FORCE) {
    case AVSEEK_SIZE:
      return size;
    case SEEK_SET:
      target = offset;
      break;
    case SEEK_CUR:
      target = *position + offset;
      break;
    case SEEK_END:
      target = size + offset;
      break;
    default:
      return AVERROR(EINVAL);
  }
  if (target < 0) return AVERROR(EINVAL);
  *position = target;
  return target;
}

// avio write callback. FFmpeg 5.x declares the buffer non-const; 6.1+ declares it const.
int WriteToMemoryFile(void* opaque, uint8_t* buffer, int size) {
  auto* file = static_cast<MemoryFile*>(opaque);
  try {
    const size_t end = static_cast<size_t>(file->write_position) + static_cast<size_t>(size);
    if (end > file->data.size()) file->data.resize(end);  // seeks past the end leave zeros
    std::memcpy(&file->data[file->write_position], buffer, size);
  } catch (const std::bad_alloc&) {
    return AVERROR(ENOMEM);
  }
  file->write_position += size;
  return size;
}

int64_t SeekMemoryFileForWrite(void* opaque, int64_t offset, int whence) {
  auto* file = static_cast<MemoryFile*>(opaque);
  return SeekIn(file->data, &file->write_position, offset, whence);
}

struct MemoryFileReader {
  const MemoryFile* file;
  int64_t read_position = 0;
};

int ReadFromMemoryFile(void* opaque, uint8_t* buffer, int size) {
  auto* reader = static_cast<MemoryFileReader*>(opaque);
  const int64_t available = static_cast<int64_t>(reader->file->data.size()) - reader->read_position;
  if (available <= 0) return AVERROR_EOF;
  const int count = static_cast<int>(std::min<int64_t>(available, size));
  std::memcpy(buffer, reader->file->data.data() + reader->read_position, count);
  reader->read_position += count;
  return count;
}

int64_t SeekMemoryFileForRead(void* opaque, int64_t offset, int whence) {
  auto* reader = static_cast<MemoryFileReader*>(opaque);
  return SeekIn(reader->file->data, &reader->read_position, offset, whence);
}

// AVFormatContext::io_open for the muxer: only read-back of its own output is supported.
int OpenMemoryFileForRead(AVFormatContext* context, AVIOContext** pb, const char* url, int flags,
                          AVDictionary** options) {
  if (flags & AVIO_FLAG_WRITE) return AVERROR(EPERM);
  auto* file = static_cast<const MemoryFile*>(context->opaque);
  auto* reader = new (std::nothrow) MemoryFileReader{file};
  auto* buffer = static_cast<uint8_t*>(av_malloc(kAvioBufferSize));
  AVIOContext* avio = (reader && buffer)
                          ? avio_alloc_context(buffer, kAvioBufferSize, 0, reader,
                                               ReadFromMemoryFile, nullptr, SeekMemoryFileForRead)
                          : nullptr;
  if (avio == nullptr) {
    av_free(buffer);
    delete reader;
    return AVERROR(ENOMEM);
  }
  *pb = avio;
  return 0;
}

int CloseMemoryFileReader(AVFormatContext* context, AVIOContext* pb) {
  delete static_cast<MemoryFileReader*>(pb->opaque);
  AvioContextPtr owned(pb);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Encoding helpers.

// Drains every packet the encoder has ready; `sink` consumes each one. Returns OK at EAGAIN
// (needs more input) and at EOF (fully flushed).
template <typename Sink>
absl::Status DrainPackets(AVCodecContext* codec, AVPacket* packet, Sink&& sink) {
  while (true) {
    const int rc = avcodec_receive_packet(codec, packet);
    if (rc == AVERROR(EAGAIN) || rc == AVERROR_EOF) return absl::OkStatus();
    if (rc < 0) return FfmpegError(rc, "avcodec_receive_packet");
    absl::Status status = sink(packet);
    av_packet_unref(packet);
    SPARGE_RETURN_IF_ERROR(status);
  }
}

absl::StatusOr<FramePtr> AllocateFrame(AVPixelFormat format, int width, int height) {
  FramePtr frame(av_frame_alloc());
  if (!frame) return absl::ResourceExhaustedError("av_frame_alloc failed");
  frame->format = format;
  frame->width = width;
  frame->height = height;
  const int rc = av_frame_get_buffer(frame.get(), 0);
  if (rc < 0) return FfmpegError(rc, "av_frame_get_buffer");
  return frame;
}

// H.264 encoders in preference order: libx264 (quality, CRF), other software encoders (e.g.
// libopenh264), then hardware ones, which usually cannot open without their device.
std::vector<const AVCodec*> H264EncoderCandidates() {
  std::vector<const AVCodec*> software, hardware;
  const AVCodec* x264 = avcodec_find_encoder_by_name("libx264");
  void* iterator = nullptr;
  while (const AVCodec* codec = av_codec_iterate(&iterator)) {
    if (!av_codec_is_encoder(codec) || codec->id != AV_CODEC_ID_H264 || codec == x264) continue;
    (codec->capabilities & AV_CODEC_CAP_HARDWARE ? hardware : software).push_back(codec);
  }
  std::vector<const AVCodec*> candidates;
  if (x264 != nullptr) candidates.push_back(x264);
  candidates.insert(candidates.end(), software.begin(), software.end());
  candidates.insert(candidates.end(), hardware.begin(), hardware.end());
  return candidates;
}

bool SupportsPixelFormat(const AVCodec* codec, AVPixelFormat format) {
  if (codec->pix_fmts == nullptr) return true;  // unknown: let avcodec_open2 decide
  for (const AVPixelFormat* f = codec->pix_fmts; *f != AV_PIX_FMT_NONE; ++f) {
    if (*f == format) return true;
  }
  return false;
}

absl::StatusOr<CodecContextPtr> OpenH264Encoder(int width, int height, int fps,
                                                bool global_header) {
  std::vector<std::string> failures;
  for (const AVCodec* codec : H264EncoderCandidates()) {
    if (!SupportsPixelFormat(codec, AV_PIX_FMT_YUV420P)) {
      failures.push_back(absl::StrCat(codec->name, ": no yuv420p"));
      continue;
    }
    CodecContextPtr context(avcodec_alloc_context3(codec));
    if (!context) return absl::ResourceExhaustedError("avcodec_alloc_context3 failed");
    context->width = width;
    context->height = height;
    context->pix_fmt = AV_PIX_FMT_YUV420P;
    context->time_base = AVRational{1, fps};
    context->framerate = AVRational{fps, 1};
    context->sample_aspect_ratio = AVRational{1, 1};
    // Tagged BT.709 limited range, matching the RGB->YUV matrix used below, so that players do
    // not guess (they would assume BT.601 for small frames and shift the colours).
    context->color_range = AVCOL_RANGE_MPEG;
    context->colorspace = AVCOL_SPC_BT709;
    context->color_primaries = AVCOL_PRI_BT709;
    context->color_trc = AVCOL_TRC_BT709;
    if (global_header) context->flags |= AV_CODEC_FLAG_GLOBAL_HEADER;
    AVDictionary* options = nullptr;
    const AVClass* priv_class = codec->priv_class;  // av_opt_find wants a mutable pointer to it
    if (priv_class != nullptr &&
        av_opt_find(&priv_class, "crf", nullptr, 0, AV_OPT_SEARCH_FAKE_OBJ) != nullptr) {
      av_dict_set(&options, "crf", kX264Crf, 0);
      av_dict_set(&options, "preset", kX264Preset, 0);
    } else {
      context->bit_rate = std::max<int64_t>(
          kFallbackMinBitRate, static_cast<int64_t>(kFallbackBitsPerPixel * width * height * fps));
    }
    const int rc = avcodec_open2(context.get(), codec, &options);
    av_dict_free(&options);  // whatever the encoder did not consume
    if (rc >= 0) return context;
    failures.push_back(absl::StrCat(codec->name, ": ", video_internal::AvErrorText(rc)));
  }
  if (failures.empty()) {
    return absl::FailedPreconditionError(
        "this FFmpeg build has no H.264 encoder; install libavcodec with libx264 "
        "(Debian: libavcodec59 from the main archive includes it)");
  }
  return absl::FailedPreconditionError(
      absl::StrCat("no H.264 encoder could be opened (", absl::StrJoin(failures, "; "), ")"));
}

absl::StatusOr<EncodedVideo> EncodeMp4(const VideoFrames& frames, int fps) {
  // yuv420p stores one chroma sample per 2x2 block; H.264 encoders reject odd sizes. Padding
  // would silently change the size the client asked for, so odd sizes are an input error.
  if (frames.width % 2 != 0 || frames.height % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MP4 (H.264 yuv420p) needs even width and height, got ", frames.width, "x", frames.height));
  }

  MemoryFile file;
  AvioContextPtr avio;
  {
    auto* buffer = static_cast<uint8_t*>(av_malloc(kAvioBufferSize));
    if (buffer == nullptr) return absl::ResourceExhaustedError("av_malloc failed");
    avio.reset(avio_alloc_context(buffer, kAvioBufferSize, /*write_flag=*/1, &file, nullptr,
                                  WriteToMemoryFile, SeekMemoryFileForWrite));
    if (!avio) {
      av_free(buffer);
      return absl::ResourceExhaustedError("avio_alloc_context failed");
    }
  }
  // Declared after avio: destroyed first, while its pb is still alive.
  OutputFormatContextPtr muxer;
  {
    AVFormatContext* raw = nullptr;
    const int rc = avformat_alloc_output_context2(&raw, nullptr, "mp4", nullptr);
    if (rc < 0) return FfmpegError(rc, "avformat_alloc_output_context2(mp4)");
    muxer.reset(raw);
  }
  muxer->pb = avio.get();
  muxer->flags |= AVFMT_FLAG_CUSTOM_IO;
  muxer->opaque = &file;
  muxer->io_open = OpenMemoryFileForRead;
  muxer->io_close2 = CloseMemoryFileReader;

  SPARGE_ASSIGN_OR_RETURN(CodecContextPtr encoder,
                          OpenH264Encoder(frames.width, frames.height, fps,
                                          (muxer->oformat->flags & AVFMT_GLOBALHEADER) != 0));

  AVStream* stream = avformat_new_stream(muxer.get(), nullptr);
  if (stream == nullptr) return absl::ResourceExhaustedError("avformat_new_stream failed");
  int rc = avcodec_parameters_from_context(stream->codecpar, encoder.get());
  if (rc < 0) return FfmpegError(rc, "avcodec_parameters_from_context");
  stream->time_base = encoder->time_base;  // a hint; the muxer may pick a finer one
  stream->avg_frame_rate = AVRational{fps, 1};

  {
    AVDictionary* options = nullptr;
    av_dict_set(&options, "movflags", "+faststart", 0);
    rc = avformat_write_header(muxer.get(), &options);
    av_dict_free(&options);
    if (rc < 0) return FfmpegError(rc, "avformat_write_header(mp4)");
  }

  SwsContextPtr converter(sws_getContext(frames.width, frames.height, AV_PIX_FMT_RGB24,
                                         frames.width, frames.height, AV_PIX_FMT_YUV420P,
                                         SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INP,
                                         nullptr, nullptr, nullptr));
  if (!converter) return absl::InternalError("sws_getContext(rgb24 -> yuv420p) failed");
  const int* bt709 = sws_getCoefficients(SWS_CS_ITU709);
  if (sws_setColorspaceDetails(converter.get(), bt709, /*srcRange=*/1, bt709, /*dstRange=*/0,
                               /*brightness=*/0, /*contrast=*/1 << 16,
                               /*saturation=*/1 << 16) < 0) {
    return absl::InternalError("sws_setColorspaceDetails(BT.709) failed");
  }

  SPARGE_ASSIGN_OR_RETURN(FramePtr frame,
                          AllocateFrame(AV_PIX_FMT_YUV420P, frames.width, frames.height));
  PacketPtr packet(av_packet_alloc());
  if (!packet) return absl::ResourceExhaustedError("av_packet_alloc failed");

  int64_t packets_written = 0;
  auto write_packet = [&](AVPacket* p) -> absl::Status {
    av_packet_rescale_ts(p, encoder->time_base, stream->time_base);
    p->stream_index = stream->index;
    const int write_rc = av_interleaved_write_frame(muxer.get(), p);
    if (write_rc < 0) return FfmpegError(write_rc, "av_interleaved_write_frame");
    ++packets_written;
    return absl::OkStatus();
  };

  const int rgb_stride = frames.width * 3;
  for (int f = 0; f < frames.num_frames; ++f) {
    // The encoder may still hold a reference to the previous picture (lookahead).
    rc = av_frame_make_writable(frame.get());
    if (rc < 0) return FfmpegError(rc, "av_frame_make_writable");
    const uint8_t* source[1] = {FramePixels(frames, f)};
    sws_scale(converter.get(), source, &rgb_stride, 0, frames.height, frame->data, frame->linesize);
    frame->pts = f;
    rc = avcodec_send_frame(encoder.get(), frame.get());
    if (rc < 0) return FfmpegError(rc, absl::StrCat("avcodec_send_frame(frame ", f, ")"));
    SPARGE_RETURN_IF_ERROR(DrainPackets(encoder.get(), packet.get(), write_packet));
  }
  rc = avcodec_send_frame(encoder.get(), nullptr);  // flush: delayed frames come out now
  if (rc < 0) return FfmpegError(rc, "avcodec_send_frame(flush)");
  SPARGE_RETURN_IF_ERROR(DrainPackets(encoder.get(), packet.get(), write_packet));
  if (packets_written != frames.num_frames) {
    return absl::InternalError(absl::StrCat("H.264 encoder ", encoder->codec->name, " produced ",
                                            packets_written, " packets for ", frames.num_frames,
                                            " frames"));
  }
  rc = av_write_trailer(muxer.get());
  if (rc < 0) return FfmpegError(rc, "av_write_trailer(mp4)");

  muxer.reset();
  return EncodedVideo{std::move(file.data), "video/mp4"};
}

absl::StatusOr<EncodedVideo> EncodePngTar(const VideoFrames& frames, int fps) {
  const AVCodec* codec = avcodec_find_encoder(AV_CODEC_ID_PNG);
  if (codec == nullptr) {
    return absl::FailedPreconditionError("this FFmpeg build has no PNG encoder");
  }
  CodecContextPtr encoder(avcodec_alloc_context3(codec));
  if (!encoder) return absl::ResourceExhaustedError("avcodec_alloc_context3(png) failed");
  encoder->width = frames.width;
  encoder->height = frames.height;
  encoder->pix_fmt = AV_PIX_FMT_RGB24;
  encoder->time_base = AVRational{1, fps};
  encoder->framerate = AVRational{fps, 1};
  // Paeth prediction: a few percent slower than none, markedly smaller on smooth images.
  av_opt_set(encoder->priv_data, "pred", "paeth", 0);
  int rc = avcodec_open2(encoder.get(), codec, nullptr);
  if (rc < 0) return FfmpegError(rc, "avcodec_open2(png)");

  SPARGE_ASSIGN_OR_RETURN(FramePtr frame,
                          AllocateFrame(AV_PIX_FMT_RGB24, frames.width, frames.height));
  PacketPtr packet(av_packet_alloc());
  if (!packet) return absl::ResourceExhaustedError("av_packet_alloc failed");

  video_internal::UstarWriter archive;
  int entries = 0;
  auto add_entry = [&](AVPacket* p) -> absl::Status {
    char name[32];
    std::snprintf(name, sizeof(name), "frame_%05d.png", entries++);
    return archive.AddFile(name, absl::string_view(reinterpret_cast<const char*>(p->data),
                                                   static_cast<size_t>(p->size)));
  };
  const int rgb_stride = frames.width * 3;
  for (int f = 0; f < frames.num_frames; ++f) {
    rc = av_frame_make_writable(frame.get());
    if (rc < 0) return FfmpegError(rc, "av_frame_make_writable");
    av_image_copy_plane(frame->data[0], frame->linesize[0], FramePixels(frames, f), rgb_stride,
                        rgb_stride, frames.height);
    frame->pts = f;
    rc = avcodec_send_frame(encoder.get(), frame.get());
    if (rc < 0) return FfmpegError(rc, absl::StrCat("avcodec_send_frame(png frame ", f, ")"));
    SPARGE_RETURN_IF_ERROR(DrainPackets(encoder.get(), packet.get(), add_entry));
  }
  rc = avcodec_send_frame(encoder.get(), nullptr);
  if (rc < 0) return FfmpegError(rc, "avcodec_send_frame(png flush)");
  SPARGE_RETURN_IF_ERROR(DrainPackets(encoder.get(), packet.get(), add_entry));
  if (entries != frames.num_frames) {
    return absl::InternalError(absl::StrCat("PNG encoder produced ", entries, " images for ",
                                            frames.num_frames, " frames"));
  }
  return EncodedVideo{archive.Finish(), "application/x-tar"};
}

#else  // !SPARGE_HAVE_FFMPEG: the minimal build (no FFmpeg on the machine)

absl::StatusOr<EncodedVideo> EncodeMp4(const VideoFrames&, int) {
  return absl::FailedPreconditionError(
      "this build has no FFmpeg, so MP4 (H.264) output is unavailable; request PNG frames "
      "(output_format PNG) or rebuild with the FFmpeg development packages");
}

// Uncompressed PNGs (video_internal::EncodePngStored): larger files, same pixels.
absl::StatusOr<EncodedVideo> EncodePngTar(const VideoFrames& frames, int) {
  video_internal::UstarWriter archive;
  for (int f = 0; f < frames.num_frames; ++f) {
    char name[32];
    std::snprintf(name, sizeof(name), "frame_%05d.png", f);
    SPARGE_RETURN_IF_ERROR(archive.AddFile(
        name, video_internal::EncodePngStored(FramePixels(frames, f), frames.width,
                                              frames.height)));
  }
  return EncodedVideo{archive.Finish(), "application/x-tar"};
}

#endif  // SPARGE_HAVE_FFMPEG

}  // namespace

absl::StatusOr<EncodedVideo> EncodeVideo(const VideoFrames& frames, int fps,
                                         VideoContainer container) {
  SPARGE_RETURN_IF_ERROR(ValidateFrames(frames, fps));
  // FFmpeg is C and never throws, but our buffers can (bad_alloc on a huge clip): keep the
  // module's no-exceptions contract at this edge.
  try {
    switch (container) {
      case VideoContainer::kMp4:
        return EncodeMp4(frames, fps);
      case VideoContainer::kPngTar:
        return EncodePngTar(frames, fps);
    }
    return absl::InvalidArgumentError(
        absl::StrCat("unknown video container ", static_cast<int>(container)));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory while encoding video");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("video encoding failed: ", e.what()));
  }
}

}  // namespace sparge::engine
