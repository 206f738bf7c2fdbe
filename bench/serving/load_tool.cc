// sparge-load: closed-loop load generator for sparge-server. N client threads each send Generate
// calls back to back (for a duration or a total count) drawn from a weighted mix of request
// shapes and sparsity knobs, optionally cancel a fraction of them mid-denoise (and measure how
// long the server takes to stop them) or give them deadlines, and report throughput, latency and
// queue-wait percentiles, achieved sparsity, status counts and the server's batch-size histogram
// (from /metrics) on stdout and as JSON. `--compare` turns two such JSONs (batch size 1 and
// batched) into a comparison JSON. Run `sparge-load --help`.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/serving/prometheus_scrape.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "nlohmann/json.hpp"
#include "server/grpc_status.h"
#include "server/health_client.h"
#include "server/internal/flag_parser.h"
#include "sparge/v1/video_service.grpc.pb.h"
#include "yaml-cpp/yaml.h"

namespace sparge::bench {
namespace {

namespace v1 = ::sparge::v1;
using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

constexpr char kUsage[] =
    "sparge-load: closed-loop load generator for sparge-server (sparge.v1.VideoService).\n"
    "\n"
    "Usage: sparge-load --target HOST:PORT (--requests N | --duration-seconds S) [options]\n"
    "       sparge-load --compare-baseline A1.json[,A2.json...] --compare-batched B1.json[,...]\n"
    "                   --out C.json\n"
    "\n"
    "Each of --clients threads sends Generate calls one after another until --requests calls\n"
    "have been sent in total or --duration-seconds have passed (in-flight calls then finish).\n"
    "Requests are drawn from the mix: --mix-file (YAML list of entries) or --mix (entries\n"
    "separated by ';', fields by ','), e.g.\n"
    "  --mix 'weight=3,width=64,height=64,frames=5,steps=4,mode=topk,topk=0.2;weight=1,steps=8'\n"
    "Entry fields: weight, width, height, frames, steps, mode (dense|topk|topp|hybrid), topk,\n"
    "topp, dense_steps, guidance, priority (low|normal|high); unset fields take the server's\n"
    "defaults. Request seeds are --seed + request index, so a rerun sends the same requests.\n"
    "\n"
    "Cancellation: a --cancel-fraction of requests is cancelled --cancel-delay-seconds after the\n"
    "progress event of denoising step --cancel-after-steps. With --metrics-url the tool then\n"
    "polls /metrics until sparge_cancellations_total{reason=\"client\"} rises (cancellations are\n"
    "measured one at a time) and reports the latency in seconds and in denoising steps.\n"
    "\n"
    "Output: a summary on stdout and JSON in --out, or when --out is empty in\n"
    "--out-dir/load-<card|cpu>-<config-name>-<UTC date>.json. --out - writes no file.\n"
    "\n"
    "Flags:\n";

// ---------------------------------------------------------------------------------------------
// The request mix.

struct MixEntry {
  double weight = 1;
  std::optional<int> width, height, frames, steps, dense_steps;
  std::optional<float> topk, topp, guidance;
  std::optional<v1::AttentionMode> mode;
  std::optional<v1::Priority> priority;
};

absl::StatusOr<v1::AttentionMode> ParseMode(absl::string_view s) {
  const std::string m = absl::AsciiStrToLower(s);
  if (m == "dense") return v1::ATTENTION_MODE_DENSE;
  if (m == "topk") return v1::ATTENTION_MODE_TOPK;
  if (m == "topp") return v1::ATTENTION_MODE_TOPP;
  if (m == "hybrid") return v1::ATTENTION_MODE_HYBRID;
  return absl::InvalidArgumentError(
      absl::StrCat("mode: must be one of dense, topk, topp, hybrid, got \"", s, "\""));
}

absl::StatusOr<v1::Priority> ParsePriority(absl::string_view s) {
  const std::string p = absl::AsciiStrToLower(s);
  if (p == "low") return v1::PRIORITY_LOW;
  if (p == "normal") return v1::PRIORITY_NORMAL;
  if (p == "high") return v1::PRIORITY_HIGH;
  return absl::InvalidArgumentError(
      absl::StrCat("priority: must be one of low, normal, high, got \"", s, "\""));
}

// Sets one field of `entry` from its text value.
absl::Status SetMixField(MixEntry* entry, const std::string& key, const std::string& value) {
  auto as_int = [&](std::optional<int>* out) -> absl::Status {
    int v;
    if (!absl::SimpleAtoi(value, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix field ", key, ": want an integer, got \"", value, "\""));
    }
    *out = v;
    return absl::OkStatus();
  };
  auto as_float = [&](std::optional<float>* out) -> absl::Status {
    float v;
    if (!absl::SimpleAtof(value, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix field ", key, ": want a number, got \"", value, "\""));
    }
    *out = v;
    return absl::OkStatus();
  };
  if (key == "weight") {
    double w;
    if (!absl::SimpleAtod(value, &w) || !(w > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix field weight: want a number > 0, got \"", value, "\""));
    }
    entry->weight = w;
    return absl::OkStatus();
  }
  if (key == "width") return as_int(&entry->width);
  if (key == "height") return as_int(&entry->height);
  if (key == "frames") return as_int(&entry->frames);
  if (key == "steps") return as_int(&entry->steps);
  if (key == "dense_steps") return as_int(&entry->dense_steps);
  if (key == "topk") return as_float(&entry->topk);
  if (key == "topp") return as_float(&entry->topp);
  if (key == "guidance") return as_float(&entry->guidance);
  if (key == "mode") {
    absl::StatusOr<v1::AttentionMode> m = ParseMode(value);
    if (!m.ok()) return m.status();
    entry->mode = *m;
    return absl::OkStatus();
  }
  if (key == "priority") {
    absl::StatusOr<v1::Priority> p = ParsePriority(value);
    if (!p.ok()) return p.status();
    entry->priority = *p;
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown mix field \"", key,
      "\" (known: weight, width, height, frames, steps, mode, topk, topp, dense_steps, guidance, "
      "priority)"));
}

