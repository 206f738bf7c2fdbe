// A small command-line parser for sparge-server and sparge-cli: --name=value or --name value,
// dashes and underscores interchangeable (--metrics-port == --metrics_port), --flag / --no-flag
// for booleans, remembers which flags were given, and prints --help with every default.
// Not thread-safe; use from main().
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace sparge::server::internal {

class FlagParser {
 public:
  // `out` holds the default when added; the default is shown in Usage().
  void AddString(const std::string& name, std::string* out, const std::string& help);
  void AddInt(const std::string& name, int* out, const std::string& help);
  void AddUint64(const std::string& name, uint64_t* out, const std::string& help);
  void AddFloat(const std::string& name, float* out, const std::string& help);
  void AddBool(const std::string& name, bool* out, const std::string& help);

  // Parses argv[1..]; arguments that are not flags go to *positional (in order). "--" ends flag
  // parsing. INVALID_ARGUMENT names the flag on unknown flags or bad values.
  absl::Status Parse(int argc, char** argv, std::vector<std::string>* positional);
  // True when the flag appeared on the command line.
  bool IsSet(const std::string& name) const;
  // One block per flag: "  --name=<default>\n      help\n".
  std::string Usage() const;

 private:
  struct Flag {
    std::string name;  // canonical, with dashes
    std::string help;
    std::string default_text;
    bool is_bool = false;
    std::function<bool(const std::string&)> set;  // false: bad value
  };
  static std::string Canonical(std::string name);
  const Flag* Find(const std::string& name) const;
  void Add(Flag flag);

  std::vector<Flag> flags_;
  std::set<std::string> given_;
};

}  // namespace sparge::server::internal
