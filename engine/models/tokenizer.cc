#include "engine/models/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "engine/assets/embedded_assets.h"
#include "engine/spm_shim/spm_shim.h"

namespace sparge::engine {
namespace {

// SentencePiece runs in libsparge_spm.so, opened here rather than linked: Debian's
// libsentencepiece exports the protobuf 3.14 it embeds, and in a process that also loads the system
// protobuf (the gRPC server) its calls would bind to that other version and abort. RTLD_DEEPBIND
// makes the shim's dependencies resolve against themselves first; RTLD_LOCAL keeps their symbols
// out of everyone else's lookups.
constexpr char kShimName[] = "libsparge_spm.so";

struct SpmApi {
  decltype(&sparge_spm_load) load = nullptr;
  decltype(&sparge_spm_free) free = nullptr;
  decltype(&sparge_spm_vocab_size) vocab_size = nullptr;
  decltype(&sparge_spm_pad_id) pad_id = nullptr;
  decltype(&sparge_spm_eos_id) eos_id = nullptr;
  decltype(&sparge_spm_encode) encode = nullptr;
};

// Where the shim may be, most specific first: an explicit override, beside the executable (or an
// install prefix's lib/), the build tree that produced this binary, then the loader's own search.
std::vector<std::string> ShimCandidates() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("SPARGE_SPM_SHIM"); env != nullptr && env[0] != '\0') {
    candidates.emplace_back(env);
  }
  std::string exe(4096, '\0');
  const ssize_t n = readlink("/proc/self/exe", exe.data(), exe.size());
  if (n > 0 && static_cast<size_t>(n) < exe.size()) {
    exe.resize(static_cast<size_t>(n));
    const std::string dir = exe.substr(0, exe.rfind('/'));
    candidates.push_back(absl::StrCat(dir, "/", kShimName));
    candidates.push_back(absl::StrCat(dir, "/../lib/", kShimName));
    candidates.push_back(absl::StrCat(dir, "/../lib/sparge/", kShimName));
  }
#ifdef SPARGE_SPM_SHIM_DEFAULT_PATH
  candidates.emplace_back(SPARGE_SPM_SHIM_DEFAULT_PATH);
#endif
  candidates.emplace_back(kShimName);
  return candidates;
}

// Opens one candidate and resolves the whole API, or says why not.
absl::StatusOr<SpmApi> OpenShim(const std::string& path) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (lib == nullptr) {
    const char* error = dlerror();
    absl::string_view message = error != nullptr ? error : "dlopen failed";
    // dlerror() starts with the path, which the caller already reports.
    absl::ConsumePrefix(&message, absl::StrCat(path, ": "));
    return absl::NotFoundError(message);
  }
  const auto sym = [lib](const char* name) { return dlsym(lib, name); };
  const auto abi =
      reinterpret_cast<decltype(&sparge_spm_abi_version)>(sym("sparge_spm_abi_version"));
  SpmApi api;
  api.load = reinterpret_cast<decltype(api.load)>(sym("sparge_spm_load"));
  api.free = reinterpret_cast<decltype(api.free)>(sym("sparge_spm_free"));
  api.vocab_size = reinterpret_cast<decltype(api.vocab_size)>(sym("sparge_spm_vocab_size"));
  api.pad_id = reinterpret_cast<decltype(api.pad_id)>(sym("sparge_spm_pad_id"));
  api.eos_id = reinterpret_cast<decltype(api.eos_id)>(sym("sparge_spm_eos_id"));
  api.encode = reinterpret_cast<decltype(api.encode)>(sym("sparge_spm_encode"));
  if (abi == nullptr || api.load == nullptr || api.free == nullptr || api.vocab_size == nullptr ||
      api.pad_id == nullptr || api.eos_id == nullptr || api.encode == nullptr) {
    dlclose(lib);
    return absl::NotFoundError("not a SpargeServe SentencePiece shim (symbols missing)");
  }
  if (const int version = abi(); version != SPARGE_SPM_ABI_VERSION) {
    dlclose(lib);
    return absl::NotFoundError(
        absl::StrCat("shim ABI version ", version, ", this binary needs ", SPARGE_SPM_ABI_VERSION));
  }
  // Never closed: tokenizers may live until exit, and unloading SentencePiece buys nothing.
  return api;
}