absl::StatusOr<std::vector<MixEntry>> ParseMixSpec(const std::string& spec) {
  std::vector<MixEntry> mix;
  for (absl::string_view part : absl::StrSplit(spec, ';', absl::SkipWhitespace())) {
    MixEntry entry;
    for (absl::string_view field : absl::StrSplit(part, ',', absl::SkipWhitespace())) {
      std::pair<std::string, std::string> kv = absl::StrSplit(field, absl::MaxSplits('=', 1));
      absl::Status s = SetMixField(&entry, std::string(absl::StripAsciiWhitespace(kv.first)),
                                   std::string(absl::StripAsciiWhitespace(kv.second)));
      if (!s.ok()) return s;
    }
    mix.push_back(entry);
  }
  if (mix.empty()) return absl::InvalidArgumentError("--mix: no entries");
  return mix;
}

absl::StatusOr<std::vector<MixEntry>> LoadMixYaml(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  if (root["mix"]) root = root["mix"];
  if (!root.IsSequence() || root.size() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": want a non-empty list of mix entries (or a map with key mix)"));
  }
  std::vector<MixEntry> mix;
  for (const YAML::Node& node : root) {
    if (!node.IsMap()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", node.Mark().line + 1, ": a mix entry must be a map"));
    }
    MixEntry entry;
    for (const auto& kv : node) {
      absl::Status s = SetMixField(&entry, kv.first.as<std::string>(), kv.second.as<std::string>());
      if (!s.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", kv.first.Mark().line + 1, ": ", s.message()));
      }
    }
    mix.push_back(entry);
  }
  return mix;
}

json MixEntryJson(const MixEntry& e) {
  json j;
  j["weight"] = e.weight;
  if (e.width) j["width"] = *e.width;
  if (e.height) j["height"] = *e.height;
  if (e.frames) j["frames"] = *e.frames;
  if (e.steps) j["steps"] = *e.steps;
  if (e.mode) j["mode"] = v1::AttentionMode_Name(*e.mode);
  if (e.topk) j["topk"] = *e.topk;
  if (e.topp) j["topp"] = *e.topp;
  if (e.dense_steps) j["dense_steps"] = *e.dense_steps;
  if (e.guidance) j["guidance"] = *e.guidance;
  if (e.priority) j["priority"] = v1::Priority_Name(*e.priority);
  return j;
}

