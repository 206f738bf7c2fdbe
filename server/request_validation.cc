#include "server/request_validation.h"

#include <algorithm>
#include <string>

#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "server/internal/range_checks.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using internal::CheckFloatInRange;
using internal::CheckFourKPlusOne;
using internal::CheckIntInRange;
using internal::CheckMultipleInRange;
using internal::OutOfRange;

// Strict UTF-8 (no overlongs, no surrogates): the tokenizer and logs assume it.
bool IsValidUtf8(const std::string& s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const unsigned char c = s[i];
    int extra;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      extra = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + extra >= n) return false;
    for (int k = 1; k <= extra; ++k) {
      const unsigned char cc = s[i + k];
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t kMinForLength[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLength[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += extra + 1;
  }
  return true;
}

absl::Status CheckText(const char* field, const std::string& text, int max_bytes,
                       bool required) {
  const std::string rule = absl::StrCat(required ? "non-empty " : "", "UTF-8 text of at most ",
                                        max_bytes, " bytes");
  if (static_cast<int64_t>(text.size()) > max_bytes || (required && text.empty())) {
    return OutOfRange(field, rule, absl::StrCat(text.size(), " bytes"));
  }
  if (required && absl::StripAsciiWhitespace(text).empty()) {
    return OutOfRange(field, rule, "only whitespace");
  }
  if (!IsValidUtf8(text)) return OutOfRange(field, rule, "invalid UTF-8");
  return absl::OkStatus();
}

engine::AttentionMode FromProto(v1::AttentionMode mode) {
  switch (mode) {
    case v1::ATTENTION_MODE_TOPK:
      return engine::AttentionMode::kTopK;
    case v1::ATTENTION_MODE_TOPP:
      return engine::AttentionMode::kTopP;
    case v1::ATTENTION_MODE_HYBRID:
      return engine::AttentionMode::kHybrid;
    default:
      return engine::AttentionMode::kDense;
  }
}

}  // namespace

SeedSource RandomSeedSource() {
  return [] {
    // A fresh generator per call: absl::BitGen is not thread-safe and gRPC threads call this.
    absl::BitGen gen;
    return absl::Uniform<uint64_t>(gen);
  };
}

v1::AttentionMode ToProto(engine::AttentionMode mode) {
  switch (mode) {
    case engine::AttentionMode::kDense:
      return v1::ATTENTION_MODE_DENSE;
    case engine::AttentionMode::kTopK:
      return v1::ATTENTION_MODE_TOPK;
    case engine::AttentionMode::kTopP:
      return v1::ATTENTION_MODE_TOPP;
    case engine::AttentionMode::kHybrid:
      return v1::ATTENTION_MODE_HYBRID;
  }
  return v1::ATTENTION_MODE_UNSPECIFIED;
}

v1::Sampler ToProto(engine::SamplerKind sampler) {
  return sampler == engine::SamplerKind::kUniPC ? v1::SAMPLER_UNIPC : v1::SAMPLER_EULER;
}

v1::OutputFormat ToProto(OutputFormat format) {
  return format == OutputFormat::kPngFrames ? v1::OUTPUT_FORMAT_PNG_FRAMES : v1::OUTPUT_FORMAT_MP4;
}

v1::GenerateRequest DefaultsAsProto(const RequestDefaults& d) {
  v1::GenerateRequest p;
  p.set_negative_prompt(d.negative_prompt);
  p.set_width(d.width);
  p.set_height(d.height);
  p.set_num_frames(d.num_frames);
  p.set_fps(d.fps);
  p.set_num_steps(d.num_steps);
  p.set_guidance_scale(d.guidance_scale);
  p.set_sampler(ToProto(d.sampler));
  p.set_shift(d.shift);
  p.set_output_format(ToProto(d.output_format));
  p.set_priority(v1::PRIORITY_NORMAL);
  v1::SparsityConfig* s = p.mutable_sparsity();
  s->set_mode(ToProto(d.sparsity.mode));
  s->set_topk(d.sparsity.topk);
  s->set_topp(d.sparsity.topp);
  s->set_dense_steps(d.sparsity.dense_steps);
  return p;
}