absl::StatusOr<SpmApi> LoadShim() {
  std::vector<std::string> tried;
  for (const std::string& path : ShimCandidates()) {
    absl::StatusOr<SpmApi> api = OpenShim(path);
    if (api.ok()) return api;
    tried.push_back(absl::StrCat(path, " (", api.status().message(), ")"));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("cannot load the SentencePiece shim ", kShimName,
                   " (set SPARGE_SPM_SHIM to its full path); tried: ", absl::StrJoin(tried, "; ")));
}

// Loaded once per process, at the first tokenizer; a failure is remembered too.
absl::StatusOr<const SpmApi*> Spm() {
  static const absl::StatusOr<SpmApi>* const api = new absl::StatusOr<SpmApi>(LoadShim());
  if (!api->ok()) return api->status();
  return &**api;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Python's html.unescape maps numeric references the way HTML5 parsers do: NUL and out-of-range
// values become U+FFFD, 0x80-0x9F are read as Windows-1252, other control characters vanish.
// Returns false when the reference produces no character.
bool NumericReference(uint32_t value, uint32_t* cp) {
  static constexpr uint16_t kWindows1252[32] = {
      0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
      0x2039, 0x0152, 0x008D, 0x017D, 0x008F, 0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
      0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x009D, 0x017E, 0x0178};
  if (value == 0 || (value >= 0xD800 && value <= 0xDFFF) || value > 0x10FFFF) {
    *cp = 0xFFFD;
    return true;
  }
  if (value == 0x0D) {
    *cp = value;
    return true;
  }
  if (value >= 0x80 && value <= 0x9F) {
    *cp = kWindows1252[value - 0x80];
    return true;
  }
  const bool control = (value >= 0x01 && value <= 0x08) || value == 0x0B ||
                       (value >= 0x0E && value <= 0x1F) || value == 0x7F ||
                       (value >= 0xFDD0 && value <= 0xFDEF) || (value & 0xFFFE) == 0xFFFE;
  if (control) return false;
  *cp = value;
  return true;
}

struct NamedEntity {
  std::string_view name;
  uint32_t cp;
  bool legacy;  // HTML5 also accepts it without the trailing ';'
};

// The entities that occur in real prompts. Python's table has all ~2,200 HTML5 names; an unknown
// name is left as typed, which is what Python does for names outside its table too.
constexpr NamedEntity kNamedEntities[] = {
    {"amp", '&', true},       {"lt", '<', true},         {"gt", '>', true},
    {"quot", '"', true},      {"apos", '\'', false},     {"nbsp", 0xA0, true},
    {"AMP", '&', true},       {"LT", '<', true},         {"GT", '>', true},
    {"QUOT", '"', true},      {"copy", 0xA9, true},      {"reg", 0xAE, true},
    {"COPY", 0xA9, true},     {"REG", 0xAE, true},       {"iexcl", 0xA1, true},
    {"cent", 0xA2, true},     {"pound", 0xA3, true},     {"yen", 0xA5, true},
    {"sect", 0xA7, true},     {"laquo", 0xAB, true},     {"deg", 0xB0, true},
    {"plusmn", 0xB1, true},   {"micro", 0xB5, true},     {"para", 0xB6, true},
    {"middot", 0xB7, true},   {"raquo", 0xBB, true},     {"frac14", 0xBC, true},
    {"frac12", 0xBD, true},   {"frac34", 0xBE, true},    {"iquest", 0xBF, true},
    {"agrave", 0xE0, true},   {"aacute", 0xE1, true},    {"auml", 0xE4, true},
    {"ccedil", 0xE7, true},   {"egrave", 0xE8, true},    {"eacute", 0xE9, true},
    {"ntilde", 0xF1, true},   {"ouml", 0xF6, true},      {"uuml", 0xFC, true},
    {"szlig", 0xDF, true},    {"times", 0xD7, true},     {"divide", 0xF7, true},
    {"ndash", 0x2013, false}, {"mdash", 0x2014, false},  {"lsquo", 0x2018, false},
    {"rsquo", 0x2019, false}, {"ldquo", 0x201C, false},  {"rdquo", 0x201D, false},
    {"bull", 0x2022, false},  {"hellip", 0x2026, false}, {"euro", 0x20AC, false},
    {"trade", 0x2122, false},
};

const NamedEntity* FindEntity(std::string_view name) {
  for (const NamedEntity& e : kNamedEntities) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

bool IsHexDigit(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

// Handles one reference starting at text[pos] == '&'. Appends its replacement to *out and returns
// the number of input bytes consumed (1 when it is not a reference: the '&' is kept).
size_t UnescapeOne(std::string_view text, size_t pos, std::string* out) {
  const size_t n = text.size();
  size_t i = pos + 1;
  if (i < n && text[i] == '#') {
    ++i;
    const bool hex = i < n && (text[i] == 'x' || text[i] == 'X');
    if (hex) ++i;
    const size_t digits_begin = i;
    uint64_t value = 0;
    while (i < n && (hex ? IsHexDigit(text[i]) : (text[i] >= '0' && text[i] <= '9'))) {
      const char c = text[i];
      const uint64_t d = c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
      // Saturate: any value past U+10FFFF maps to U+FFFD anyway.
      value = std::min<uint64_t>(value * (hex ? 16 : 10) + d, 0x7FFFFFFF);
      ++i;
    }
    if (i == digits_begin) {
      out->push_back('&');
      return 1;
    }
    if (i < n && text[i] == ';') ++i;
    uint32_t cp = 0;
    if (NumericReference(static_cast<uint32_t>(value), &cp)) AppendUtf8(cp, out);
    return i - pos;
  }
  // Named reference: up to 32 characters other than tab, newline, form feed, space, <, &, #, ;.
  size_t end = i;
  while (end < n && end - i < 32) {
    const char c = text[end];
    if (c == '\t' || c == '\n' || c == '\f' || c == ' ' || c == '<' || c == '&' || c == '#' ||
        c == ';') {
      break;
    }
    ++end;
  }
  if (end == i) {
    out->push_back('&');
    return 1;
  }
  const std::string_view name = text.substr(i, end - i);
  if (end < n && text[end] == ';') {
    if (const NamedEntity* e = FindEntity(name)) {
      AppendUtf8(e->cp, out);
      return end + 1 - pos;
    }
  }
  // Like Python: the longest legacy name that prefixes the run, the rest kept verbatim.
  for (size_t len = name.size(); len > 0; --len) {
    const NamedEntity* e = FindEntity(name.substr(0, len));
    if (e != nullptr && e->legacy) {
      AppendUtf8(e->cp, out);
      return 1 + len;
    }
  }
  out->push_back('&');
  return 1;
}

std::string HtmlUnescape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  size_t pos = 0;
  while (pos < text.size()) {
    if (text[pos] == '&') {
      pos += UnescapeOne(text, pos, &out);
    } else {
      out.push_back(text[pos++]);
    }
  }
  return out;
}

// Byte length of the whitespace character at text[pos], or 0. Matches Python's str.isspace(),
// which is what `\s` and str.strip() use on Wan's side.
size_t WhitespaceLength(std::string_view text, size_t pos) {
  const auto b = [&](size_t k) -> unsigned char {
    return pos + k < text.size() ? static_cast<unsigned char>(text[pos + k]) : 0;
  };
  const unsigned char c = b(0);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
  if (c == 0xC2 && (b(1) == 0x85 || b(1) == 0xA0)) return 2;
  if (c == 0xE1 && b(1) == 0x9A && b(2) == 0x80) return 3;  // U+1680
  const unsigned char c2 = b(2);
  if (c == 0xE2 && b(1) == 0x80 &&
      ((c2 >= 0x80 && c2 <= 0x8A) || c2 == 0xA8 || c2 == 0xA9 || c2 == 0xAF)) {
    return 3;  // U+2000..200A, U+2028, U+2029, U+202F
  }
  if (c == 0xE2 && b(1) == 0x81 && b(2) == 0x9F) return 3;  // U+205F
  if (c == 0xE3 && b(1) == 0x80 && b(2) == 0x80) return 3;  // U+3000
  return 0;
}

}  // namespace

void Tokenizer::HandleDeleter::operator()(SpargeSpm* handle) const {
  // A handle exists only once the shim has loaded, so Spm() is ok here.
  if (handle != nullptr) (*Spm())->free(handle);
}

Tokenizer::Tokenizer(Handle handle) : handle_(std::move(handle)) {}

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromSerializedModel(std::string_view bytes) {
  absl::StatusOr<const SpmApi*> spm = Spm();
  if (!spm.ok()) return spm.status();
  char error[512] = {};
  Handle handle((*spm)->load(bytes.data(), bytes.size(), error, sizeof(error)));
  if (handle == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("not a SentencePiece model: ", error));
  }
  const int pad_id = (*spm)->pad_id(handle.get());
  const int eos_id = (*spm)->eos_id(handle.get());
  if (pad_id != kPadId || eos_id != kEosId) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer must use pad id 0 and eos id 1 (umT5 layout), got pad ", pad_id,
                     " eos ", eos_id));
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(handle)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Embedded() {
  return FromSerializedModel(TinyTokenizerModel());
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read tokenizer '", path, "'"));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading tokenizer '", path, "'"));
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = FromSerializedModel(bytes);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat("tokenizer '", path, "': ", tokenizer.status().message()));
  }
  return tokenizer;
}