v1::GenerateRequest BuildRequest(const MixEntry& e, const std::string& prompt, uint64_t seed,
                                 v1::OutputFormat format) {
  v1::GenerateRequest r;
  r.set_prompt(prompt);
  r.set_seed(seed);
  r.set_output_format(format);
  if (e.width) r.set_width(*e.width);
  if (e.height) r.set_height(*e.height);
  if (e.frames) r.set_num_frames(*e.frames);
  if (e.steps) r.set_num_steps(*e.steps);
  if (e.guidance) r.set_guidance_scale(*e.guidance);
  if (e.priority) r.set_priority(*e.priority);
  if (e.mode) r.mutable_sparsity()->set_mode(*e.mode);
  if (e.topk) r.mutable_sparsity()->set_topk(*e.topk);
  if (e.topp) r.mutable_sparsity()->set_topp(*e.topp);
  if (e.dense_steps) r.mutable_sparsity()->set_dense_steps(*e.dense_steps);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Running the load.

struct Options {
  std::string target;
  std::string metrics_url;
  int clients = 4;
  int requests = 0;
  double duration_seconds = 0;
  std::vector<MixEntry> mix;
  std::string prompt = "a lighthouse on a cliff at dusk, waves breaking below";
  uint64_t seed = 1;
  v1::OutputFormat format = v1::OUTPUT_FORMAT_MP4;
  double cancel_fraction = 0;
  int cancel_after_steps = 1;
  double cancel_delay_seconds = 0;
  double deadline_seconds = 0;
};

// What one Generate call did.
struct Record {
  int entry = 0;
  uint64_t seed = 0;
  std::string status;  // gRPC code name
  std::string message;
  double start_seconds = 0;  // since the run started
  double latency_seconds = 0;
  std::optional<double> queue_wait_seconds;  // accepted -> first non-QUEUED progress (client)
  std::optional<double> server_queue_wait_seconds;
  int steps = 0;  // of the resolved request
  std::optional<float> mean_sparsity;
  int64_t bytes = 0;
  int max_batch_hint = 0;
  bool cancel_planned = false;
  bool cancelled = false;
  bool cancel_skipped = false;  // planned, but never free to be measured before the job ended
  std::optional<double> cancel_latency_seconds;  // cancel -> server counted it
  std::string job_id;
  std::optional<double> step_calls_after_cancel;  // step calls the executor made meanwhile
  std::optional<double> job_steps_after_cancel;   // the job's steps after the last one seen
  std::optional<double> step_seconds;             // mean step call time (server) at the cancel
};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

class LoadRunner {
 public:
  explicit LoadRunner(const Options& options) : options_(options) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // One channel per client: a shared HTTP/2 connection would serialize their frames.
    for (int i = 0; i < options.clients; ++i) {
      args.SetInt("sparge.load.client", i);  // distinct args -> distinct subchannels
      stubs_.push_back(v1::VideoService::NewStub(
          grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args)));
    }
    double total = 0;
    for (const MixEntry& e : options.mix) total += e.weight;
    double acc = 0;
    for (const MixEntry& e : options.mix) {
      acc += e.weight / total;
      cumulative_.push_back(acc);
    }
  }

  std::vector<Record> Run() {
    start_ = Clock::now();
    std::vector<std::thread> threads;
    for (int i = 0; i < options_.clients; ++i) threads.emplace_back([this, i] { Client(i); });
    for (std::thread& t : threads) t.join();
    end_ = Clock::now();
    std::sort(records_.begin(), records_.end(),
              [](const Record& a, const Record& b) { return a.seed < b.seed; });
    return records_;
  }

  double wall_seconds() const { return Seconds(end_ - start_); }

 private:
  // Claims the next request index, or nullopt when the run is over.
  std::optional<int64_t> NextIndex() {
    if (options_.duration_seconds > 0 &&
        Seconds(Clock::now() - start_) >= options_.duration_seconds) {
      return std::nullopt;
    }
    const int64_t index = next_index_.fetch_add(1);
    if (options_.requests > 0 && index >= options_.requests) return std::nullopt;
    return index;
  }

  // The choice of entry and cancellation depends only on the seed and the request index, so a
  // rerun (or the other server configuration of a comparison) sends the same requests.
  void Client(int client) {
    while (std::optional<int64_t> index = NextIndex()) {
      std::mt19937_64 rng(options_.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(*index));
      std::uniform_real_distribution<double> uniform(0.0, 1.0);
      const double pick = uniform(rng);
      int entry = 0;
      while (entry + 1 < static_cast<int>(cumulative_.size()) && pick > cumulative_[entry]) {
        ++entry;
      }
      const bool cancel = uniform(rng) < options_.cancel_fraction;
      Record r = RunOne(client, entry, options_.seed + static_cast<uint64_t>(*index), cancel);
      std::lock_guard<std::mutex> lock(mu_);
      records_.push_back(std::move(r));
    }
  }

  Record RunOne(int client, int entry, uint64_t seed, bool cancel) {
    Record r;
    r.entry = entry;
    r.seed = seed;
    r.cancel_planned = cancel;
    const v1::GenerateRequest request =
        BuildRequest(options_.mix[entry], options_.prompt, seed, options_.format);
    grpc::ClientContext context;
    const Clock::time_point t0 = Clock::now();
    r.start_seconds = Seconds(t0 - start_);
    if (options_.deadline_seconds > 0) {
      context.set_deadline(
          std::chrono::system_clock::now() +
          std::chrono::microseconds(static_cast<int64_t>(options_.deadline_seconds * 1e6)));
    }
    std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader =
        stubs_[client]->Generate(&context, request);
    v1::GenerateEvent event;
    std::optional<Clock::time_point> accepted_at;
    std::vector<Clock::time_point> step_times;
    while (reader->Read(&event)) {
      const Clock::time_point now = Clock::now();
      switch (event.event_case()) {
        case v1::GenerateEvent::kAccepted:
          accepted_at = now;
          r.job_id = event.accepted().job_id();
          r.steps = event.accepted().resolved_request().num_steps();
          break;
        case v1::GenerateEvent::kProgress: {
          const v1::JobProgress& p = event.progress();
          if (p.stage() != v1::STAGE_QUEUED && accepted_at && !r.queue_wait_seconds) {
            r.queue_wait_seconds = Seconds(now - *accepted_at);
          }
          if (p.stage() == v1::STAGE_DENOISE) {
            step_times.push_back(now);
            if (cancel && !r.cancelled && p.step() >= options_.cancel_after_steps &&
                p.step() < p.total_steps()) {
              if (options_.cancel_delay_seconds > 0) {
                std::this_thread::sleep_for(std::chrono::microseconds(
                    static_cast<int64_t>(options_.cancel_delay_seconds * 1e6)));
              }
              CancelAndMeasure(client, &context, &r, step_times, p.step());
            }
          }
          break;
        }
        case v1::GenerateEvent::kChunk:
          r.bytes += static_cast<int64_t>(event.chunk().data().size());
          break;
        case v1::GenerateEvent::kCompleted:
          r.mean_sparsity = event.completed().mean_achieved_sparsity();
          r.server_queue_wait_seconds = event.completed().queue_wait_seconds();
          break;
        default:
          break;
      }
      if (r.cancelled) break;
    }
    const grpc::Status status = reader->Finish();
    r.latency_seconds = Seconds(Clock::now() - t0);
    r.status = server::StatusCodeName(static_cast<absl::StatusCode>(status.error_code()));
    r.message = status.error_message();
    return r;
  }

  // Cancels the call and, with metrics, waits for the server to count the cancellation. One
  // measurement at a time, so the counter's rise belongs to this call.
  void CancelAndMeasure(int client, grpc::ClientContext* context, Record* r,
                        const std::vector<Clock::time_point>& step_times, int step_seen) {
    // The job's own step time, from its progress events; the server's mean step time replaces
    // it below when metrics are on (it excludes the streaming and thread wake-up delays).
    if (step_times.size() >= 2) {
      std::vector<double> intervals;
      for (size_t i = 1; i < step_times.size(); ++i) {
        intervals.push_back(Seconds(step_times[i] - step_times[i - 1]));
      }
      std::nth_element(intervals.begin(), intervals.begin() + intervals.size() / 2,
                       intervals.end());
      r->step_seconds = intervals[intervals.size() / 2];
    }
    if (options_.metrics_url.empty()) {
      r->cancelled = true;
      context->TryCancel();
      return;
    }
    // While another call's cancellation is being measured, this one is not cancelled yet (its
    // count would land in the other's window): it tries again at its next step, and finishes
    // normally if it runs out of steps first (counted as cancel_skipped).
    std::unique_lock<std::mutex> lock(cancel_mu_, std::try_to_lock);
    if (!lock.owns_lock()) {
      r->cancel_skipped = true;
      return;
    }
    r->cancelled = true;
    r->cancel_skipped = false;
    absl::StatusOr<MetricsSnapshot> before = ScrapeMetrics(options_.metrics_url, absl::Seconds(5));
    const Clock::time_point t0 = Clock::now();
    context->TryCancel();
    if (!before.ok()) return;
    const Labels client_reason = {{"reason", "client"}};
    const double cancels_before = before->Get("sparge_cancellations_total", client_reason);
    const double steps_before = before->Get("sparge_denoise_step_seconds_count");
    if (steps_before > 0) {
      r->step_seconds = before->Get("sparge_denoise_step_seconds_sum") / steps_before;
    }
    // A job that finished before the cancel reached it is never counted: give up after 10 s.
    while (Seconds(Clock::now() - t0) < 10) {
      absl::StatusOr<MetricsSnapshot> now = ScrapeMetrics(options_.metrics_url, absl::Seconds(5));
      if (now.ok() && now->Get("sparge_cancellations_total", client_reason) > cancels_before) {
        r->cancel_latency_seconds = Seconds(Clock::now() - t0);
        r->step_calls_after_cancel = now->Get("sparge_denoise_step_seconds_count") - steps_before;
        // The job's own last step, from the job API (servers without it answer UNIMPLEMENTED).
        grpc::ClientContext get_context;
        get_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
        v1::GetJobRequest get;
        get.set_job_id(r->job_id);
        v1::Job job;
        if (stubs_[client]->GetJob(&get_context, get, &job).ok()) {
          r->job_steps_after_cancel = job.progress().step() - step_seen;
        }
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }

  const Options& options_;
  std::vector<std::unique_ptr<v1::VideoService::Stub>> stubs_;
  std::vector<double> cumulative_;
  std::atomic<int64_t> next_index_{0};
  Clock::time_point start_, end_;
  std::mutex mu_;
  std::vector<Record> records_;
  std::mutex cancel_mu_;
};

// ---------------------------------------------------------------------------------------------
// Reporting.

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

json Distribution(const std::vector<double>& v) {
  json j;
  j["count"] = v.size();
  if (v.empty()) return j;
  double sum = 0;
  for (double x : v) sum += x;
  j["mean"] = sum / v.size();
  j["p50"] = Percentile(v, 0.50);
  j["p95"] = Percentile(v, 0.95);
  j["p99"] = Percentile(v, 0.99);
  j["max"] = *std::max_element(v.begin(), v.end());
  return j;
}

std::string BoundName(double bound) {
  if (std::isinf(bound)) return "+Inf";
  return absl::StrFormat("%g", bound);
}

std::string RunCommand(const std::string& command) {
  std::string out;
  if (FILE* p = popen(command.c_str(), "r")) {
    char buf[256];
    while (fgets(buf, sizeof(buf), p)) out += buf;
    pclose(p);
  }
  return std::string(absl::StripAsciiWhitespace(out));
}

// "cpu", or the GPU's name from GetServerInfo's "cuda:0 (NVIDIA H200)", as a file-name part.
std::string CardName(const std::string& device) {
  std::string name = device;
  const size_t open = device.find('(');
  const size_t close = device.rfind(')');
  if (open != std::string::npos && close != std::string::npos && close > open) {
    name = device.substr(open + 1, close - open - 1);
    if (absl::StartsWith(name, "NVIDIA ")) name = name.substr(7);
  }
  std::string out;
  for (char c : name) {
    out.push_back(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' ? c
                                                                                             : '_');
  }
  return out.empty() ? "unknown" : out;
}

json YamlToJson(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: {
      json j = json::object();
      for (const auto& kv : node) j[kv.first.as<std::string>()] = YamlToJson(kv.second);
      return j;
    }
    case YAML::NodeType::Sequence: {
      json j = json::array();
      for (const auto& item : node) j.push_back(YamlToJson(item));
      return j;
    }
    case YAML::NodeType::Scalar: {
      const std::string s = node.as<std::string>();
      int64_t i;
      if (absl::SimpleAtoi(s, &i)) return i;
      double d;
      if (absl::SimpleAtod(s, &d) && s.find_first_not_of("0123456789.eE+-") == std::string::npos) {
        return d;
      }
      if (s == "true" || s == "false") return s == "true";
      return s;
    }
    default:
      return nullptr;
  }
}

