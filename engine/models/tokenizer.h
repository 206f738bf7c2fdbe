// SentencePiece tokenizer for the umT5 text encoder: Wan's prompt cleaning, EOS, truncation and
// padding to a fixed length with an attention mask (shared/design/WAN21.md section 3).
// Usage: auto tok = Tokenizer::Embedded(); auto enc = (*tok)->Encode("a cat", 64);
// Thread-safety: immutable after creation; Encode may be called from any number of threads.
// SentencePiece itself runs inside libsparge_spm.so (engine/spm_shim/), loaded at first use.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

// A model inside the dlopen()ed SentencePiece shim (engine/spm_shim/spm_shim.h).
struct SpargeSpm;

namespace sparge::engine {

class Tokenizer {
 public:
  static constexpr int64_t kPadId = 0;
  static constexpr int64_t kEosId = 1;

  // The tiny default model's tokenizer, compiled into the binary (engine/assets/).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Embedded();
  // A SentencePiece .model file whose pad id is 0 and eos id is 1 (umT5's layout).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  // Same, from the serialized model bytes.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromSerializedModel(std::string_view bytes);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Number of pieces; every id Encode returns is below this.
  int vocab_size() const;

  struct Encoded {
    std::vector<int64_t> ids;   // exactly max_len: tokens, EOS (1), then padding (0)
    std::vector<int64_t> mask;  // exactly max_len: 1 for tokens and EOS, 0 for padding
  };
  // Cleans the prompt (CleanPrompt), tokenizes it, keeps at most max_len - 1 tokens, appends EOS
  // and pads to max_len. max_len <= 0 gives empty vectors.
  Encoded Encode(std::string_view text, int max_len) const;

  // Wan's prompt cleaning: HTML-unescape twice, strip, collapse whitespace runs to one space.
  static std::string CleanPrompt(std::string_view text);

 private:
  struct HandleDeleter {
    void operator()(SpargeSpm* handle) const;
  };
  using Handle = std::unique_ptr<SpargeSpm, HandleDeleter>;

  explicit Tokenizer(Handle handle);

  Handle handle_;
};

}  // namespace sparge::engine
