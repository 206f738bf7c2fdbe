#include "server/internal/yaml_config.h"

namespace sparge::server::internal {

std::string Describe(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "null";
  if (node.IsScalar()) return absl::StrCat("'", node.Scalar(), "'");
  if (node.IsSequence()) return "a list";
  return "a mapping";
}

absl::Status ParseYamlConfig(absl::string_view yaml_text, absl::string_view source_name,
                             const std::function<void(const YAML::Node&, YamlParseContext*)>& read,
                             const std::function<absl::Status()>& validate) {
  YamlParseContext ctx;
  ctx.source = std::string(source_name);
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml_text));
  } catch (const YAML::Exception& e) {
    ctx.Fail(e.mark, "(syntax)", e.msg);
    return ctx.status;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source_name, ": ", e.what()));
  }
  try {
    read(root, &ctx);
  } catch (const std::exception& e) {
    // yaml-cpp throws only on malformed trees (e.g. non-scalar keys); report rather than crash.
    ctx.Fail(YAML::Mark::null_mark(), "(structure)", e.what());
  }
  if (!ctx.status.ok()) return ctx.status;

  absl::Status valid = validate();
  if (valid.ok()) return valid;
  // Point at the line of the offending key when the file set it.
  absl::string_view message = valid.message();
  std::string location(source_name);
  const size_t colon = message.find(": ");
  if (colon != absl::string_view::npos) {
    auto it = ctx.positions.find(std::string(message.substr(0, colon)));
    if (it != ctx.positions.end()) {
      absl::StrAppend(&location, ":", it->second.first, ":", it->second.second);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(location, ": ", message));
}

}  // namespace sparge::server::internal