json Summarize(const Options& options, const std::vector<Record>& records, double wall_seconds,
               const std::optional<MetricsSnapshot>& before,
               const std::optional<MetricsSnapshot>& after) {
  json results;
  results["wall_seconds"] = wall_seconds;
  results["requests_sent"] = records.size();
  std::map<std::string, int> status_counts;
  std::vector<double> latency, queue_wait, server_queue_wait, sparsity, cancel_latency,
      cancel_steps, cancel_job_steps, cancel_in_steps;
  int64_t ok_steps = 0, ok_videos = 0, ok_bytes = 0;
  std::vector<int> per_entry_ok(options.mix.size(), 0);
  std::vector<std::vector<double>> per_entry_latency(options.mix.size());
  for (const Record& r : records) {
    ++status_counts[r.status];
    if (r.queue_wait_seconds) queue_wait.push_back(*r.queue_wait_seconds);
    if (r.status == "OK") {
      ++ok_videos;
      ok_steps += r.steps;
      ok_bytes += r.bytes;
      latency.push_back(r.latency_seconds);
      ++per_entry_ok[r.entry];
      per_entry_latency[r.entry].push_back(r.latency_seconds);
      if (r.server_queue_wait_seconds) server_queue_wait.push_back(*r.server_queue_wait_seconds);
      if (r.mean_sparsity) sparsity.push_back(*r.mean_sparsity);
    }
    if (r.cancel_latency_seconds) {
      cancel_latency.push_back(*r.cancel_latency_seconds);
      if (r.step_calls_after_cancel) cancel_steps.push_back(*r.step_calls_after_cancel);
      if (r.job_steps_after_cancel) cancel_job_steps.push_back(*r.job_steps_after_cancel);
      if (r.step_seconds && *r.step_seconds > 0) {
        cancel_in_steps.push_back(*r.cancel_latency_seconds / *r.step_seconds);
      }
    }
  }
  results["status_counts"] = status_counts;
  results["videos_ok"] = ok_videos;
  results["videos_per_second"] = wall_seconds > 0 ? ok_videos / wall_seconds : 0.0;
  results["denoise_steps_per_second"] = wall_seconds > 0 ? ok_steps / wall_seconds : 0.0;
  results["output_bytes"] = ok_bytes;
  results["latency_seconds"] = Distribution(latency);
  results["queue_wait_seconds"] = Distribution(queue_wait);
  results["server_queue_wait_seconds"] = Distribution(server_queue_wait);
  double mean_sparsity = 0;
  for (double s : sparsity) mean_sparsity += s;
  results["mean_achieved_sparsity"] = sparsity.empty() ? 0.0 : mean_sparsity / sparsity.size();
  json per_entry = json::array();
  for (size_t i = 0; i < options.mix.size(); ++i) {
    json e = MixEntryJson(options.mix[i]);
    e["videos_ok"] = per_entry_ok[i];
    e["latency_seconds"] = Distribution(per_entry_latency[i]);
    per_entry.push_back(e);
  }
  results["per_entry"] = per_entry;
  if (options.cancel_fraction > 0) {
    json c;
    c["cancelled"] =
        std::count_if(records.begin(), records.end(), [](const Record& r) { return r.cancelled; });
    c["measured"] = cancel_latency.size();
    c["skipped_while_another_was_measured"] =
        std::count_if(records.begin(), records.end(),
                      [](const Record& r) { return r.cancel_skipped && !r.cancelled; });
    c["latency_seconds"] = Distribution(cancel_latency);
    // Denoising steps the job ran after the last step the client had seen when it cancelled
    // (GetJob's final progress): 1 when it stopped at the next step boundary, 2 when a step ended
    // while the cancel was in transit.
    c["job_steps_after_cancel"] = Distribution(cancel_job_steps);
    // Step calls the executor made (any batch) between the cancel and the job's end.
    c["step_calls_after_cancel"] = Distribution(cancel_steps);
    // The latency divided by the mean denoising step call time (server's, since its start).
    c["latency_in_step_times"] = Distribution(cancel_in_steps);
    results["cancellation"] = c;
  }
  if (before && after) {
    json server;
    std::map<double, double> hist = HistogramDelta(*before, *after, "sparge_batch_size");
    json h = json::object();
    for (const auto& [bound, count] : hist) {
      if (count > 0) h[BoundName(bound)] = count;
    }
    server["batch_size_histogram"] = h;  // upper bound of the bucket -> denoising step calls
    const double calls =
        after->Get("sparge_batch_size_count") - before->Get("sparge_batch_size_count");
    const double jobs = after->Get("sparge_batch_size_sum") - before->Get("sparge_batch_size_sum");
    server["denoise_step_calls"] = calls;
    server["mean_batch_size"] = calls > 0 ? jobs / calls : 0.0;
    const double step_seconds = after->Get("sparge_denoise_step_seconds_sum") -
                                before->Get("sparge_denoise_step_seconds_sum");
    server["denoise_step_seconds_mean"] = calls > 0 ? step_seconds / calls : 0.0;
    server["job_denoise_steps"] = jobs;
    // Jobs' denoising steps per second spent in step calls: what batching buys in the DiT alone,
    // without decode, encode and streaming.
    server["job_steps_per_step_second"] = step_seconds > 0 ? jobs / step_seconds : 0.0;
    const double attention = after->Get("sparge_attention_seconds_total") -
                             before->Get("sparge_attention_seconds_total");
    server["attention_share_of_step_time"] = step_seconds > 0 ? attention / step_seconds : 0.0;
    json cancels = json::object();
    for (const char* reason : {"client", "deadline", "shutdown"}) {
      cancels[reason] = after->Get("sparge_cancellations_total", {{"reason", reason}}) -
                        before->Get("sparge_cancellations_total", {{"reason", reason}});
    }
    server["cancellations"] = cancels;
    results["server_metrics"] = server;
  }
  return results;
}

