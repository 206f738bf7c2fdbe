// Tests for engine/video/video_encoder.h: MP4 files are decoded back with libavformat/libavcodec
// from a real file on disk (independent of the encoder's in-memory I/O) and compared with the
// input; PNG tar archives are parsed here byte by byte and one image is decoded and compared.

#include "engine/video/video_encoder.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libswscale/swscale.h>
}

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "engine/video/internal/png_writer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sparge::engine {
namespace {

using ::testing::HasSubstr;

constexpr double kPi = 3.14159265358979323846;

// A smooth pattern that moves from frame to frame: low-frequency sines per channel, shifted by
// the frame index, so that lossy coding stays accurate and a dropped or reordered frame shows.
VideoFrames MovingGradient(int num_frames, int height, int width) {
  VideoFrames frames;
  frames.num_frames = num_frames;
  frames.height = height;
  frames.width = width;
  frames.rgb.resize(static_cast<size_t>(num_frames) * height * width * 3);
  size_t i = 0;
  for (int f = 0; f < num_frames; ++f) {
    const double phase = 2.0 * kPi * f / num_frames;
    for (int y = 0; y < height; ++y) {
      for (int x = 0; x < width; ++x) {
        const double u = static_cast<double>(x) / width, v = static_cast<double>(y) / height;
        frames.rgb[i++] = static_cast<uint8_t>(128 + 100 * std::sin(2 * kPi * u + phase));
        frames.rgb[i++] = static_cast<uint8_t>(128 + 100 * std::cos(2 * kPi * v - phase));
        frames.rgb[i++] = static_cast<uint8_t>(128 + 90 * std::sin(2 * kPi * (u + v) + 2 * phase));
      }
    }
  }
  return frames;
}

// Pseudo-random bytes: the worst case for lossless coding, and exact comparison catches any
// channel swap or row-stride mistake that a smooth pattern might hide.
VideoFrames NoiseFrames(int num_frames, int height, int width, uint32_t seed) {
  VideoFrames frames = MovingGradient(num_frames, height, width);
  uint32_t state = seed;
  for (uint8_t& value : frames.rgb) {
    state = state * 1664525u + 1013904223u;
    value = static_cast<uint8_t>(state >> 24);
  }
  return frames;
}

double Psnr(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  double squared_error = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    squared_error += d * d;
  }
  const double mse = squared_error / a.size();
  return mse == 0 ? 1e9 : 10.0 * std::log10(255.0 * 255.0 / mse);
}

// ---- MP4 read-back ---------------------------------------------------------------------------

struct DecodedVideo {
  std::string codec_name;
  int width = 0;
  int height = 0;
  AVRational avg_frame_rate{0, 1};
  AVRational r_frame_rate{0, 1};
  int64_t stream_nb_frames = 0;  // from the container's sample table
  int decoded_frames = 0;        // pictures the decoder produced
  std::vector<uint8_t> rgb;      // decoded pictures as RGB24, frame-major
  std::vector<std::string> top_level_boxes;
};

std::vector<std::string> TopLevelBoxes(const std::string& mp4) {
  std::vector<std::string> boxes;
  size_t offset = 0;
  while (offset + 8 <= mp4.size()) {
    const auto* p = reinterpret_cast<const uint8_t*>(mp4.data() + offset);
    uint64_t size = (uint64_t{p[0]} << 24) | (p[1] << 16) | (p[2] << 8) | p[3];
    boxes.emplace_back(mp4.data() + offset + 4, 4);
    if (size == 1 && offset + 16 <= mp4.size()) {  // 64-bit largesize follows the type
      size = 0;
      for (int k = 0; k < 8; ++k) size = (size << 8) | p[8 + k];
    }
    if (size < 8) break;
    offset += size;
  }
  return boxes;
}

std::string TempPath(const char* suffix) {
  const char* dir = std::getenv("TMPDIR");
  std::string pattern = std::string(dir ? dir : "/tmp") + "/sparge_video_test_XXXXXX" + suffix;
  std::vector<char> buffer(pattern.begin(), pattern.end());
  buffer.push_back('\0');
  const int fd = mkstemps(buffer.data(), static_cast<int>(std::strlen(suffix)));
  if (fd < 0) return "";
  close(fd);
  return buffer.data();
}

