// Strict YAML configuration reading shared by sparge-server and sparge-train: a YamlSection reads
// one mapping into struct fields (typed, with "expected an integer, got 'x'" errors carrying file,
// line and column), unknown and duplicate keys are errors, and ParseYamlConfig runs a reader and
// the struct's Validate(), pointing a validation error at the line of the key it names.
// Torch-free. Not thread-safe (one parse per context).
#pragma once

#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "yaml-cpp/yaml.h"

namespace sparge::server::internal {

// Shared state of one parse: the first error, and where each key was (1-based line, column) so
// that Validate() errors can point at the offending line too.
struct YamlParseContext {
  std::string source;
  absl::Status status;
  std::map<std::string, std::pair<int, int>> positions;

  void Fail(const YAML::Mark& mark, absl::string_view path, absl::string_view problem) {
    if (!status.ok()) return;
    std::string where = source;
    if (!mark.is_null()) absl::StrAppend(&where, ":", mark.line + 1, ":", mark.column + 1);
    status = absl::InvalidArgumentError(absl::StrCat(where, ": ", path, ": ", problem));
  }
};

// How a node reads in error messages: 'value', a list, a mapping, null.
std::string Describe(const YAML::Node& node);

// One YAML mapping being read into a struct. Each Read() consumes a key; Finish() reports any key
// that no Read() asked for, so that typos do not silently fall back to defaults.
class YamlSection {
 public:
  YamlSection(YAML::Node node, std::string path, YamlParseContext* ctx)
      : node_(std::move(node)), path_(std::move(path)), ctx_(ctx) {
    if (node_.IsDefined() && !node_.IsNull() && !node_.IsMap()) {
      ctx_->Fail(node_.Mark(), path_.empty() ? "(top level)" : path_,
                 absl::StrCat("expected a mapping, got ", Describe(node_)));
    }
  }

  void Read(const char* key, int* out) {
    ReadScalar(key, "an integer", [out](const std::string& s) { return absl::SimpleAtoi(s, out); });
  }
  void Read(const char* key, int64_t* out) {
    ReadScalar(key, "an integer", [out](const std::string& s) { return absl::SimpleAtoi(s, out); });
  }
  void Read(const char* key, uint64_t* out) {
    ReadScalar(key, "a non-negative integer",
               [out](const std::string& s) { return absl::SimpleAtoi(s, out); });
  }
  void Read(const char* key, float* out) {
    ReadScalar(key, "a number", [out](const std::string& s) { return absl::SimpleAtof(s, out); });
  }
  void Read(const char* key, double* out) {
    ReadScalar(key, "a number", [out](const std::string& s) { return absl::SimpleAtod(s, out); });
  }
  void Read(const char* key, bool* out) {
    ReadScalar(key, "true or false",
               [out](const std::string& s) { return absl::SimpleAtob(s, out); });
  }
  void Read(const char* key, std::string* out) {
    ReadScalar(key, "a string", [out](const std::string& s) {
      *out = s;
      return true;
    });
  }
  // Enums spelled as lower-case names; parse returns INVALID_ARGUMENT listing the choices.
  template <typename T, typename ParseFn>
  void ReadEnum(const char* key, T* out, ParseFn parse) {
    YAML::Node value = Lookup(key);
    if (!value.IsDefined()) return;
    if (!value.IsScalar()) {
      ctx_->Fail(value.Mark(), Path(key), absl::StrCat("expected a name, got ", Describe(value)));
      return;
    }
    absl::StatusOr<T> parsed = parse(value.Scalar());
    if (!parsed.ok()) {
      // The parser names its field ("sampler: must be ..."); the path here names it already.
      absl::string_view message = parsed.status().message();
      const size_t colon = message.find(": ");
      if (colon != absl::string_view::npos) message.remove_prefix(colon + 2);
      ctx_->Fail(value.Mark(), Path(key), message);
      return;
    }
    *out = *parsed;
  }

  YamlSection Sub(const char* key) {
    YAML::Node value = Lookup(key);
    return YamlSection(value.IsDefined() ? value : YAML::Node(), Path(key), ctx_);
  }

  // Unknown or repeated keys are errors.
  void Finish() {
    if (!node_.IsMap()) return;
    std::set<std::string> seen;
    for (auto it = node_.begin(); it != node_.end(); ++it) {
      const std::string key = it->first.Scalar();
      if (!seen.insert(key).second) {
        ctx_->Fail(it->first.Mark(), Path(key.c_str()), "duplicate key");
        return;
      }
      if (consumed_.count(key) == 0) {
        ctx_->Fail(it->first.Mark(), Path(key.c_str()),
                   absl::StrCat("unknown key '", key, "' (known keys here: ",
                                absl::StrJoin(asked_, ", "), ")"));
        return;
      }
    }
  }

 private:
  std::string Path(const char* key) const {
    return path_.empty() ? std::string(key) : absl::StrCat(path_, ".", key);
  }

  // The value under key (undefined node if absent); records the key as known and its position.
  YAML::Node Lookup(const char* key) {
    asked_.push_back(key);
    if (!node_.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
    for (auto it = node_.begin(); it != node_.end(); ++it) {
      if (it->first.Scalar() == key) {
        consumed_.insert(key);
        const YAML::Mark mark = it->first.Mark();
        if (!mark.is_null()) ctx_->positions[Path(key)] = {mark.line + 1, mark.column + 1};
        return it->second;
      }
    }
    consumed_.insert(key);
    return YAML::Node(YAML::NodeType::Undefined);
  }

  template <typename ParseFn>
  void ReadScalar(const char* key, const char* expected, ParseFn parse) {
    YAML::Node value = Lookup(key);
    if (!value.IsDefined()) return;
    if (!value.IsScalar() ||
        !parse(std::string(absl::StripAsciiWhitespace(value.Scalar())))) {
      ctx_->Fail(value.Mark(), Path(key), absl::StrCat("expected ", expected, ", got ",
                                                       Describe(value)));
    }
  }

  YAML::Node node_;
  std::string path_;
  YamlParseContext* ctx_;
  std::set<std::string> consumed_;
  std::vector<std::string> asked_;
};

// Parses yaml_text, calls read(root, ctx), then validate() when reading succeeded. Errors are
// INVALID_ARGUMENT "<source>:<line>:<col>: <path>: <problem>"; a validation message starting
// with "<path>: " gets the line of that key when the file set it.
absl::Status ParseYamlConfig(absl::string_view yaml_text, absl::string_view source_name,
                             const std::function<void(const YAML::Node&, YamlParseContext*)>& read,
                             const std::function<absl::Status()>& validate);

}  // namespace sparge::server::internal