void PrintSummary(const json& report) {
  const json& r = report["results"];
  auto ms = [](const json& d, const char* key) {
    return d.contains(key) ? absl::StrFormat("%8.1f", d[key].get<double>() * 1000) : "       -";
  };
  std::printf("sparge-load: %s, %d clients, %zu requests in %.2f s\n",
              report["server"]["target"].get<std::string>().c_str(),
              report["load"]["clients"].get<int>(), r["requests_sent"].get<size_t>(),
              r["wall_seconds"].get<double>());
  std::string statuses;
  for (const auto& [code, n] : r["status_counts"].items()) {
    absl::StrAppend(&statuses, statuses.empty() ? "" : ", ", code, " ", n.get<int>());
  }
  std::printf("  status:       %s\n", statuses.c_str());
  std::printf("  throughput:   %.3f videos/s, %.2f denoise steps/s\n",
              r["videos_per_second"].get<double>(), r["denoise_steps_per_second"].get<double>());
  std::printf("  %-13s %8s %8s %8s %8s  (ms)\n", "", "p50", "p95", "p99", "max");
  for (const char* key : {"latency_seconds", "queue_wait_seconds"}) {
    const json& d = r[key];
    std::printf(
        "  %-13s %s %s %s %s  (n=%d)\n",
        key == std::string("latency_seconds") ? "latency:" : "queue wait:", ms(d, "p50").c_str(),
        ms(d, "p95").c_str(), ms(d, "p99").c_str(), ms(d, "max").c_str(), d["count"].get<int>());
  }
  std::printf("  sparsity:     %.3f mean achieved\n", r["mean_achieved_sparsity"].get<double>());
  if (r.contains("server_metrics")) {
    const json& s = r["server_metrics"];
    std::string hist;
    for (const auto& [bound, n] : s["batch_size_histogram"].items()) {
      absl::StrAppend(&hist, hist.empty() ? "" : ", ", "<=", bound, ": ", n.get<double>());
    }
    std::printf("  batch size:   mean %.2f over %.0f step calls [%s], step %.1f ms\n",
                s["mean_batch_size"].get<double>(), s["denoise_step_calls"].get<double>(),
                hist.c_str(), s["denoise_step_seconds_mean"].get<double>() * 1000);
  }
  if (r.contains("cancellation")) {
    const json& c = r["cancellation"];
    const json& job_steps = c["job_steps_after_cancel"];
    std::printf(
        "  cancel:       %d cancelled, %d measured; latency%s ms; job steps after cancel "
        "max %s\n",
        c["cancelled"].get<int>(), c["measured"].get<int>(),
        absl::StrCat(" p50 ", ms(c["latency_seconds"], "p50"), " max ",
                     ms(c["latency_seconds"], "max"))
            .c_str(),
        job_steps.contains("max") ? absl::StrFormat("%.0f", job_steps["max"].get<double>()).c_str()
                                  : "-");
  }
}