absl::StatusOr<ResolvedRequest> ResolveRequest(const v1::GenerateRequest& req,
                                               const RequestLimits& l,
                                               const RequestDefaults& d,
                                               const SeedSource& seed_source) {
  ResolvedRequest out;
  engine::GenerationRequest& e = out.engine;

  SPARGE_RETURN_IF_ERROR(CheckText("prompt", req.prompt(), l.max_prompt_bytes, true));
  e.prompt = req.prompt();
  e.negative_prompt = req.has_negative_prompt() ? req.negative_prompt() : d.negative_prompt;
  SPARGE_RETURN_IF_ERROR(
      CheckText("negative_prompt", e.negative_prompt, l.max_prompt_bytes, false));

  e.width = req.has_width() ? req.width() : d.width;
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("width", e.width, l.size_multiple, l.min_width, l.max_width));
  e.height = req.has_height() ? req.height() : d.height;
  SPARGE_RETURN_IF_ERROR(
      CheckMultipleInRange("height", e.height, l.size_multiple, l.min_height, l.max_height));
  e.num_frames = req.has_num_frames() ? req.num_frames() : d.num_frames;
  SPARGE_RETURN_IF_ERROR(
      CheckFourKPlusOne("num_frames", e.num_frames, l.min_frames, l.max_frames));
  out.fps = req.has_fps() ? req.fps() : d.fps;
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("fps", out.fps, 1, l.max_fps));
  e.num_steps = req.has_num_steps() ? req.num_steps() : d.num_steps;
  SPARGE_RETURN_IF_ERROR(CheckIntInRange("num_steps", e.num_steps, 1, l.max_steps));
  e.guidance_scale = req.has_guidance_scale() ? req.guidance_scale() : d.guidance_scale;
  SPARGE_RETURN_IF_ERROR(
      CheckFloatInRange("guidance_scale", e.guidance_scale, 0.0, l.max_guidance_scale));
  e.shift = req.has_shift() ? req.shift() : d.shift;
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("shift", e.shift, 0.0, l.max_shift, true));

  switch (req.sampler()) {
    case v1::SAMPLER_UNSPECIFIED:
      e.sampler = d.sampler;
      break;
    case v1::SAMPLER_EULER:
      e.sampler = engine::SamplerKind::kEuler;
      break;
    case v1::SAMPLER_UNIPC:
      e.sampler = engine::SamplerKind::kUniPC;
      break;
    default:
      return OutOfRange("sampler", "one of SAMPLER_EULER, SAMPLER_UNIPC",
                        absl::StrCat(static_cast<int>(req.sampler())));
  }
  switch (req.output_format()) {
    case v1::OUTPUT_FORMAT_UNSPECIFIED:
      out.output_format = d.output_format;
      break;
    case v1::OUTPUT_FORMAT_MP4:
      out.output_format = OutputFormat::kMp4;
      break;
    case v1::OUTPUT_FORMAT_PNG_FRAMES:
      out.output_format = OutputFormat::kPngFrames;
      break;
    default:
      return OutOfRange("output_format", "one of OUTPUT_FORMAT_MP4, OUTPUT_FORMAT_PNG_FRAMES",
                        absl::StrCat(static_cast<int>(req.output_format())));
  }
  switch (req.priority()) {
    case v1::PRIORITY_UNSPECIFIED:
    case v1::PRIORITY_NORMAL:
      out.priority = JobPriority::kNormal;
      break;
    case v1::PRIORITY_LOW:
      out.priority = JobPriority::kLow;
      break;
    case v1::PRIORITY_HIGH:
      out.priority = JobPriority::kHigh;
      break;
    default:
      return OutOfRange("priority", "one of PRIORITY_LOW, PRIORITY_NORMAL, PRIORITY_HIGH",
                        absl::StrCat(static_cast<int>(req.priority())));
  }

  const v1::SparsityConfig& sp = req.sparsity();
  if (sp.mode() == v1::ATTENTION_MODE_UNSPECIFIED) {
    e.sparsity.mode = d.sparsity.mode;
  } else if (v1::AttentionMode_IsValid(sp.mode())) {
    e.sparsity.mode = FromProto(sp.mode());
  } else {
    return OutOfRange("sparsity.mode",
                      "one of ATTENTION_MODE_DENSE, ATTENTION_MODE_TOPK, ATTENTION_MODE_TOPP, "
                      "ATTENTION_MODE_HYBRID",
                      absl::StrCat(static_cast<int>(sp.mode())));
  }
  e.sparsity.topk = sp.has_topk() ? sp.topk() : d.sparsity.topk;
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("sparsity.topk", e.sparsity.topk, 0.0, 1.0, true));
  e.sparsity.topp = sp.has_topp() ? sp.topp() : d.sparsity.topp;
  SPARGE_RETURN_IF_ERROR(CheckFloatInRange("sparsity.topp", e.sparsity.topp, 0.0, 1.0, true));
  if (sp.has_dense_steps()) {
    e.sparsity.dense_steps = sp.dense_steps();
    SPARGE_RETURN_IF_ERROR(
        CheckIntInRange("sparsity.dense_steps", e.sparsity.dense_steps, 0, e.num_steps));
  } else {
    // The default may exceed a short request's step count: then every step runs dense.
    e.sparsity.dense_steps = std::min(d.sparsity.dense_steps, e.num_steps);
  }

  out.seed_was_random = !req.has_seed();
  e.seed = req.has_seed() ? req.seed() : seed_source();

  v1::GenerateRequest& r = out.resolved;
  r.set_prompt(e.prompt);
  r.set_negative_prompt(e.negative_prompt);
  r.set_width(e.width);
  r.set_height(e.height);
  r.set_num_frames(e.num_frames);
  r.set_fps(out.fps);
  r.set_num_steps(e.num_steps);
  r.set_guidance_scale(e.guidance_scale);
  r.set_seed(e.seed);
  r.set_sampler(ToProto(e.sampler));
  r.set_shift(e.shift);
  r.set_output_format(ToProto(out.output_format));
  r.set_priority(out.priority == JobPriority::kHigh  ? v1::PRIORITY_HIGH
                 : out.priority == JobPriority::kLow ? v1::PRIORITY_LOW
                                                     : v1::PRIORITY_NORMAL);
  v1::SparsityConfig* rs = r.mutable_sparsity();
  rs->set_mode(ToProto(e.sparsity.mode));
  rs->set_topk(e.sparsity.topk);
  rs->set_topp(e.sparsity.topp);
  rs->set_dense_steps(e.sparsity.dense_steps);
  return out;
}

}  // namespace sparge::server