// Decodes every picture of the first video stream, converting to RGB24 with the matrix the
// stream is tagged with (what a careful player does).
::testing::AssertionResult DecodeMp4(const std::string& mp4, DecodedVideo* out) {
  out->top_level_boxes = TopLevelBoxes(mp4);
  const std::string path = TempPath(".mp4");
  if (path.empty()) return ::testing::AssertionFailure() << "mkstemps failed";
  {
    FILE* file = std::fopen(path.c_str(), "wb");
    if (file == nullptr) return ::testing::AssertionFailure() << "cannot write " << path;
    std::fwrite(mp4.data(), 1, mp4.size(), file);
    std::fclose(file);
  }
  struct Cleanup {
    std::string path;
    AVFormatContext* format = nullptr;
    AVCodecContext* codec = nullptr;
    AVPacket* packet = nullptr;
    AVFrame* frame = nullptr;
    SwsContext* sws = nullptr;
    ~Cleanup() {
      sws_freeContext(sws);
      av_frame_free(&frame);
      av_packet_free(&packet);
      avcodec_free_context(&codec);
      avformat_close_input(&format);
      std::remove(path.c_str());
    }
  } c{path};

  if (avformat_open_input(&c.format, path.c_str(), nullptr, nullptr) < 0) {
    return ::testing::AssertionFailure() << "libavformat cannot open the MP4";
  }
  if (avformat_find_stream_info(c.format, nullptr) < 0) {
    return ::testing::AssertionFailure() << "avformat_find_stream_info failed";
  }
  const AVCodec* decoder = nullptr;
  const int index = av_find_best_stream(c.format, AVMEDIA_TYPE_VIDEO, -1, -1, &decoder, 0);
  if (index < 0 || decoder == nullptr) return ::testing::AssertionFailure() << "no video stream";
  AVStream* stream = c.format->streams[index];
  out->codec_name = avcodec_get_name(stream->codecpar->codec_id);
  out->width = stream->codecpar->width;
  out->height = stream->codecpar->height;
  out->avg_frame_rate = stream->avg_frame_rate;
  out->r_frame_rate = stream->r_frame_rate;
  out->stream_nb_frames = stream->nb_frames;

  c.codec = avcodec_alloc_context3(decoder);
  avcodec_parameters_to_context(c.codec, stream->codecpar);
  if (avcodec_open2(c.codec, decoder, nullptr) < 0) {
    return ::testing::AssertionFailure() << "cannot open decoder " << decoder->name;
  }
  c.packet = av_packet_alloc();
  c.frame = av_frame_alloc();

  auto receive_all = [&]() -> bool {
    while (avcodec_receive_frame(c.codec, c.frame) == 0) {
      const int w = c.frame->width, h = c.frame->height;
      if (c.sws == nullptr) {
        c.sws = sws_getContext(
            w, h, static_cast<AVPixelFormat>(c.frame->format), w, h, AV_PIX_FMT_RGB24,
            SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT, nullptr, nullptr, nullptr);
        const int space = c.frame->colorspace == AVCOL_SPC_BT709 ? SWS_CS_ITU709 : SWS_CS_DEFAULT;
        const int* table = sws_getCoefficients(space);
        sws_setColorspaceDetails(c.sws, table, c.frame->color_range == AVCOL_RANGE_JPEG, table, 1,
                                 0, 1 << 16, 1 << 16);
      }
      const size_t base = out->rgb.size();
      out->rgb.resize(base + static_cast<size_t>(w) * h * 3);
      uint8_t* dst[1] = {out->rgb.data() + base};
      const int dst_stride[1] = {w * 3};
      sws_scale(c.sws, c.frame->data, c.frame->linesize, 0, h, dst, dst_stride);
      ++out->decoded_frames;
      av_frame_unref(c.frame);
    }
    return true;
  };
  while (av_read_frame(c.format, c.packet) >= 0) {
    if (c.packet->stream_index == index) {
      if (avcodec_send_packet(c.codec, c.packet) < 0) {
        return ::testing::AssertionFailure() << "decoder rejected a packet";
      }
      receive_all();
    }
    av_packet_unref(c.packet);
  }
  avcodec_send_packet(c.codec, nullptr);
  receive_all();
  return ::testing::AssertionSuccess();
}