int Tokenizer::vocab_size() const { return (*Spm())->vocab_size(handle_.get()); }

std::string Tokenizer::CleanPrompt(std::string_view text) {
  // Wan runs ftfy.fix_text first (mojibake and Unicode repairs). It has no C++ counterpart, so
  // that step is skipped; prompts that ftfy would change may tokenize differently from Wan's.
  const std::string unescaped = HtmlUnescape(HtmlUnescape(text));
  // strip, collapse every whitespace run to one space, strip: done in one pass.
  std::string out;
  out.reserve(unescaped.size());
  bool pending_space = false;
  size_t pos = 0;
  while (pos < unescaped.size()) {
    const size_t ws = WhitespaceLength(unescaped, pos);
    if (ws > 0) {
      pending_space = !out.empty();
      pos += ws;
      continue;
    }
    if (pending_space) out.push_back(' ');
    pending_space = false;
    out.push_back(unescaped[pos++]);
  }
  return out;
}

Tokenizer::Encoded Tokenizer::Encode(std::string_view text, int max_len) const {
  Encoded encoded;
  if (max_len <= 0) return encoded;
  const SpmApi& spm = **Spm();
  const std::string clean = CleanPrompt(text);
  // A piece spans at least one byte of the normalised text, which is rarely longer than the
  // input; when normalisation does expand it, the shim reports the size and we ask again.
  std::vector<int32_t> pieces(clean.size() + 1);
  int64_t count = spm.encode(handle_.get(), clean.data(), clean.size(), pieces.data(),
                             pieces.size(), nullptr, 0);
  if (count > static_cast<int64_t>(pieces.size())) {
    pieces.resize(static_cast<size_t>(count));
    count = spm.encode(handle_.get(), clean.data(), clean.size(), pieces.data(), pieces.size(),
                       nullptr, 0);
  }
  // Encode only fails on an unloaded processor, which construction rules out; an empty piece list
  // (EOS alone) would be the harmless outcome anyway.
  pieces.resize(
      count < 0 || count > static_cast<int64_t>(pieces.size()) ? 0 : static_cast<size_t>(count));
  const size_t kept = std::min(pieces.size(), static_cast<size_t>(max_len - 1));
  encoded.ids.assign(static_cast<size_t>(max_len), kPadId);
  encoded.mask.assign(static_cast<size_t>(max_len), 0);
  for (size_t i = 0; i < kept; ++i) {
    encoded.ids[i] = pieces[i];
    encoded.mask[i] = 1;
  }
  encoded.ids[kept] = kEosId;
  encoded.mask[kept] = 1;
  return encoded;
}

}  // namespace sparge::engine
