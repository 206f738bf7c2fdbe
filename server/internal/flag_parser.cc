#include "server/internal/flag_parser.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sparge::server::internal {

std::string FlagParser::Canonical(std::string name) {
  std::replace(name.begin(), name.end(), '_', '-');
  return name;
}

void FlagParser::Add(Flag flag) {
  flag.name = Canonical(flag.name);
  flags_.push_back(std::move(flag));
}

void FlagParser::AddString(const std::string& name, std::string* out, const std::string& help) {
  Add({name, help, absl::StrCat("\"", *out, "\""), false, [out](const std::string& v) {
         *out = v;
         return true;
       }});
}

void FlagParser::AddInt(const std::string& name, int* out, const std::string& help) {
  Add({name, help, absl::StrCat(*out), false,
       [out](const std::string& v) { return absl::SimpleAtoi(v, out); }});
}

void FlagParser::AddUint64(const std::string& name, uint64_t* out, const std::string& help) {
  Add({name, help, absl::StrCat(*out), false,
       [out](const std::string& v) { return absl::SimpleAtoi(v, out); }});
}

void FlagParser::AddFloat(const std::string& name, float* out, const std::string& help) {
  Add({name, help, absl::StrCat(*out), false,
       [out](const std::string& v) { return absl::SimpleAtof(v, out); }});
}

void FlagParser::AddBool(const std::string& name, bool* out, const std::string& help) {
  Add({name, help, *out ? "true" : "false", true,
       [out](const std::string& v) { return absl::SimpleAtob(v, out); }});
}

const FlagParser::Flag* FlagParser::Find(const std::string& name) const {
  const std::string canonical = Canonical(name);
  for (const Flag& f : flags_) {
    if (f.name == canonical) return &f;
  }
  return nullptr;
}

bool FlagParser::IsSet(const std::string& name) const {
  return given_.count(Canonical(name)) > 0;
}

absl::Status FlagParser::Parse(int argc, char** argv, std::vector<std::string>* positional) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      for (++i; i < argc; ++i) positional->push_back(argv[i]);
      break;
    }
    if (!absl::StartsWith(arg, "-") || arg == "-") {
      positional->push_back(arg);
      continue;
    }
    arg = arg.substr(absl::StartsWith(arg, "--") ? 2 : 1);
    std::string name = arg;
    std::string value;
    bool has_value = false;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      has_value = true;
    }
    const Flag* flag = Find(name);
    if (flag == nullptr && !has_value && absl::StartsWith(Canonical(name), "no-")) {
      const Flag* negated = Find(name.substr(3));
      if (negated != nullptr && negated->is_bool) {
        negated->set("false");
        given_.insert(negated->name);
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " (see --help)"));
    }
    if (!has_value) {
      if (flag->is_bool) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", flag->name, " needs a value"));
      }
    }
    if (!flag->set(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag->name, ": bad value '", value, "'"));
    }
    given_.insert(flag->name);
  }
  return absl::OkStatus();
}

std::string FlagParser::Usage() const {
  std::string out;
  for (const Flag& f : flags_) {
    absl::StrAppend(&out, "  --", f.name, " (default ", f.default_text, ")\n      ", f.help,
                    "\n");
  }
  return out;
}

}  // namespace sparge::server::internal