absl::StatusOr<json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  try {
    return json::parse(in);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
}

absl::Status WriteJson(const json& j, const std::string& path) {
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

double Get(const json& j, std::initializer_list<const char*> keys) {
  const json* node = &j;
  for (const char* k : keys) {
    if (!node->is_object() || !node->contains(k)) return NAN;
    node = &(*node)[k];
  }
  return node->is_number() ? node->get<double>() : NAN;
}

// One configuration's runs pooled: videos and steps over the summed wall time, so a slow
// (contended) run weighs by its length rather than skewing a mean of rates.
json Pool(const std::vector<json>& runs) {
  double wall = 0, videos = 0, steps = 0, job_steps = 0, step_seconds = 0;
  json per_run = json::array();
  for (const json& r : runs) {
    const double w = Get(r, {"results", "wall_seconds"});
    wall += w;
    const double calls = Get(r, {"results", "server_metrics", "denoise_step_calls"});
    if (calls > 0) {
      job_steps += Get(r, {"results", "server_metrics", "job_denoise_steps"});
      step_seconds += calls * Get(r, {"results", "server_metrics", "denoise_step_seconds_mean"});
    }
    videos += Get(r, {"results", "videos_per_second"}) * w;
    steps += Get(r, {"results", "denoise_steps_per_second"}) * w;
    json s;
    s["videos_per_second"] = Get(r, {"results", "videos_per_second"});
    s["denoise_steps_per_second"] = Get(r, {"results", "denoise_steps_per_second"});
    s["wall_seconds"] = w;
    s["latency_seconds"] = r["results"].value("latency_seconds", json());
    s["queue_wait_seconds"] = r["results"].value("queue_wait_seconds", json());
    s["status_counts"] = r["results"].value("status_counts", json());
    if (r["results"].contains("server_metrics")) {
      const json& m = r["results"]["server_metrics"];
      s["mean_batch_size"] = m.value("mean_batch_size", 0.0);
      s["batch_size_histogram"] = m.value("batch_size_histogram", json());
      s["denoise_step_seconds_mean"] = m.value("denoise_step_seconds_mean", 0.0);
      s["job_steps_per_step_second"] = m.value("job_steps_per_step_second", 0.0);
    }
    per_run.push_back(s);
  }
  json pooled;
  pooled["runs"] = runs.size();
  pooled["wall_seconds"] = wall;
  pooled["videos_per_second"] = wall > 0 ? videos / wall : 0.0;
  pooled["denoise_steps_per_second"] = wall > 0 ? steps / wall : 0.0;
  pooled["job_steps_per_step_second"] = step_seconds > 0 ? job_steps / step_seconds : 0.0;
  pooled["per_run"] = per_run;
  return pooled;
}

// Batched vs batch-size-1 runs of the same load; each list is comma-separated, run i of one
// paired with run i of the other (interleave them so that drifting machine load hits both).
absl::Status Compare(const std::string& baseline_paths, const std::string& batched_paths,
                     const std::string& out_path) {
  std::vector<json> base, batched;
  for (auto [paths, runs] :
       {std::pair{&baseline_paths, &base}, std::pair{&batched_paths, &batched}}) {
    for (absl::string_view path : absl::StrSplit(*paths, ',', absl::SkipEmpty())) {
      absl::StatusOr<json> j = ReadJson(std::string(path));
      if (!j.ok()) return j.status();
      runs->push_back(*std::move(j));
    }
  }
  if (base.empty() || base.size() != batched.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--compare-baseline and --compare-batched need the same number of reports, "
                     "got ",
                     base.size(), " and ", batched.size()));
  }
  json c;
  c["tool"] = "sparge-load --compare";
  c["baseline_files"] = absl::StrSplit(baseline_paths, ',', absl::SkipEmpty());
  c["batched_files"] = absl::StrSplit(batched_paths, ',', absl::SkipEmpty());
  for (const char* key : {"commit", "date", "host", "server", "load"}) {
    if (batched.back().contains(key)) c[key] = batched.back()[key];
  }
  c["baseline_server_config"] = base.back().value("server_config", json());
  c["batched_server_config"] = batched.back().value("server_config", json());
  const json pooled_base = Pool(base), pooled_batched = Pool(batched);
  std::vector<double> pair_ratios;
  for (size_t i = 0; i < base.size(); ++i) {
    pair_ratios.push_back(Get(batched[i], {"results", "videos_per_second"}) /
                          Get(base[i], {"results", "videos_per_second"}));
  }
  json ratio;
  const double vps_ratio = pooled_batched["videos_per_second"].get<double>() /
                           pooled_base["videos_per_second"].get<double>();
  ratio["videos_per_second"] = vps_ratio;
  ratio["denoise_steps_per_second"] = pooled_batched["denoise_steps_per_second"].get<double>() /
                                      pooled_base["denoise_steps_per_second"].get<double>();
  ratio["job_steps_per_step_second"] = pooled_batched["job_steps_per_step_second"].get<double>() /
                                       pooled_base["job_steps_per_step_second"].get<double>();
  ratio["videos_per_second_per_pair"] = pair_ratios;
  ratio["videos_per_second_median_pair"] = Percentile(pair_ratios, 0.5);
  c["batched_over_baseline"] = ratio;
  c["baseline"] = pooled_base;
  c["batched"] = pooled_batched;
  std::printf(
      "batched / batch-size-1 throughput: %.3fx videos/s pooled over %zu run pair(s) "
      "(%.3f vs %.3f videos/s; per pair %s); DiT step calls alone: %.3fx job steps/s\n",
      vps_ratio, base.size(), pooled_batched["videos_per_second"].get<double>(),
      pooled_base["videos_per_second"].get<double>(),
      absl::StrJoin(
          pair_ratios, ", ",
          [](std::string* out, double r) { absl::StrAppend(out, absl::StrFormat("%.2fx", r)); })
          .c_str(),
      ratio["job_steps_per_step_second"].get<double>());
  return WriteJson(c, out_path);
}

