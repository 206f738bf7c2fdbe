// Reads a sparge-server's Prometheus /metrics page (text exposition format) into a map of series,
// for the load tool and the integration tests: counters, gauges and histogram buckets by name and
// labels, and the difference of a histogram between two scrapes. Thread-safe (no shared state).
#pragma once

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace sparge::bench {

// Labels of one series, sorted by name.
using Labels = std::map<std::string, std::string>;

class MetricsSnapshot {
 public:
  // Value of the series `name{labels}`; 0 when absent (a counter never incremented is not shown
  // by some exporters, and 0 is then its value).
  double Get(const std::string& name, const Labels& labels = {}) const;
  bool Has(const std::string& name, const Labels& labels = {}) const;
  // Upper bound -> cumulative count of histogram `name` (its name_bucket series).
  std::map<double, double> HistogramBuckets(const std::string& name) const;
  void Set(const std::string& name, const Labels& labels, double value);
  size_t size() const { return series_.size(); }

 private:
  static std::string Key(const std::string& name, const Labels& labels);
  std::map<std::string, double> series_;
};

// Parses the text format (version 0.0.4). Comment lines are skipped; a malformed sample line is
// INVALID_ARGUMENT naming the line.
absl::StatusOr<MetricsSnapshot> ParsePrometheusText(absl::string_view text);

// GET `url` ("http://host:port/metrics") and parse it.
absl::StatusOr<MetricsSnapshot> ScrapeMetrics(const std::string& url, absl::Duration timeout);

// Observations of histogram `name` between two scrapes, per bucket (not cumulative), keyed by
// the bucket's upper bound (+Inf included).
std::map<double, double> HistogramDelta(const MetricsSnapshot& before, const MetricsSnapshot& after,
                                        const std::string& name);

}  // namespace sparge::bench
