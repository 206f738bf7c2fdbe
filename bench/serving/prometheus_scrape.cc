#include "bench/serving/prometheus_scrape.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "httplib.h"

namespace sparge::bench {
namespace {

// Prometheus writes +Inf, -Inf and NaN, which SimpleAtod also reads; keep one place for it.
bool ParseValue(absl::string_view text, double* out) {
  if (text == "+Inf") {
    *out = std::numeric_limits<double>::infinity();
    return true;
  }
  return absl::SimpleAtod(text, out);
}

// Parses `k="v",k2="v2"` (the text between the braces) with \" \\ \n escapes.
bool ParseLabels(absl::string_view text, Labels* labels) {
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && (text[i] == ',' || text[i] == ' ')) ++i;
    if (i >= text.size()) break;
    const size_t eq = text.find('=', i);
    if (eq == absl::string_view::npos || eq + 1 >= text.size() || text[eq + 1] != '"') {
      return false;
    }
    std::string name(absl::StripAsciiWhitespace(text.substr(i, eq - i)));
    std::string value;
    size_t j = eq + 2;
    bool closed = false;
    for (; j < text.size(); ++j) {
      if (text[j] == '\\' && j + 1 < text.size()) {
        const char c = text[++j];
        value.push_back(c == 'n' ? '\n' : c);
      } else if (text[j] == '"') {
        closed = true;
        break;
      } else {
        value.push_back(text[j]);
      }
    }
    if (!closed) return false;
    (*labels)[name] = value;
    i = j + 1;
  }
  return true;
}

}  // namespace

std::string MetricsSnapshot::Key(const std::string& name, const Labels& labels) {
  std::string key = name;
  if (!labels.empty()) {
    key += '{';
    bool first = true;
    for (const auto& [k, v] : labels) {
      if (!first) key += ',';
      first = false;
      absl::StrAppend(&key, k, "=\"", v, "\"");
    }
    key += '}';
  }
  return key;
}

double MetricsSnapshot::Get(const std::string& name, const Labels& labels) const {
  auto it = series_.find(Key(name, labels));
  return it == series_.end() ? 0.0 : it->second;
}

bool MetricsSnapshot::Has(const std::string& name, const Labels& labels) const {
  return series_.count(Key(name, labels)) > 0;
}

void MetricsSnapshot::Set(const std::string& name, const Labels& labels, double value) {
  series_[Key(name, labels)] = value;
}

std::map<double, double> MetricsSnapshot::HistogramBuckets(const std::string& name) const {
  // Keys are name_bucket{le="..."} (histograms here carry no other labels) and sort as strings,
  // so walk the prefix and read each bound back.
  std::map<double, double> buckets;
  const std::string prefix = name + "_bucket{le=\"";
  for (auto it = series_.lower_bound(prefix); it != series_.end(); ++it) {
    if (it->first.compare(0, prefix.size(), prefix) != 0) break;
    const size_t end = it->first.find('"', prefix.size());
    double bound;
    if (end == std::string::npos ||
        !ParseValue(absl::string_view(it->first).substr(prefix.size(), end - prefix.size()),
                    &bound)) {
      continue;
    }
    buckets[bound] = it->second;
  }
  return buckets;
}

absl::StatusOr<MetricsSnapshot> ParsePrometheusText(absl::string_view text) {
  MetricsSnapshot snapshot;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    std::string name;
    Labels labels;
    absl::string_view rest;
    const size_t brace = line.find('{');
    const size_t space = line.find(' ');
    if (brace != absl::string_view::npos && (space == absl::string_view::npos || brace < space)) {
      const size_t close = line.rfind('}');
      if (close == absl::string_view::npos || close < brace ||
          !ParseLabels(line.substr(brace + 1, close - brace - 1), &labels)) {
        return absl::InvalidArgumentError(
            absl::StrCat("metrics line ", line_number, ": bad labels: ", line));
      }
      name = std::string(line.substr(0, brace));
      rest = line.substr(close + 1);
    } else {
      if (space == absl::string_view::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("metrics line ", line_number, ": no value: ", line));
      }
      name = std::string(line.substr(0, space));
      rest = line.substr(space);
    }
    // Value, then an optional timestamp.
    std::vector<absl::string_view> fields =
        absl::StrSplit(absl::StripAsciiWhitespace(rest), ' ', absl::SkipEmpty());
    double value;
    if (fields.empty() || !ParseValue(fields[0], &value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics line ", line_number, ": bad value: ", line));
    }
    snapshot.Set(name, labels, value);
  }
  return snapshot;
}

absl::StatusOr<MetricsSnapshot> ScrapeMetrics(const std::string& url, absl::Duration timeout) {
  const std::string kScheme = "http://";
  if (url.compare(0, kScheme.size(), kScheme) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics url must start with http://, got \"", url, "\""));
  }
  const size_t slash = url.find('/', kScheme.size());
  const std::string origin = slash == std::string::npos ? url : url.substr(0, slash);
  const std::string path = slash == std::string::npos ? "/metrics" : url.substr(slash);
  httplib::Client client(origin);
  const int64_t micros = absl::ToInt64Microseconds(timeout);
  client.set_connection_timeout(micros / 1000000, micros % 1000000);
  client.set_read_timeout(micros / 1000000, micros % 1000000);
  httplib::Result result = client.Get(path.c_str());
  if (!result) {
    return absl::UnavailableError(
        absl::StrCat("GET ", url, ": ", httplib::to_string(result.error())));
  }
  if (result->status != 200) {
    return absl::UnavailableError(absl::StrCat("GET ", url, ": HTTP ", result->status));
  }
  return ParsePrometheusText(result->body);
}

std::map<double, double> HistogramDelta(const MetricsSnapshot& before, const MetricsSnapshot& after,
                                        const std::string& name) {
  const std::map<double, double> b = before.HistogramBuckets(name);
  const std::map<double, double> a = after.HistogramBuckets(name);
  std::map<double, double> delta;
  double previous_cumulative = 0;
  for (const auto& [bound, cumulative_after] : a) {
    auto it = b.find(bound);
    const double cumulative = cumulative_after - (it == b.end() ? 0.0 : it->second);
    delta[bound] = cumulative - previous_cumulative;
    previous_cumulative = cumulative;
  }
  return delta;
}

}  // namespace sparge::bench