int Run(int argc, char** argv) {
  Options options;
  std::string mix_spec = "width=64,height=64,frames=5,steps=4";
  std::string mix_file, format = "mp4", out, out_dir = "bench/results", config_name = "default";
  std::string server_config, commit, compare_baseline, compare_batched;
  int requests = 0, clients = options.clients, cancel_after_steps = options.cancel_after_steps;
  float duration = 0, cancel_fraction = 0, cancel_delay = 0, deadline = 0, wait_ready = 120;
  uint64_t seed = options.seed;
  bool help = false;
  server::internal::FlagParser flags;
  flags.AddString("target", &options.target, "sparge-server gRPC address, HOST:PORT (required)");
  flags.AddString("metrics-url", &options.metrics_url,
                  "the server's /metrics URL (http://HOST:PORT/metrics) for the batch-size "
                  "histogram, step times and cancel latency; empty: skip them");
  flags.AddInt("clients", &clients, "concurrent clients, each with its own channel");
  flags.AddInt("requests", &requests, "total Generate calls (0: until --duration-seconds)");
  flags.AddFloat("duration-seconds", &duration,
                 "stop starting calls after this long (0: until --requests)");
  flags.AddString("mix", &mix_spec, "inline request mix (see above); ignored with --mix-file");
  flags.AddString("mix-file", &mix_file, "YAML request mix: a list of entries (see above)");
  flags.AddString("prompt", &options.prompt, "prompt of every request");
  flags.AddUint64("seed", &seed, "base seed: request i gets seed+i; also drives the mix choice");
  flags.AddString("format", &format, "output format: mp4 or png");
  flags.AddFloat("cancel-fraction", &cancel_fraction,
                 "fraction of requests cancelled mid-denoise, in [0, 1]");
  flags.AddInt("cancel-after-steps", &cancel_after_steps,
               "cancel once this denoising step's progress arrives (>= 1)");
  flags.AddFloat("cancel-delay-seconds", &cancel_delay, "then wait this long before cancelling");
  flags.AddFloat("deadline-seconds", &deadline, "per-call gRPC deadline (0: none)");
  flags.AddFloat("wait-ready-seconds", &wait_ready,
                 "wait up to this long for health SERVING before starting");
  flags.AddString("out", &out, "JSON report path; empty: --out-dir/load-...json; -: none");
  flags.AddString("out-dir", &out_dir, "folder of the default report path");
  flags.AddString("config-name", &config_name, "configuration name in the default report path");
  flags.AddString("server-config", &server_config,
                  "the server's YAML config file, copied into the report (optional)");
  flags.AddString("commit", &commit, "commit recorded in the report; empty: git rev-parse HEAD");
  flags.AddString("compare-baseline", &compare_baseline,
                  "compare mode: reports of the batch-size-1 runs, comma-separated");
  flags.AddString("compare-batched", &compare_batched,
                  "compare mode: reports of the batched runs, comma-separated, paired in order");
  flags.AddBool("help", &help, "print this help and exit");
  std::vector<std::string> positional;
  if (absl::Status s = flags.Parse(argc, argv, &positional); !s.ok()) {
    std::fprintf(stderr, "sparge-load: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::printf("%s%s", kUsage, flags.Usage().c_str());
    return 0;
  }
  auto fail = [](const std::string& message) {
    std::fprintf(stderr, "sparge-load: %s\n", message.c_str());
    return 2;
  };
  if (!positional.empty()) return fail("unexpected argument '" + positional[0] + "'");
  if (!compare_baseline.empty() || !compare_batched.empty()) {
    if (compare_baseline.empty() || compare_batched.empty() || out.empty() || out == "-") {
      return fail("--compare-baseline, --compare-batched and --out go together");
    }
    absl::Status s = Compare(compare_baseline, compare_batched, out);
    if (!s.ok()) return fail(std::string(s.message()));
    std::printf("wrote %s\n", out.c_str());
    return 0;
  }
  if (options.target.empty()) return fail("--target is required (HOST:PORT)");
  if (clients < 1 || clients > 1024) return fail("--clients: must be in [1, 1024]");
  if (requests < 0) return fail("--requests: must be >= 0");
  if (duration < 0) return fail("--duration-seconds: must be >= 0");
  if (requests == 0 && duration == 0) return fail("give --requests or --duration-seconds");
  if (!(cancel_fraction >= 0 && cancel_fraction <= 1)) {
    return fail("--cancel-fraction: must be in [0, 1]");
  }
  if (cancel_after_steps < 1) return fail("--cancel-after-steps: must be >= 1");
  if (cancel_delay < 0 || deadline < 0) return fail("delays and deadlines must be >= 0");
  if (format == "mp4") {
    options.format = v1::OUTPUT_FORMAT_MP4;
  } else if (format == "png") {
    options.format = v1::OUTPUT_FORMAT_PNG_FRAMES;
  } else {
    return fail("--format: must be mp4 or png, got \"" + format + "\"");
  }
  absl::StatusOr<std::vector<MixEntry>> mix =
      mix_file.empty() ? ParseMixSpec(mix_spec) : LoadMixYaml(mix_file);
  if (!mix.ok()) return fail(std::string(mix.status().message()));
  options.mix = *std::move(mix);
  options.clients = clients;
  options.requests = requests;
  options.duration_seconds = duration;
  options.seed = seed;
  options.cancel_fraction = cancel_fraction;
  options.cancel_after_steps = cancel_after_steps;
  options.cancel_delay_seconds = cancel_delay;
  options.deadline_seconds = deadline;

  // Wait for the server, then ask what it serves.
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(options.target, grpc::InsecureChannelCredentials());
  const absl::Time ready_by = absl::Now() + absl::Seconds(wait_ready);
  for (;;) {
    absl::StatusOr<server::HealthStatus> health =
        server::CheckHealth(channel, "", absl::Seconds(2));
    if (health.ok() && *health == server::HealthStatus::kServing) break;
    if (absl::Now() > ready_by) {
      return fail(absl::StrCat(
          options.target, " not SERVING after ", wait_ready,
          " s: ", health.ok() ? server::ToString(*health) : health.status().ToString()));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  v1::ServerInfo info;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Status s = v1::VideoService::NewStub(channel)->GetServerInfo(
        &context, v1::GetServerInfoRequest(), &info);
    if (!s.ok()) return fail("GetServerInfo: " + s.error_message());
  }

  std::optional<MetricsSnapshot> before, after;
  if (!options.metrics_url.empty()) {
    absl::StatusOr<MetricsSnapshot> m = ScrapeMetrics(options.metrics_url, absl::Seconds(10));
    if (!m.ok()) return fail(m.status().ToString());
    before = *std::move(m);
  }
  LoadRunner runner(options);
  const std::vector<Record> records = runner.Run();
  if (before) {
    absl::StatusOr<MetricsSnapshot> m = ScrapeMetrics(options.metrics_url, absl::Seconds(10));
    if (!m.ok()) return fail(m.status().ToString());
    after = *std::move(m);
  }

  json report;
  report["tool"] = "sparge-load";
  report["commit"] = commit.empty() ? RunCommand("git rev-parse HEAD 2>/dev/null") : commit;
  const absl::Time now = absl::Now();
  report["date"] = absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", now, absl::UTCTimeZone());
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  report["host"] = host;
  json server;
  server["target"] = options.target;
  server["version"] = info.version();
  server["device"] = info.device();
  server["card"] = CardName(info.device());
  server["model"] = {{"name", info.model().name()},
                     {"dtype", info.model().dtype()},
                     {"num_parameters", info.model().num_parameters()},
                     {"dit_dim", info.model().dit_dim()},
                     {"dit_layers", info.model().dit_layers()},
                     {"dit_heads", info.model().dit_heads()},
                     {"block_q", info.model().block_q()},
                     {"block_k", info.model().block_k()}};
  report["server"] = server;
  report["config_name"] = config_name;
  if (!server_config.empty()) {
    try {
      report["server_config"] = YamlToJson(YAML::LoadFile(server_config));
    } catch (const YAML::Exception& e) {
      return fail(absl::StrCat(server_config, ": ", e.what()));
    }
  }
  json load;
  load["clients"] = options.clients;
  load["requests"] = options.requests;
  load["duration_seconds"] = options.duration_seconds;
  json mix_json = json::array();
  for (const MixEntry& e : options.mix) mix_json.push_back(MixEntryJson(e));
  load["mix"] = mix_json;
  load["prompt"] = options.prompt;
  load["seed"] = options.seed;
  load["format"] = format;
  load["cancel_fraction"] = options.cancel_fraction;
  load["cancel_after_steps"] = options.cancel_after_steps;
  load["cancel_delay_seconds"] = options.cancel_delay_seconds;
  load["deadline_seconds"] = options.deadline_seconds;
  report["load"] = load;
  report["results"] = Summarize(options, records, runner.wall_seconds(), before, after);
  PrintSummary(report);

  if (out != "-") {
    if (out.empty()) {
      out = absl::StrCat(out_dir, "/load-", CardName(info.device()), "-", config_name, "-",
                         absl::FormatTime("%Y-%m-%dT%H%M%SZ", now, absl::UTCTimeZone()), ".json");
    }
    if (absl::Status s = WriteJson(report, out); !s.ok()) return fail(std::string(s.message()));
    std::printf("wrote %s\n", out.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace sparge::bench

int main(int argc, char** argv) { return sparge::bench::Run(argc, argv); }
