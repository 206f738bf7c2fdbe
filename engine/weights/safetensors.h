// Memory-mapped safetensors checkpoints: single files and sharded sets with a
// *.safetensors.index.json. Tensors come back as read-only views of the mapping (no copy; the
// mapping lives as long as any view), so loading a model costs one copy: mapping -> parameter.
// Usage: auto ckpt = Checkpoint::Open("transformer/"); auto w = (*ckpt)->Get("proj_out.weight");
// Thread-safety: immutable after Open; every method may be called from any thread. Never write
// through a returned tensor (the pages are mapped read-only; a write faults).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sparge::engine {

struct TensorInfo {
  std::string name;
  std::string dtype_name;  // as in the header: "F32", "BF16", ...
  torch::ScalarType dtype = torch::kFloat;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section, [begin, end)
  uint64_t end = 0;
};

// "[a, b, c]" (used by every loader error message).
std::string ShapeString(const std::vector<int64_t>& shape);

// One .safetensors file. Open() validates the whole header: size, JSON, dtypes, shapes, that each
// tensor's byte range matches its shape and lies inside the file, and that ranges do not overlap.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A CPU view of the tensor's bytes (copied only if the file misaligns it for its dtype).
  // NOT_FOUND for an unknown name.
  absl::StatusOr<torch::Tensor> Get(const std::string& name) const;

 private:
  struct Mapping;
  SafetensorsFile() = default;

  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one file, or the shards named by an index JSON ({"weight_map": {tensor: file}}).
class Checkpoint {
 public:
  // `path` is a .safetensors file, a .safetensors.index.json, or a directory holding exactly one
  // index JSON or (without one) exactly one .safetensors file. INVALID_ARGUMENT / NOT_FOUND with
  // the path for anything malformed or ambiguous; an index must name every tensor of its shards.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& path);

  // Sorted tensor names.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  size_t size() const { return index_.size(); }
  // NOT_FOUND for an unknown name.
  absl::StatusOr<TensorInfo> Info(const std::string& name) const;
  absl::StatusOr<torch::Tensor> Get(const std::string& name) const;
  // What was opened (file or index path), for error messages.
  const std::string& source() const { return source_; }

 private:
  Checkpoint() = default;
  std::string source_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> index_;
};

// Writes tensors (any device; contiguous copies are made) to a .safetensors file, keys sorted,
// data 8-byte aligned. Supports the dtypes the reader supports. For tests and conversion tools.
absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, torch::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace sparge::engine
