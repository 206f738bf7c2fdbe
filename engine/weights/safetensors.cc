#include "engine/weights/safetensors.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"

namespace sparge::engine {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors stores little-endian data; the views would need byte swapping");

// The format caps the header at 100 MB; anything larger is a corrupt or foreign file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeEntry {
  const char* name;
  torch::ScalarType type;
};
constexpr DtypeEntry kDtypes[] = {
    {"F64", torch::kDouble}, {"F32", torch::kFloat},  {"F16", torch::kHalf},
    {"BF16", torch::kBFloat16}, {"I64", torch::kLong}, {"I32", torch::kInt},
    {"I16", torch::kShort},  {"I8", torch::kChar},    {"U8", torch::kByte},
    {"BOOL", torch::kBool},
};

const char* DtypeName(torch::ScalarType type) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.type == type) return e.name;
  }
  return nullptr;
}

std::string Errno() { return std::strerror(errno); }

// POSIX instead of std::filesystem: libtorch.so exports std::filesystem symbols of its own that
// crash when a binary's calls bind to them.
bool IsDirectory(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string ParentDir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

struct SafetensorsFile::Mapping {
  void* address = nullptr;
  size_t length = 0;
  ~Mapping() {
    if (address != nullptr && length > 0) munmap(address, length);
  }
};

SafetensorsFile::~SafetensorsFile() = default;

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return errno == ENOENT ? absl::NotFoundError(absl::StrCat(path, ": no such file"))
                           : absl::InvalidArgumentError(absl::StrCat(path, ": ", Errno()));
  }
  struct stat st{};
  if (fstat(fd, &st) != 0) {
    std::string error = Errno();
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", error));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a safetensors file (", file_size, " bytes, shorter than the 8-byte header size)"));
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->address = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const std::string map_error = mapping->address == MAP_FAILED ? Errno() : "";
  ::close(fd);  // the mapping keeps the file alive
  if (mapping->address == MAP_FAILED) {
    mapping->address = nullptr;
    return absl::InvalidArgumentError(absl::StrCat(path, ": mmap failed: ", map_error));
  }
  mapping->length = file_size;
  const auto* bytes = static_cast<const uint8_t*>(mapping->address);

  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes, 8);
  if (header_size > kMaxHeaderBytes || header_size > file_size - 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header size ", header_size, " does not fit the file (", file_size,
                     " bytes) or exceeds ", kMaxHeaderBytes, " bytes; not a safetensors file?"));
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_size);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const uint64_t data_size = file_size - 8 - header_size;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ is not an object"));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": __metadata__ value of \"", key, "\" is not a string"));
        }
        file->metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat(path, ": tensor \"", name, "\": ");
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets")) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "entry needs \"dtype\", \"shape\" and \"data_offsets\""));
    }
    TensorInfo info;
    info.name = name;
    if (!entry["dtype"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(where, "dtype is not a string"));
    }
    info.dtype_name = entry["dtype"].get<std::string>();
    bool known = false;
    for (const DtypeEntry& e : kDtypes) {
      if (info.dtype_name == e.name) {
        info.dtype = e.type;
        known = true;
      }
    }
    if (!known) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "dtype \"", info.dtype_name,
          "\" is not supported (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)"));
    }
    const nlohmann::json& shape = entry["shape"];
    if (!shape.is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(where, "shape is not an array"));
    }
    uint64_t numel = 1;
    for (const nlohmann::json& dim : shape) {
      if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (uint64_t{1} << 48)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "shape ", shape.dump(), " has a bad dimension"));
      }
      info.shape.push_back(static_cast<int64_t>(dim.get<uint64_t>()));
      numel *= dim.get<uint64_t>();
      if (numel > (uint64_t{1} << 48)) {
        return absl::InvalidArgumentError(absl::StrCat(where, "shape ", shape.dump(), " too large"));
      }
    }
    const nlohmann::json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "data_offsets must be two non-negative integers"));
    }
    info.begin = offsets[0].get<uint64_t>();
    info.end = offsets[1].get<uint64_t>();
    const uint64_t expected = numel * c10::elementSize(info.dtype);
    if (info.end < info.begin || info.end - info.begin != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "data_offsets [", info.begin, ", ", info.end, ") hold ",
          info.end >= info.begin ? info.end - info.begin : 0, " bytes but ", info.dtype_name, " ",
          ShapeString(info.shape), " needs ", expected));
    }
    if (info.end > data_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "data_offsets end ", info.end, " lies past the data section (",
                       data_size, " bytes); truncated file?"));
    }
    if (info.end > info.begin) ranges.emplace_back(info.begin, info.end);
    file->tensors_.emplace(name, std::move(info));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor data ranges overlap at byte ", ranges[i].first));
    }
  }
  file->data_ = bytes + 8 + header_size;
  file->mapping_ = std::move(mapping);
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

