// Per-step scheduling overhead of the real Executor: a FakePipeline whose calls cost ~nothing
// runs N concurrent jobs x S steps, and every executor iteration reports its wall time minus the
// time inside engine calls (IterationTiming). What is left is the policy decision, queue and job
// bookkeeping, progress events and metrics: issue #5 asks for < 1 ms per step.
//   scheduler_overhead [--jobs=16] [--steps=200] [--out=PATH] [--commit=SHA]
// Writes JSON (mean / p50 / p99 / max in microseconds per scenario, CPU, commit, date) to
// bench/results/scheduler-overhead-<host>-<date>.json unless --out says otherwise.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "prometheus/metric_family.h"
#include "server/metrics.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "grpcpp/grpcpp.h"
#include "server/executor.h"
#include "server/testing/fake_pipeline.h"
#include "server/video_service.h"
#include "sparge/v1/video_service.grpc.pb.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using testing::FakePipelineCounters;
using testing::FakePipelineOptions;

struct Flags {
  int jobs = 16;
  int steps = 200;
  std::string out;
  std::string commit;
};

struct Job {
  int width = 64;
  int height = 64;
  int frames = 5;
  JobPriority priority = JobPriority::kNormal;
  bool cfg = true;
};

struct Scenario {
  std::string name;
  std::string description;
  SchedulerConfig scheduler;
  std::vector<Job> first;   // submitted at the start
  std::vector<Job> second;  // submitted once the executor has run `second_after_steps` steps
  int second_after_steps = 0;
};

struct Summary {
  int iterations = 0;
  double mean_us = 0, p50_us = 0, p99_us = 0, max_us = 0;
};

Summary Summarize(std::vector<double> seconds) {
  Summary s;
  if (seconds.empty()) return s;
  std::sort(seconds.begin(), seconds.end());
  double sum = 0;
  for (double v : seconds) sum += v;
  auto at = [&](double q) {
    const size_t i = std::min(seconds.size() - 1, static_cast<size_t>(q * seconds.size()));
    return seconds[i] * 1e6;
  };
  s.iterations = static_cast<int>(seconds.size());
  s.mean_us = sum / seconds.size() * 1e6;
  s.p50_us = at(0.50);
  s.p99_us = at(0.99);
  s.max_us = seconds.back() * 1e6;
  return s;
}

nlohmann::json ToJson(const Summary& s) {
  return {{"iterations", s.iterations}, {"mean_us", s.mean_us}, {"p50_us", s.p50_us},
          {"p99_us", s.p99_us},         {"max_us", s.max_us}};
}

ResolvedRequest MakeRequest(const Job& job, int steps, int index) {
  v1::GenerateRequest r;
  r.set_prompt(absl::StrCat("overhead job ", index));
  r.set_width(job.width);
  r.set_height(job.height);
  r.set_num_frames(job.frames);
  r.set_num_steps(steps);
  r.set_guidance_scale(job.cfg ? 5.0f : 1.0f);
  r.set_seed(index);
  RequestLimits limits;
  limits.max_steps = std::max(limits.max_steps, steps);
  absl::StatusOr<ResolvedRequest> resolved =
      ResolveRequest(r, limits, RequestDefaults(), [] { return uint64_t{1}; });
  if (!resolved.ok()) {
    std::cerr << "bad request: " << resolved.status() << "\n";
    std::exit(2);
  }
  resolved->priority = job.priority;
  return *resolved;
}

// Reads a job's events the way the gRPC Generate reactor does: a channel listener that pops on
// the executor thread as each event is pushed (that work is part of the measured overhead).
class Reader {
 public:
  explicit Reader(int jobs) : remaining_(jobs) {}

  void Follow(const std::shared_ptr<JobHandle>& handle) {
    auto closed = std::make_shared<std::atomic<bool>>(false);
    JobHandle* h = handle.get();
    auto pop = [this, h, closed] {
      while (true) {
        JobEventChannel::Item item = h->events().TryPop();
        if (item.event.has_value()) continue;
        if (item.final_status.has_value() && !closed->exchange(true)) Done(*item.final_status);
        return;
      }
    };
    h->events().SetListener(pop);
    pop();  // events pushed before the listener was set
  }