// ---- PNG tar parsing -------------------------------------------------------------------------

struct TarEntry {
  std::string name;
  std::string data;
};

uint64_t ParseOctal(const char* field, size_t width) {
  uint64_t value = 0;
  for (size_t i = 0; i < width && field[i] >= '0' && field[i] <= '7'; ++i) {
    value = value * 8 + (field[i] - '0');
  }
  return value;
}

::testing::AssertionResult ParseUstar(const std::string& tar, std::vector<TarEntry>* entries) {
  if (tar.size() % 512 != 0) {
    return ::testing::AssertionFailure()
           << "archive size " << tar.size() << " not a multiple of 512";
  }
  size_t offset = 0;
  while (true) {
    if (offset + 512 > tar.size()) return ::testing::AssertionFailure() << "no end marker";
    const char* h = tar.data() + offset;
    if (std::all_of(h, h + 512, [](char ch) { return ch == 0; })) {
      // End of archive: two zero blocks, then nothing.
      if (offset + 1024 != tar.size() ||
          !std::all_of(h + 512, h + 1024, [](char ch) { return ch == 0; })) {
        return ::testing::AssertionFailure() << "bad end-of-archive marker at " << offset;
      }
      return ::testing::AssertionSuccess();
    }
    if (std::memcmp(h + 257, "ustar\0", 6) != 0 || std::memcmp(h + 263, "00", 2) != 0) {
      return ::testing::AssertionFailure() << "no ustar magic at " << offset;
    }
    if (h[156] != '0') return ::testing::AssertionFailure() << "not a regular file at " << offset;
    unsigned int sum = 0;
    for (int i = 0; i < 512; ++i) {
      sum += (i >= 148 && i < 156) ? ' ' : static_cast<unsigned char>(h[i]);
    }
    if (ParseOctal(h + 148, 8) != sum) {
      return ::testing::AssertionFailure() << "checksum mismatch at " << offset;
    }
    if (ParseOctal(h + 100, 8) != 0644) return ::testing::AssertionFailure() << "mode not 0644";
    const uint64_t size = ParseOctal(h + 124, 12);
    TarEntry entry;
    entry.name.assign(h, strnlen(h, 100));
    if (offset + 512 + size > tar.size()) return ::testing::AssertionFailure() << "truncated";
    entry.data = tar.substr(offset + 512, size);
    entries->push_back(std::move(entry));
    offset += 512 + (size + 511) / 512 * 512;
  }
}

::testing::AssertionResult DecodePng(const std::string& png, int* width, int* height,
                                     std::vector<uint8_t>* rgb) {
  const AVCodec* decoder = avcodec_find_decoder(AV_CODEC_ID_PNG);
  if (decoder == nullptr) return ::testing::AssertionFailure() << "no PNG decoder";
  AVCodecContext* codec = avcodec_alloc_context3(decoder);
  AVPacket* packet = av_packet_alloc();
  AVFrame* frame = av_frame_alloc();
  ::testing::AssertionResult result = ::testing::AssertionSuccess();
  av_new_packet(packet, static_cast<int>(png.size()));
  std::memcpy(packet->data, png.data(), png.size());
  if (avcodec_open2(codec, decoder, nullptr) < 0 || avcodec_send_packet(codec, packet) < 0 ||
      avcodec_receive_frame(codec, frame) < 0) {
    result = ::testing::AssertionFailure() << "PNG decode failed";
  } else if (frame->format != AV_PIX_FMT_RGB24) {
    result = ::testing::AssertionFailure()
             << "PNG is " << av_get_pix_fmt_name(static_cast<AVPixelFormat>(frame->format));
  } else {
    *width = frame->width;
    *height = frame->height;
    rgb->resize(static_cast<size_t>(frame->width) * frame->height * 3);
    av_image_copy_plane(rgb->data(), frame->width * 3, frame->data[0], frame->linesize[0],
                        frame->width * 3, frame->height);
  }
  av_frame_free(&frame);
  av_packet_free(&packet);
  avcodec_free_context(&codec);
  return result;
}

