// Metrics: every documented name is exported, labels count separately, and the HTTP endpoint
// serves the text format.
#include "server/metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "httplib.h"

namespace sparge::server {
namespace {

using ::testing::HasSubstr;

const char* const kAllNames[] = {
    kRequestsTotal,      kRequestDurationSeconds, kQueueWaitSeconds,   kQueueDepth,
    kRunningJobs,        kBatchSize,              kDenoiseStepSeconds, kTextEncodeSeconds,
    kVaeDecodeSeconds,   kVideoEncodeSeconds,     kAttentionSparsityRatio,
    kCancellationsTotal, kOutputBytesTotal,       kModelReady,         kAttentionSecondsTotal,
    kJobStateBytes,      kPreemptionsTotal,       kDeviceMemoryBytes,  kSchedulerOverheadSeconds};

TEST(MetricsTest, EveryNameIsExportedWithHelpAndType) {
  ServerMetrics metrics;
  const std::string text = metrics.SerializeText();
  for (const char* name : kAllNames) {
    EXPECT_THAT(text, HasSubstr(std::string("# HELP ") + name + " ")) << name;
    EXPECT_THAT(text, HasSubstr(std::string("# TYPE ") + name + " ")) << name;
  }
  EXPECT_THAT(text, HasSubstr("# TYPE sparge_attention_sparsity_ratio histogram"));
  EXPECT_THAT(text, HasSubstr("# TYPE sparge_queue_depth gauge"));
  EXPECT_THAT(text, HasSubstr("# TYPE sparge_requests_total counter"));
  EXPECT_THAT(text, HasSubstr("# TYPE sparge_attention_seconds_total counter"));
}

TEST(MetricsTest, ValuesAndLabels) {
  ServerMetrics metrics;
  metrics.CountRequest("OK");
  metrics.CountRequest("OK");
  metrics.CountRequest("INVALID_ARGUMENT");
  metrics.CountCancellation("deadline");
  metrics.SetQueueDepth(3);
  metrics.ObserveSparsity(0.62);
  metrics.ObserveDenoiseStep(0.25);
  metrics.SetModelReady(true);
  metrics.AddAttentionSeconds(0.125);
  metrics.AddAttentionSeconds(0.0625);
  metrics.CountPreemption();
  metrics.CountPreemption();
  metrics.SetDeviceMemory(1000, 4096, 1 << 30);
  metrics.ObserveSchedulerOverhead(3e-6);
  const std::string text = metrics.SerializeText();
  EXPECT_THAT(text, HasSubstr("sparge_preemptions_total 2\n"));
  EXPECT_THAT(text, HasSubstr("sparge_device_memory_bytes{kind=\"allocated\"} 1000\n"));
  EXPECT_THAT(text, HasSubstr("sparge_device_memory_bytes{kind=\"reserved\"} 4096\n"));
  EXPECT_THAT(text, HasSubstr("sparge_device_memory_bytes{kind=\"total\"} 1073741824\n"));
  EXPECT_THAT(text, HasSubstr("sparge_scheduler_overhead_seconds_count 1\n"));
  EXPECT_THAT(text, HasSubstr("sparge_scheduler_overhead_seconds_bucket{le=\"4e-06\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("sparge_requests_total{status=\"OK\"} 2"));
  EXPECT_THAT(text, HasSubstr("sparge_requests_total{status=\"INVALID_ARGUMENT\"} 1"));
  EXPECT_THAT(text, HasSubstr("sparge_requests_total{status=\"CANCELLED\"} 0"));
  EXPECT_THAT(text, HasSubstr("sparge_cancellations_total{reason=\"deadline\"} 1"));
  EXPECT_THAT(text, HasSubstr("sparge_queue_depth 3"));
  EXPECT_THAT(text, HasSubstr("sparge_attention_sparsity_ratio_count 1"));
  EXPECT_THAT(text, HasSubstr("sparge_attention_sparsity_ratio_bucket{le=\"0.6\"} 0"));
  EXPECT_THAT(text, HasSubstr("sparge_attention_sparsity_ratio_bucket{le=\"0.65\"} 1"));
  EXPECT_THAT(text, HasSubstr("sparge_denoise_step_seconds_sum 0.25"));
  EXPECT_THAT(text, HasSubstr("sparge_model_ready 1"));
  EXPECT_THAT(text, HasSubstr("sparge_attention_seconds_total 0.1875"));
}

TEST(MetricsTest, HttpEndpointServesTheTextFormat) {
  ServerMetrics metrics;
  metrics.CountRequest("OK");
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http =
      MetricsHttpServer::Start(&metrics, "127.0.0.1", 0);
  ASSERT_TRUE(http.ok()) << http.status();
  ASSERT_GT((*http)->port(), 0);
  httplib::Client client("127.0.0.1", (*http)->port());
  httplib::Result res = client.Get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_THAT(res->get_header_value("Content-Type"), HasSubstr("text/plain"));
  for (const char* name : kAllNames) EXPECT_THAT(res->body, HasSubstr(name));
  EXPECT_THAT(res->body, HasSubstr("sparge_requests_total{status=\"OK\"} 1"));
  res = client.Get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  res = client.Get("/nope");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  (*http)->Stop();
  (*http)->Stop();  // idempotent
}

TEST(MetricsTest, PortInUseIsAnError) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> first =
      MetricsHttpServer::Start(&metrics, "127.0.0.1", 0);
  ASSERT_TRUE(first.ok());
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> second =
      MetricsHttpServer::Start(&metrics, "127.0.0.1", (*first)->port());
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace sparge::server