  // Blocks until every job has ended; the first error, if any.
  absl::Status Wait() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int* remaining) { return *remaining == 0; }, &remaining_));
    return first_error_;
  }

 private:
  void Done(const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    if (!status.ok() && first_error_.ok()) first_error_ = status;
    --remaining_;
  }

  absl::Mutex mu_;
  int remaining_ ABSL_GUARDED_BY(mu_);
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
};

nlohmann::json RunScenario(const Scenario& scenario, const Flags& flags) {
  auto counters = std::make_shared<FakePipelineCounters>();
  ServerMetrics metrics;
  absl::Mutex mu;
  std::vector<double> all, steps, steps_cpu;
  int preemptions = 0;
  // The executor pauses inside its step number `second_after_steps` (engine time, not counted)
  // until the second wave is queued, so that every run preempts the same way.
  auto second_due = std::make_shared<absl::Notification>();
  auto second_queued = std::make_shared<absl::Notification>();
  FakePipelineOptions fake;
  fake.attention_seconds = 0;
  const int second_after = scenario.second_after_steps;
  fake.on_step = [counters, second_due, second_queued, second_after](
                     const std::vector<std::string>&, int) {
    if (second_after > 0 && counters->step_calls.load() == second_after) {
      second_due->Notify();
      second_queued->WaitForNotification();
    }
  };

  ExecutorOptions options;
  options.create_pipeline = testing::FakePipelineFactory(fake, counters);
  options.encode_video = testing::FakeVideoEncoder();
  options.metrics = &metrics;
  options.scheduler = scenario.scheduler;
  options.warmup = false;
  options.output_chunk_bytes = 64 * 1024;
  options.on_iteration = [&](const IterationTiming& t) {
    absl::MutexLock lock(&mu);
    all.push_back(t.overhead_seconds());
    if (t.action == SchedulerAction::Kind::kStep) {
      steps.push_back(t.overhead_seconds());
      steps_cpu.push_back(t.overhead_cpu_seconds());
    }
    if (t.action == SchedulerAction::Kind::kPreempt) ++preemptions;
  };
  absl::StatusOr<std::unique_ptr<Executor>> executor = Executor::Create(std::move(options));
  if (!executor.ok() || !(*executor)->WaitUntilReady(absl::Seconds(30)).ok()) {
    std::cerr << "executor did not start\n";
    std::exit(1);
  }

  std::vector<std::shared_ptr<JobHandle>> handles;
  Reader reader(static_cast<int>(scenario.first.size() + scenario.second.size()));
  int index = 0;
  auto submit = [&](const std::vector<Job>& jobs) {
    for (const Job& job : jobs) {
      absl::StatusOr<std::shared_ptr<JobHandle>> h =
          (*executor)->Submit(MakeRequest(job, flags.steps, index++));
      if (!h.ok()) {
        std::cerr << "submit failed: " << h.status() << "\n";
        std::exit(1);
      }
      reader.Follow(*h);
      handles.push_back(*h);
    }
  };
  const absl::Time t0 = absl::Now();
  submit(scenario.first);
  if (!scenario.second.empty()) {
    // Short runs may never reach the step count: submit anyway after a while.
    second_due->WaitForNotificationWithTimeout(absl::Seconds(10));
    submit(scenario.second);
    second_queued->Notify();
  }
  const absl::Status drained = reader.Wait();
  const double wall = absl::ToDoubleSeconds(absl::Now() - t0);
  (*executor)->Stop();
  if (!drained.ok()) {
    std::cerr << scenario.name << ": a job failed: " << drained << "\n";
    std::exit(1);
  }

  // Time the policy decision alone on the snapshot size of this scenario's busiest moment.
  SchedulerSnapshot snapshot;
  snapshot.now = absl::Now();
  for (size_t i = 0; i < handles.size(); ++i) {
    const JobHandle& h = *handles[i];
    if (static_cast<int>(i) < scenario.scheduler.max_running_jobs) {
      RunningJobView r;
      r.sequence = h.sequence();
      r.batch_key = absl::StrCat(h.request().engine.width, "x", h.request().engine.height);
      r.total_steps = flags.steps;
      r.steps_done = 1;
      r.priority = h.request().priority;
      r.arrival = snapshot.now;
      r.start_order = i + 1;
      snapshot.running.push_back(r);
    } else {
      QueuedJobView q;
      q.sequence = h.sequence();
      q.priority = h.request().priority;
      q.arrival = snapshot.now;
      snapshot.queued.push_back(q);
    }
  }
  constexpr int kPolicyRuns = 20000;
  std::vector<double> policy;
  policy.reserve(kPolicyRuns);
  int sink = 0;
  for (int i = 0; i < kPolicyRuns; ++i) {
    const absl::Time a = absl::Now();
    sink += static_cast<int>(ChooseNextAction(snapshot, scenario.scheduler).jobs.size());
    policy.push_back(absl::ToDoubleSeconds(absl::Now() - a));
  }
  if (sink < 0) std::cerr << sink;

  absl::MutexLock lock(&mu);
  nlohmann::json j;
  j["scenario"] = scenario.name;
  j["description"] = scenario.description;
  j["jobs"] = static_cast<int>(handles.size());
  j["steps_per_job"] = flags.steps;
  j["max_running_jobs"] = scenario.scheduler.max_running_jobs;
  j["max_batch_tokens"] = scenario.scheduler.max_batch_tokens;
  j["step_calls"] = counters->step_calls.load();
  j["job_steps"] = counters->job_steps.load();
  j["max_batch"] = counters->max_batch.load();
  j["preemptions"] = preemptions;
  j["wall_seconds"] = wall;
  j["overhead_per_iteration"] = ToJson(Summarize(all));
  j["overhead_per_step_iteration"] = ToJson(Summarize(steps));
  j["overhead_cpu_per_step_iteration"] = ToJson(Summarize(steps_cpu));
  j["policy_decision_only"] = ToJson(Summarize(policy));
  return j;
}