// ---- MP4 -------------------------------------------------------------------------------------

struct Mp4Case {
  int width;
  int height;
  int num_frames;
  int fps;
};

void PrintTo(const Mp4Case& c, std::ostream* os) {
  *os << c.width << "x" << c.height << ", " << c.num_frames << " frames @" << c.fps << " fps";
}

class Mp4RoundTripTest : public ::testing::TestWithParam<Mp4Case> {};

TEST_P(Mp4RoundTripTest, DecodesToSameFramesSizeAndRate) {
  const Mp4Case& p = GetParam();
  const VideoFrames input = MovingGradient(p.num_frames, p.height, p.width);
  absl::StatusOr<EncodedVideo> encoded = EncodeVideo(input, p.fps, VideoContainer::kMp4);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->content_type, "video/mp4");

  DecodedVideo decoded;
  ASSERT_TRUE(DecodeMp4(encoded->data, &decoded));
  EXPECT_EQ(decoded.codec_name, "h264");
  EXPECT_EQ(decoded.width, p.width);
  EXPECT_EQ(decoded.height, p.height);
  EXPECT_EQ(decoded.stream_nb_frames, p.num_frames);
  EXPECT_EQ(decoded.decoded_frames, p.num_frames);
  EXPECT_EQ(av_cmp_q(decoded.avg_frame_rate, AVRational{p.fps, 1}), 0)
      << decoded.avg_frame_rate.num << "/" << decoded.avg_frame_rate.den;
  EXPECT_EQ(av_cmp_q(decoded.r_frame_rate, AVRational{p.fps, 1}), 0)
      << decoded.r_frame_rate.num << "/" << decoded.r_frame_rate.den;

  // faststart: moov precedes mdat so that playback can begin before the download ends.
  const auto& boxes = decoded.top_level_boxes;
  ASSERT_FALSE(boxes.empty());
  EXPECT_EQ(boxes.front(), "ftyp");
  const auto moov = std::find(boxes.begin(), boxes.end(), "moov");
  const auto mdat = std::find(boxes.begin(), boxes.end(), "mdat");
  ASSERT_NE(moov, boxes.end());
  ASSERT_NE(mdat, boxes.end());
  EXPECT_LT(moov - boxes.begin(), mdat - boxes.begin());

  ASSERT_EQ(decoded.rgb.size(), input.rgb.size());
  const double psnr = Psnr(input.rgb, decoded.rgb);
  EXPECT_GT(psnr, 30.0);
  // Per frame as well, so that one bad (e.g. duplicated or shifted) frame cannot hide in the mean.
  const size_t frame_bytes = static_cast<size_t>(p.width) * p.height * 3;
  for (int f = 0; f < p.num_frames; ++f) {
    std::vector<uint8_t> a(input.rgb.begin() + f * frame_bytes,
                           input.rgb.begin() + (f + 1) * frame_bytes);
    std::vector<uint8_t> b(decoded.rgb.begin() + f * frame_bytes,
                           decoded.rgb.begin() + (f + 1) * frame_bytes);
    EXPECT_GT(Psnr(a, b), 28.0) << "frame " << f;
  }
  std::printf("[ mp4      ] %dx%d %d frames @%d fps: %zu bytes, PSNR %.1f dB\n", p.width, p.height,
              p.num_frames, p.fps, encoded->data.size(), psnr);
}

INSTANTIATE_TEST_SUITE_P(Sizes, Mp4RoundTripTest,
                         ::testing::Values(Mp4Case{256, 256, 17, 16}, Mp4Case{64, 48, 17, 24},
                                           Mp4Case{64, 48, 1, 30}, Mp4Case{96, 160, 33, 8}),
                         [](const ::testing::TestParamInfo<Mp4Case>& info) {
                           return absl::StrFormat("%dx%d_%dframes_%dfps", info.param.width,
                                                  info.param.height, info.param.num_frames,
                                                  info.param.fps);
                         });

