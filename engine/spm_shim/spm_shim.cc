// libsparge_spm.so: the only place that calls libsentencepiece (see spm_shim.h for why). Built
// with hidden visibility and a version script, so that it exports the C functions and nothing
// else; no C++ exception or object crosses the boundary.
#include "engine/spm_shim/spm_shim.h"

#include <sentencepiece_processor.h>

#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#define SPARGE_SPM_EXPORT extern "C" __attribute__((visibility("default")))

struct SpargeSpm {
  sentencepiece::SentencePieceProcessor processor;
};

namespace {

void WriteError(std::string_view message, char* err, size_t err_size) {
  if (err == nullptr || err_size == 0) return;
  const size_t n = message.size() < err_size - 1 ? message.size() : err_size - 1;
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

}  // namespace

SPARGE_SPM_EXPORT int sparge_spm_abi_version(void) { return SPARGE_SPM_ABI_VERSION; }

SPARGE_SPM_EXPORT SpargeSpm* sparge_spm_load(const char* bytes, size_t size, char* err,
                                             size_t err_size) {
  try {
    auto spm = std::make_unique<SpargeSpm>();
    const sentencepiece::util::Status status =
        spm->processor.LoadFromSerializedProto(std::string_view(bytes, size));
    if (!status.ok()) {
      WriteError(status.ToString(), err, err_size);
      return nullptr;
    }
    return spm.release();
  } catch (const std::exception& e) {
    WriteError(e.what(), err, err_size);
  } catch (...) {
    WriteError("unknown exception in SentencePiece", err, err_size);
  }
  return nullptr;
}

SPARGE_SPM_EXPORT void sparge_spm_free(SpargeSpm* spm) { delete spm; }

SPARGE_SPM_EXPORT int sparge_spm_vocab_size(const SpargeSpm* spm) {
  return spm->processor.GetPieceSize();
}

SPARGE_SPM_EXPORT int sparge_spm_pad_id(const SpargeSpm* spm) { return spm->processor.pad_id(); }

SPARGE_SPM_EXPORT int sparge_spm_eos_id(const SpargeSpm* spm) { return spm->processor.eos_id(); }

SPARGE_SPM_EXPORT int sparge_spm_piece_to_id(const SpargeSpm* spm, const char* piece, size_t size) {
  try {
    return spm->processor.PieceToId(std::string_view(piece, size));
  } catch (...) {
    return spm->processor.unk_id();
  }
}

SPARGE_SPM_EXPORT int64_t sparge_spm_encode(const SpargeSpm* spm, const char* text, size_t size,
                                            int32_t* ids, size_t capacity, char* err,
                                            size_t err_size) {
  try {
    std::vector<int> pieces;
    const sentencepiece::util::Status status =
        spm->processor.Encode(std::string_view(text, size), &pieces);
    if (!status.ok()) {
      WriteError(status.ToString(), err, err_size);
      return -1;
    }
    if (pieces.size() <= capacity) {
      for (size_t i = 0; i < pieces.size(); ++i) ids[i] = static_cast<int32_t>(pieces[i]);
    }
    return static_cast<int64_t>(pieces.size());
  } catch (const std::exception& e) {
    WriteError(e.what(), err, err_size);
  } catch (...) {
    WriteError("unknown exception in SentencePiece", err, err_size);
  }
  return -1;
}