// The whole server in process: SpargeServer (gRPC Generate reactors, job store, metrics) over the
// same zero-cost FakePipeline, `streams` concurrent Generate calls on loopback. The overhead comes
// from the server's own sparge_scheduler_overhead_seconds histogram (every iteration kind; p50 and
// p99 as bucket upper bounds), so it includes the reactors' writes and the job store's
// bookkeeping, which run on the executor thread as channel listener and observer.
nlohmann::json RunGrpcScenario(int streams, const Flags& flags) {
  const std::string dir = absl::StrCat("/tmp/scheduler_overhead_jobs_", getpid(), "_", streams);
  ServerConfig config;
  config.listen_address = "127.0.0.1";
  config.port = 0;
  config.metrics_port = 0;
  config.warmup = false;
  config.scheduler.max_running_jobs = streams;
  config.scheduler.max_queue_length = streams;
  config.limits.max_steps = std::max(config.limits.max_steps, flags.steps);
  config.jobs.output_dir = dir;
  auto counters = std::make_shared<FakePipelineCounters>();
  FakePipelineOptions fake;
  fake.attention_seconds = 0;
  ServerDeps deps;
  deps.create_pipeline = testing::FakePipelineFactory(fake, counters);
  deps.encode_video = testing::FakeVideoEncoder();
  absl::StatusOr<std::unique_ptr<SpargeServer>> server =
      SpargeServer::Create(std::move(config), std::move(deps));
  absl::StatusOr<int> port = server.ok() ? (*server)->Start() : server.status();
  if (!port.ok() || !(*server)->WaitUntilReady(absl::Seconds(30)).ok()) {
    std::cerr << "server did not start: " << port.status() << "\n";
    std::exit(1);
  }
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", *port),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::VideoService::NewStub(channel);
  const absl::Time t0 = absl::Now();
  std::vector<std::thread> clients;
  std::atomic<int> failures{0};
  for (int i = 0; i < streams; ++i) {
    clients.emplace_back([&, i] {
      v1::GenerateRequest r;
      r.set_prompt(absl::StrCat("grpc overhead job ", i));
      r.set_width(64);
      r.set_height(64);
      r.set_num_frames(5);
      r.set_num_steps(flags.steps);
      grpc::ClientContext context;
      auto reader = stub->Generate(&context, r);
      v1::GenerateEvent event;
      while (reader->Read(&event)) {
      }
      if (!reader->Finish().ok()) ++failures;
    });
  }
  for (std::thread& t : clients) t.join();
  const double wall = absl::ToDoubleSeconds(absl::Now() - t0);
  if (failures.load() > 0) {
    std::cerr << "grpc scenario: " << failures.load() << " calls failed\n";
    std::exit(1);
  }
  Summary summary;
  for (const prometheus::MetricFamily& family : (*server)->metrics().registry().Collect()) {
    if (family.name != kSchedulerOverheadSeconds || family.metric.empty()) continue;
    const prometheus::ClientMetric::Histogram& h = family.metric[0].histogram;
    summary.iterations = static_cast<int>(h.sample_count);
    summary.mean_us = h.sample_count > 0 ? h.sample_sum / h.sample_count * 1e6 : 0;
    auto quantile = [&](double q) {
      for (const auto& bucket : h.bucket) {
        if (bucket.cumulative_count >= q * h.sample_count) return bucket.upper_bound * 1e6;
      }
      return 0.0;
    };
    summary.p50_us = quantile(0.50);
    summary.p99_us = quantile(0.99);
  }
  (*server)->Shutdown();
  std::system(absl::StrCat("rm -rf '", dir, "'").c_str());

  nlohmann::json j;
  j["scenario"] = absl::StrCat("grpc_", streams);
  j["description"] = absl::StrCat(
      "the whole server in process over loopback gRPC: ", streams,
      " concurrent Generate streams of one shape; overhead from sparge_scheduler_overhead_seconds "
      "(all iteration kinds; p50/p99 are histogram bucket upper bounds; max not recorded)");
  j["jobs"] = streams;
  j["steps_per_job"] = flags.steps;
  j["max_running_jobs"] = streams;
  j["step_calls"] = counters->step_calls.load();
  j["job_steps"] = counters->job_steps.load();
  j["max_batch"] = counters->max_batch.load();
  j["wall_seconds"] = wall;
  j["overhead_per_iteration"] = {{"iterations", summary.iterations},
                                 {"mean_us", summary.mean_us},
                                 {"p50_us_bucket_bound", summary.p50_us},
                                 {"p99_us_bucket_bound", summary.p99_us}};
  return j;
}