TEST(VideoEncoderTest, Mp4DistinguishesFrames) {
  // The round trip must keep frame order: each decoded frame is closest to its own input frame.
  const VideoFrames input = MovingGradient(9, 64, 64);
  absl::StatusOr<EncodedVideo> encoded = EncodeVideo(input, 16, VideoContainer::kMp4);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  DecodedVideo decoded;
  ASSERT_TRUE(DecodeMp4(encoded->data, &decoded));
  ASSERT_EQ(decoded.decoded_frames, 9);
  const size_t frame_bytes = 64 * 64 * 3;
  for (int f = 0; f < 9; ++f) {
    std::vector<uint8_t> out(decoded.rgb.begin() + f * frame_bytes,
                             decoded.rgb.begin() + (f + 1) * frame_bytes);
    int best = -1;
    double best_psnr = -1;
    for (int g = 0; g < 9; ++g) {
      std::vector<uint8_t> in(input.rgb.begin() + g * frame_bytes,
                              input.rgb.begin() + (g + 1) * frame_bytes);
      const double psnr = Psnr(in, out);
      if (psnr > best_psnr) best_psnr = psnr, best = g;
    }
    EXPECT_EQ(best, f);
  }
}

TEST(VideoEncoderTest, Mp4EncodeTime17Frames256) {
  const VideoFrames input = MovingGradient(17, 256, 256);
  ASSERT_TRUE(EncodeVideo(input, 16, VideoContainer::kMp4).ok());  // warm-up
  double best_ms = 1e30, best_png_ms = 1e30;
  for (int run = 0; run < 3; ++run) {
    auto start = std::chrono::steady_clock::now();
    ASSERT_TRUE(EncodeVideo(input, 16, VideoContainer::kMp4).ok());
    auto mid = std::chrono::steady_clock::now();
    ASSERT_TRUE(EncodeVideo(input, 16, VideoContainer::kPngTar).ok());
    auto end = std::chrono::steady_clock::now();
    best_ms = std::min(best_ms, std::chrono::duration<double, std::milli>(mid - start).count());
    best_png_ms =
        std::min(best_png_ms, std::chrono::duration<double, std::milli>(end - mid).count());
  }
  std::printf("[ timing   ] 17 frames 256x256: MP4 %.1f ms, PNG tar %.1f ms (best of 3)\n", best_ms,
              best_png_ms);
  RecordProperty("mp4_encode_ms_17x256x256", static_cast<int>(std::lround(best_ms)));
  RecordProperty("png_tar_encode_ms_17x256x256", static_cast<int>(std::lround(best_png_ms)));
}