absl::StatusOr<torch::Tensor> SafetensorsFile::Get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor \"", name, "\""));
  }
  const TensorInfo& info = it->second;
  const uint8_t* ptr = data_ + info.begin;
  const auto options = torch::TensorOptions().dtype(info.dtype).device(torch::kCPU);
  const size_t item = c10::elementSize(info.dtype);
  if (reinterpret_cast<uintptr_t>(ptr) % item != 0) {
    // The format does not promise alignment; kernels assume it, so such a tensor gets one copy.
    torch::Tensor copy = torch::empty(info.shape, options);
    std::memcpy(copy.data_ptr(), ptr, info.end - info.begin);
    return copy;
  }
  std::shared_ptr<Mapping> keep = mapping_;
  // from_blob wants a mutable pointer; the pages are PROT_READ, so callers must only read.
  return torch::from_blob(const_cast<uint8_t*>(ptr), info.shape,
                          [keep](void*) mutable { keep.reset(); }, options);
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& path) {
  std::string file = path;
  if (IsDirectory(path)) {
    std::vector<std::string> indexes, singles;
    DIR* dir = ::opendir(path.c_str());
    if (dir == nullptr) return absl::InvalidArgumentError(absl::StrCat(path, ": ", Errno()));
    while (const dirent* entry = ::readdir(dir)) {
      const std::string name = entry->d_name;
      const std::string full = absl::StrCat(path, "/", name);
      if (absl::EndsWith(name, ".safetensors.index.json")) indexes.push_back(full);
      if (absl::EndsWith(name, ".safetensors")) singles.push_back(full);
    }
    ::closedir(dir);
    std::sort(indexes.begin(), indexes.end());
    std::sort(singles.begin(), singles.end());
    if (indexes.size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": more than one index JSON (",
                                                     absl::StrJoin(indexes, ", "), ")"));
    }
    if (indexes.size() == 1) {
      file = indexes[0];
    } else if (singles.size() == 1) {
      file = singles[0];
    } else if (singles.empty()) {
      return absl::NotFoundError(
          absl::StrCat(path, ": no .safetensors file or .safetensors.index.json"));
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", singles.size(),
                       " .safetensors files but no .safetensors.index.json to say which to use"));
    }
  }
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->source_ = file;
  if (!absl::EndsWith(file, ".json")) {
    SPARGE_ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> st, SafetensorsFile::Open(file));
    for (const auto& [name, info] : st->tensors()) ckpt->index_[name] = st.get();
    ckpt->files_.push_back(std::move(st));
    return ckpt;
  }

  std::ifstream in(file);
  if (!in) return absl::NotFoundError(absl::StrCat(file, ": cannot open"));
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": not valid JSON: ", e.what()));
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": needs a \"weight_map\" object"));
  }
  const std::string dir = ParentDir(file);
  std::map<std::string, const SafetensorsFile*> shards;
  for (const auto& [tensor, shard] : index["weight_map"].items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": weight_map entry of \"", tensor, "\" is not a file name"));
    }
    const std::string shard_name = shard.get<std::string>();
    if (shard_name.find('/') != std::string::npos || shard_name == "..") {
      return absl::InvalidArgumentError(absl::StrCat(
          file, ": shard \"", shard_name, "\" must be a file name in the index's directory"));
    }
    auto it = shards.find(shard_name);
    if (it == shards.end()) {
      SPARGE_ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> st,
                              SafetensorsFile::Open(absl::StrCat(dir, "/", shard_name)));
      it = shards.emplace(shard_name, st.get()).first;
      ckpt->files_.push_back(std::move(st));
    }
    if (it->second->tensors().count(tensor) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": tensor \"", tensor, "\" is mapped to ",
                                                     shard_name, ", which does not hold it"));
    }
    ckpt->index_[tensor] = it->second;
  }
  for (const auto& st : ckpt->files_) {
    for (const auto& [name, info] : st->tensors()) {
      if (!ckpt->index_.count(name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            file, ": shard ", st->path(), " holds tensor \"", name, "\" that the index omits"));
      }
    }
  }
  return ckpt;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [name, file] : index_) out.push_back(name);
  return out;
}

absl::StatusOr<TensorInfo> Checkpoint::Info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(source_, ": no tensor \"", name, "\""));
  }
  return it->second->tensors().at(name);
}

absl::StatusOr<torch::Tensor> Checkpoint::Get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(source_, ": no tensor \"", name, "\""));
  }
  return it->second->Get(name);
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, torch::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    const char* dtype = DtypeName(tensor.scalar_type());
    if (dtype == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("WriteSafetensors: tensor \"", name,
                                                     "\" has unsupported dtype ",
                                                     c10::toString(tensor.scalar_type())));
    }
    torch::Tensor cpu = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t nbytes = cpu.nbytes();
    header[name] = {{"dtype", dtype}, {"shape", cpu.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(std::move(cpu));
  }
  std::string text = header.dump();
  // Pad with spaces so that the data section starts 8-byte aligned.
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot create"));
  const uint64_t header_size = text.size();
  out.write(reinterpret_cast<const char*>(&header_size), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const torch::Tensor& t : data) {
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace sparge::engine
