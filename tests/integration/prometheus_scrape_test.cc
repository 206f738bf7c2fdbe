// The /metrics reader of the load tool and the integration tests: text-format parsing (labels,
// escapes, +Inf, timestamps, comments), lookups, and histogram deltas between two scrapes.
#include "bench/serving/prometheus_scrape.h"

#include <cmath>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sparge::bench {
namespace {

using ::testing::HasSubstr;

constexpr char kBefore[] = R"(# HELP sparge_batch_size Jobs per denoising step call
# TYPE sparge_batch_size histogram
sparge_batch_size_count 3
sparge_batch_size_sum 4
sparge_batch_size_bucket{le="1"} 2
sparge_batch_size_bucket{le="2"} 3
sparge_batch_size_bucket{le="4"} 3
sparge_batch_size_bucket{le="+Inf"} 3
sparge_cancellations_total{reason="client"} 1
sparge_queue_depth 0
)";

constexpr char kAfter[] = R"(sparge_batch_size_count 10
sparge_batch_size_sum 25
sparge_batch_size_bucket{le="1"} 3
sparge_batch_size_bucket{le="2"} 5
sparge_batch_size_bucket{le="4"} 10
sparge_batch_size_bucket{le="+Inf"} 10
sparge_cancellations_total{reason="client"} 4 1700000000000
sparge_cancellations_total{reason="deadline"} 2
weird{a="x,y",b="q\"uote"} 7
)";

TEST(PrometheusScrapeTest, ParsesSamplesLabelsAndTimestamps) {
  absl::StatusOr<MetricsSnapshot> m = ParsePrometheusText(kAfter);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->Get("sparge_batch_size_count"), 10);
  EXPECT_EQ(m->Get("sparge_cancellations_total", {{"reason", "client"}}), 4);
  EXPECT_EQ(m->Get("sparge_cancellations_total", {{"reason", "deadline"}}), 2);
  EXPECT_EQ(m->Get("weird", {{"b", "q\"uote"}, {"a", "x,y"}}), 7);
  EXPECT_FALSE(m->Has("sparge_cancellations_total", {{"reason", "shutdown"}}));
  EXPECT_EQ(m->Get("sparge_cancellations_total", {{"reason", "shutdown"}}), 0);
  const std::map<double, double> buckets = m->HistogramBuckets("sparge_batch_size");
  ASSERT_EQ(buckets.size(), 4u);
  EXPECT_EQ(buckets.at(std::numeric_limits<double>::infinity()), 10);
}

TEST(PrometheusScrapeTest, HistogramDeltaIsPerBucketBetweenScrapes) {
  absl::StatusOr<MetricsSnapshot> before = ParsePrometheusText(kBefore);
  absl::StatusOr<MetricsSnapshot> after = ParsePrometheusText(kAfter);
  ASSERT_TRUE(before.ok() && after.ok());
  const std::map<double, double> d = HistogramDelta(*before, *after, "sparge_batch_size");
  // Cumulative deltas 1, 2, 7, 7 -> per bucket 1, 1, 5, 0.
  EXPECT_EQ(d.at(1), 1);
  EXPECT_EQ(d.at(2), 1);
  EXPECT_EQ(d.at(4), 5);
  EXPECT_EQ(d.at(std::numeric_limits<double>::infinity()), 0);
}

TEST(PrometheusScrapeTest, MalformedLinesNameTheLine) {
  absl::StatusOr<MetricsSnapshot> m = ParsePrometheusText("ok 1\nbroken{le=\"1} 2\n");
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("line 2"));
  EXPECT_FALSE(ParsePrometheusText("no_value\n").ok());
  EXPECT_FALSE(ParsePrometheusText("x abc\n").ok());
}

TEST(PrometheusScrapeTest, ScrapeRejectsNonHttpAndUnreachableUrls) {
  EXPECT_FALSE(ScrapeMetrics("https://127.0.0.1:1/metrics", absl::Seconds(1)).ok());
  absl::StatusOr<MetricsSnapshot> m = ScrapeMetrics("http://127.0.0.1:1/metrics", absl::Seconds(1));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace sparge::bench