TEST(VideoEncoderTest, Mp4RejectsOddSizes) {
  absl::StatusOr<EncodedVideo> encoded =
      EncodeVideo(MovingGradient(3, 48, 63), 16, VideoContainer::kMp4);
  EXPECT_EQ(encoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(encoded.status().message(), HasSubstr("even width and height"));
  EXPECT_THAT(encoded.status().message(), HasSubstr("63x48"));
}

// ---- PNG tar ---------------------------------------------------------------------------------

TEST(VideoEncoderTest, PngTarHoldsEveryFrameLosslessly) {
  // Odd sizes are fine for PNG, and they exercise row strides and tar padding.
  const VideoFrames input = NoiseFrames(17, 47, 63, /*seed=*/7);
  absl::StatusOr<EncodedVideo> encoded = EncodeVideo(input, 16, VideoContainer::kPngTar);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->content_type, "application/x-tar");

  std::vector<TarEntry> entries;
  ASSERT_TRUE(ParseUstar(encoded->data, &entries));
  ASSERT_EQ(entries.size(), 17u);
  const size_t frame_bytes = 47 * 63 * 3;
  for (int f = 0; f < 17; ++f) {
    EXPECT_EQ(entries[f].name, absl::StrFormat("frame_%05d.png", f));
    ASSERT_GE(entries[f].data.size(), 8u);
    EXPECT_EQ(entries[f].data.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  }
  for (int f : {0, 16}) {
    int width = 0, height = 0;
    std::vector<uint8_t> rgb;
    ASSERT_TRUE(DecodePng(entries[f].data, &width, &height, &rgb));
    EXPECT_EQ(width, 63);
    EXPECT_EQ(height, 47);
    const std::vector<uint8_t> expected(input.rgb.begin() + f * frame_bytes,
                                        input.rgb.begin() + (f + 1) * frame_bytes);
    EXPECT_TRUE(rgb == expected) << "frame " << f << " differs";
  }
}

// The FFmpeg-free PNG writer (used by builds without FFmpeg) must produce files a real decoder
// reads back bit-exactly, across the 65535-byte stored-block boundary and for a 1x1 image.
TEST(VideoEncoderTest, StoredPngDecodesLosslessly) {
  for (auto [height, width] : {std::pair{1, 1}, std::pair{47, 63}, std::pair{200, 300}}) {
    const VideoFrames input = NoiseFrames(1, height, width, /*seed=*/11);
    const std::string png = video_internal::EncodePngStored(input.rgb.data(), width, height);
    int w = 0, h = 0;
    std::vector<uint8_t> rgb;
    ASSERT_TRUE(DecodePng(png, &w, &h, &rgb)) << height << "x" << width;
    EXPECT_EQ(w, width);
    EXPECT_EQ(h, height);
    EXPECT_TRUE(rgb == input.rgb) << height << "x" << width << " differs";
  }
}

TEST(VideoEncoderTest, PngTarIsReproducible) {
  const VideoFrames input = MovingGradient(3, 32, 32);
  absl::StatusOr<EncodedVideo> a = EncodeVideo(input, 16, VideoContainer::kPngTar);
  absl::StatusOr<EncodedVideo> b = EncodeVideo(input, 16, VideoContainer::kPngTar);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(a->data == b->data);
}

// ---- bad input -------------------------------------------------------------------------------

class BadInputTest : public ::testing::TestWithParam<VideoContainer> {};

TEST_P(BadInputTest, GivesInvalidArgument) {
  const VideoContainer container = GetParam();
  const VideoFrames good = MovingGradient(2, 16, 16);

  VideoFrames empty;
  EXPECT_EQ(EncodeVideo(empty, 16, container).status().code(), absl::StatusCode::kInvalidArgument);

  VideoFrames zero_frames = good;
  zero_frames.num_frames = 0;
  zero_frames.rgb.clear();
  EXPECT_EQ(EncodeVideo(zero_frames, 16, container).status().code(),
            absl::StatusCode::kInvalidArgument);

  VideoFrames short_rgb = good;
  short_rgb.rgb.pop_back();
  absl::Status status = EncodeVideo(short_rgb, 16, container).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("rgb has"));

  VideoFrames long_rgb = good;
  long_rgb.rgb.push_back(0);
  EXPECT_EQ(EncodeVideo(long_rgb, 16, container).status().code(),
            absl::StatusCode::kInvalidArgument);

  VideoFrames wrong_shape = good;  // same byte count, dimensions that do not match it
  wrong_shape.width = 8;
  EXPECT_EQ(EncodeVideo(wrong_shape, 16, container).status().code(),
            absl::StatusCode::kInvalidArgument);

  VideoFrames negative = good;
  negative.height = -16;
  negative.num_frames = -2;  // the product matches the byte count; the signs do not
  EXPECT_EQ(EncodeVideo(negative, 16, container).status().code(),
            absl::StatusCode::kInvalidArgument);

  VideoFrames huge = good;
  huge.num_frames = 1 << 30;
  huge.width = 1 << 30;
  huge.height = 1 << 30;
  EXPECT_EQ(EncodeVideo(huge, 16, container).status().code(), absl::StatusCode::kInvalidArgument);

  for (int fps : {0, -1, kMaxVideoFps + 1}) {
    status = EncodeVideo(good, fps, container).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << "fps " << fps;
    EXPECT_THAT(status.message(), HasSubstr("fps")) << "fps " << fps;
  }
  EXPECT_TRUE(EncodeVideo(good, 1, container).ok());
  EXPECT_TRUE(EncodeVideo(good, kMaxVideoFps, container).ok());
}

INSTANTIATE_TEST_SUITE_P(Containers, BadInputTest,
                         ::testing::Values(VideoContainer::kMp4, VideoContainer::kPngTar),
                         [](const ::testing::TestParamInfo<VideoContainer>& info) {
                           return std::string(ToString(info.param));
                         });

}  // namespace
}  // namespace sparge::engine
