// The launchers' environment knobs (A/B switches and fallbacks, kernels/NOTES.md): parsed in one
// place, and a value that is not understood is reported once per variable on stderr instead of
// silently meaning the default. No CUDA calls: tested on any machine (tests/kernels/env_knobs_test.cc).
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

namespace sparge::kernels::detail {

// Reports `name=value` once per variable and value ("ignored: <why>; using <what>").
inline void WarnEnvOnce(const char* name, const char* value, const char* why, const std::string& using_what) {
  static std::mutex mu;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(mu);
  if (!seen.insert(std::string(name) + "=" + value).second) return;
  std::fprintf(stderr, "sparge kernels: ignoring %s=%s (%s); using %s\n", name, value, why, using_what.c_str());
}

// An integer knob: unset or empty gives `fallback`; a whole decimal number in [lo, hi] is taken;
// anything else (trailing characters, out of range) is reported and gives `fallback`.
inline int EnvInt(const char* name, int fallback, int lo, int hi) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(env, &end, 10);
  if (end == env || *end != '\0' || errno == ERANGE) {
    WarnEnvOnce(name, env, "not an integer", "the default " + std::to_string(fallback));
    return fallback;
  }
  if (v < lo || v > hi) {
    WarnEnvOnce(name, env, ("allowed: " + std::to_string(lo) + " to " + std::to_string(hi)).c_str(),
                "the default " + std::to_string(fallback));
    return fallback;
  }
  return static_cast<int>(v);
}

// A switch: "1" on, "0" or unset/empty off; anything else is reported and means off.
inline bool EnvFlagOn(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return false;
  if (env[0] == '1' && env[1] == '\0') return true;
  if (!(env[0] == '0' && env[1] == '\0')) WarnEnvOnce(name, env, "allowed: 0 or 1", "0 (off)");
  return false;
}

// A choice among named values (e.g. SPARGE_BWD_IMPL): true when the variable equals `value`;
// values outside `allowed` (nullptr-terminated) are reported once.
inline bool EnvIs(const char* name, const char* value, const char* const* allowed) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return false;
  bool known = false;
  std::string list;
  for (const char* const* a = allowed; *a != nullptr; ++a) {
    known = known || std::string(env) == *a;
    list += (list.empty() ? "" : ", ") + std::string(*a);
  }
  if (!known) WarnEnvOnce(name, env, ("allowed: " + list).c_str(), "the default");
  return std::string(env) == value;
}

}  // namespace sparge::kernels::detail