std::string Trimmed(const std::string& s) { return std::string(absl::StripAsciiWhitespace(s)); }

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "model name")) return Trimmed(line.substr(line.find(':') + 1));
  }
  return "unknown";
}

std::string Command(const char* command) {
  std::string out;
  if (FILE* p = popen(command, "r")) {
    char buffer[256];
    while (fgets(buffer, sizeof(buffer), p) != nullptr) out += buffer;
    pclose(p);
  }
  return Trimmed(out);
}

int Main(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--jobs=")) {
      if (!absl::SimpleAtoi(arg, &flags.jobs) || flags.jobs < 1) return 2;
    } else if (absl::ConsumePrefix(&arg, "--steps=")) {
      if (!absl::SimpleAtoi(arg, &flags.steps) || flags.steps < 1 || flags.steps > 1000) return 2;
    } else if (absl::ConsumePrefix(&arg, "--out=")) {
      flags.out = std::string(arg);
    } else if (absl::ConsumePrefix(&arg, "--commit=")) {
      flags.commit = std::string(arg);
    } else {
      std::cerr << "usage: scheduler_overhead [--jobs=16] [--steps=200] [--out=PATH] "
                   "[--commit=SHA]\n";
      return 2;
    }
  }

  std::vector<Scenario> scenarios;
  {
    Scenario s;
    s.name = "batched";
    s.description = "all jobs one shape, all running at once: every step one batch of all jobs";
    s.scheduler.max_running_jobs = flags.jobs;
    s.scheduler.max_queue_length = flags.jobs;
    s.first.assign(flags.jobs, Job{});
    scenarios.push_back(s);
  }
  {
    Scenario s;
    s.name = "mixed";
    s.description =
        "4 shapes, 3 priorities, half the slots, a token cap of 3 jobs per batch; half the "
        "jobs (high priority) arrive after 20 steps and preempt";
    s.scheduler.max_running_jobs = std::max(1, flags.jobs / 2);
    s.scheduler.max_queue_length = flags.jobs;
    s.scheduler.max_batch_tokens = 3 * 2 * 2 * 8 * 8;  // three 128x128x5 CFG jobs
    const Job shapes[] = {{64, 64, 5}, {128, 128, 5}, {64, 128, 5}, {128, 64, 9}};
    for (int i = 0; i < flags.jobs; ++i) {
      Job job = shapes[i % 4];
      job.priority = i % 3 == 0 ? JobPriority::kLow : JobPriority::kNormal;
      if (i < flags.jobs / 2) {
        s.first.push_back(job);
      } else {
        job.priority = JobPriority::kHigh;
        s.second.push_back(job);
      }
    }
    s.second_after_steps = 20;
    scenarios.push_back(s);
  }
  {
    Scenario s;
    s.name = "deep_queue";
    s.description = "16x the jobs, same shape, all submitted at once: a long queue behind the "
                    "running batch (queue order and positions recomputed every iteration)";
    s.scheduler.max_running_jobs = flags.jobs;
    s.scheduler.max_queue_length = 16 * flags.jobs;
    s.first.assign(16 * flags.jobs, Job{});
    for (size_t i = 0; i < s.first.size(); ++i) {
      s.first[i].priority = static_cast<JobPriority>(i % 3);
    }
    scenarios.push_back(s);
  }

  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  const std::string date = absl::FormatTime("%Y-%m-%d", absl::Now(), absl::UTCTimeZone());
  nlohmann::json report;
  report["benchmark"] = "scheduler_overhead";
  report["what"] =
      "Executor wall time per iteration (one scheduling decision and its execution) minus the "
      "time inside Pipeline calls and the video encoder, with a FakePipeline that costs ~0";
  report["target_us"] = 1000;
  report["target_rule"] =
      "per step iteration: mean wall-time overhead and p99 executor-thread CPU-time overhead "
      "below target_us (wall-time tails include the thread being descheduled on a shared host)";
  report["host"] = host;
  report["cpu"] = CpuModel();
  report["cpus_online"] = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  report["date"] = absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::Now(), absl::UTCTimeZone());
  report["commit"] = flags.commit.empty() ? Command("git rev-parse HEAD 2>/dev/null") : flags.commit;
  report["scenarios"] = nlohmann::json::array();
  bool met = true;
  for (const Scenario& s : scenarios) {
    nlohmann::json r = RunScenario(s, flags);
    const double p99 = r["overhead_per_step_iteration"]["p99_us"].get<double>();
    const double cpu_p99 = r["overhead_cpu_per_step_iteration"]["p99_us"].get<double>();
    met = met && r["overhead_per_step_iteration"]["mean_us"].get<double>() < 1000 &&
          cpu_p99 < 1000;
    std::cout << s.name << ": " << r["jobs"] << " jobs x " << flags.steps << " steps, "
              << r["step_calls"] << " step calls, max batch " << r["max_batch"]
              << ", preemptions " << r["preemptions"] << "; overhead per step iteration: mean "
              << r["overhead_per_step_iteration"]["mean_us"] << " us, p50 "
              << r["overhead_per_step_iteration"]["p50_us"] << " us, p99 " << p99
              << " us (thread CPU p50 " << r["overhead_cpu_per_step_iteration"]["p50_us"]
              << " us, p99 " << cpu_p99 << " us); policy decision alone p50 "
              << r["policy_decision_only"]["p50_us"] << " us\n";
    report["scenarios"].push_back(std::move(r));
  }
  // The whole server: 1 stream (the fixed cost of a step) and all the jobs at once.
  for (int streams : {1, flags.jobs}) {
    nlohmann::json r = RunGrpcScenario(streams, flags);
    std::cout << r["scenario"].get<std::string>() << ": " << streams << " streams x "
              << flags.steps << " steps, " << r["step_calls"] << " step calls; overhead per "
              << "iteration mean " << r["overhead_per_iteration"]["mean_us"] << " us, p50 <= "
              << r["overhead_per_iteration"]["p50_us_bucket_bound"] << " us, p99 <= "
              << r["overhead_per_iteration"]["p99_us_bucket_bound"] << " us\n";
    met = met && r["overhead_per_iteration"]["mean_us"].get<double>() < 1000;
    report["scenarios"].push_back(std::move(r));
  }
  report["target_met"] = met;

  const std::string path =
      flags.out.empty() ? absl::StrCat("bench/results/scheduler-overhead-", host, "-", date, ".json")
                        : flags.out;
  std::ofstream out(path);
  out << report.dump(2) << "\n";
  if (!out) {
    std::cerr << "cannot write " << path << "\n";
    return 1;
  }
  std::cout << "wrote " << path << "\n";
  return met ? 0 : 1;
}

}  // namespace
}  // namespace sparge::server

int main(int argc, char** argv) { return sparge::server::Main(argc, argv); }
