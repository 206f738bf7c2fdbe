// The job event log (primary reader, watchers with replay, memory bound) and the JobStore on a
// temporary directory with a fake clock: result and metadata files, restart recovery
// ("interrupted"), retention by count and age, listing and paging, id validation.
#include "server/job_store.h"

#include <stdlib.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "server/job_files.h"
#include "server/testing/fake_pipeline.h"

namespace sparge::server {
namespace {

namespace v1 = ::sparge::v1;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::FakeClock;

std::string MakeTempDir() {
  std::string pattern = ::testing::TempDir() + "/sparge_job_store_test_XXXXXX";
  EXPECT_NE(mkdtemp(pattern.data()), nullptr);
  return pattern;
}

v1::GenerateEvent Progress(v1::Stage stage, int step, float sparsity = 0.5f) {
  v1::GenerateEvent e;
  e.mutable_progress()->set_stage(stage);
  e.mutable_progress()->set_step(step);
  e.mutable_progress()->set_total_steps(3);
  e.mutable_progress()->set_achieved_sparsity(sparsity);
  return e;
}

v1::GenerateEvent Chunk(int64_t offset, const std::string& data) {
  v1::GenerateEvent e;
  e.mutable_chunk()->set_offset(offset);
  e.mutable_chunk()->set_data(data);
  return e;
}

v1::GenerateEvent Completed(const std::string& id, int64_t size) {
  v1::GenerateEvent e;
  e.mutable_completed()->set_job_id(id);
  e.mutable_completed()->set_content_type("video/mp4");
  e.mutable_completed()->set_file_size_bytes(size);
  return e;
}

// A job as Executor::Submit hands it out: `accepted` already pushed.
std::shared_ptr<JobHandle> NewJob(const std::string& id, absl::Time accepted) {
  v1::GenerateRequest r;
  r.set_prompt("a lighthouse");
  r.set_width(64);
  r.set_height(64);
  r.set_num_frames(5);
  r.set_num_steps(3);
  r.set_seed(1);
  absl::StatusOr<ResolvedRequest> resolved =
      ResolveRequest(r, RequestLimits(), RequestDefaults(), [] { return uint64_t{1}; });
  EXPECT_TRUE(resolved.ok());
  auto handle = std::make_shared<JobHandle>(id, 1, *resolved, accepted, absl::InfiniteFuture());
  v1::GenerateEvent e;
  e.mutable_accepted()->set_job_id(id);
  *e.mutable_accepted()->mutable_resolved_request() = resolved->resolved;
  handle->events().Push(std::move(e));
  return handle;
}

// Runs a job to success with `data` as its file, the way the executor does.
void Succeed(JobHandle& handle, const std::string& data) {
  handle.set_state(JobState::kRunning);
  handle.events().Push(Progress(v1::STAGE_TEXT_ENCODE, 0));
  for (int step = 1; step <= 3; ++step) handle.events().Push(Progress(v1::STAGE_DENOISE, step));
  const size_t half = data.size() / 2;
  handle.events().Push(Chunk(0, data.substr(0, half)));
  handle.events().Push(Chunk(static_cast<int64_t>(half), data.substr(half)));
  handle.events().Push(Completed(handle.id(), static_cast<int64_t>(data.size())));
  handle.set_state(JobState::kSucceeded);
  handle.events().Close(absl::OkStatus());
}

std::vector<std::string> Kinds(JobEventChannel& channel, int watcher) {
  std::vector<std::string> kinds;
  while (true) {
    JobEventChannel::Item item =
        watcher < 0 ? channel.TryPop() : channel.TryPopWatcher(watcher);
    if (!item.event.has_value()) {
      if (item.final_status.has_value()) kinds.push_back(item.final_status->ok() ? "OK" : "ERR");
      return kinds;
    }
    const v1::GenerateEvent& e = *item.event;
    kinds.push_back(e.has_accepted()   ? "accepted"
                    : e.has_progress() ? absl::StrCat("progress", e.progress().step())
                    : e.has_chunk()    ? "chunk"
                                       : "completed");
  }
}

TEST(JobEventChannelTest, PrimarySeesEverythingWatchersGetReplayThenLiveWithoutChunks) {
  JobEventChannel channel;
  v1::GenerateEvent accepted;
  accepted.mutable_accepted()->set_job_id("j");
  channel.Push(accepted);
  channel.Push(Progress(v1::STAGE_DENOISE, 1));
  channel.Push(Progress(v1::STAGE_DENOISE, 2));
  const int late = channel.AddWatcher(nullptr);
  const int early_reader = channel.AddWatcher(nullptr);
  EXPECT_THAT(Kinds(channel, early_reader), ElementsAre("accepted", "progress2"));
  channel.Push(Progress(v1::STAGE_DENOISE, 3));
  channel.Push(Chunk(0, "abc"));
  channel.Push(Completed("j", 3));
  channel.Close(absl::OkStatus());
  EXPECT_THAT(Kinds(channel, -1), ElementsAre("accepted", "progress1", "progress2", "progress3",
                                              "chunk", "completed", "OK"));
  // The late watcher: replay (latest progress only), then what came after it joined.
  EXPECT_THAT(Kinds(channel, late),
              ElementsAre("accepted", "progress2", "progress3", "completed", "OK"));
  EXPECT_THAT(Kinds(channel, early_reader), ElementsAre("progress3", "completed", "OK"));
  // A watcher joining a finished job: accepted, last progress, completed, status.
  const int after = channel.AddWatcher(nullptr);
  EXPECT_THAT(Kinds(channel, after), ElementsAre("accepted", "progress3", "completed", "OK"));
}

TEST(JobEventChannelTest, KeepsNothingNobodyWillRead) {
  JobEventChannel channel;
  channel.DetachPrimary();
  v1::GenerateEvent accepted;
  accepted.mutable_accepted()->set_job_id("j");
  channel.Push(accepted);
  for (int i = 0; i < 100; ++i) channel.Push(Chunk(i * 4, "data"));
  EXPECT_EQ(channel.retained_events(), 0);
  const int watcher = channel.AddWatcher(nullptr);
  for (int i = 0; i < 10; ++i) channel.Push(Chunk(400 + i * 4, "data"));
  channel.Push(Progress(v1::STAGE_DENOISE, 1));
  EXPECT_LE(channel.retained_events(), 11);  // chunk placeholders and one progress
  EXPECT_THAT(Kinds(channel, watcher), ElementsAre("accepted", "progress1"));
  EXPECT_EQ(channel.retained_events(), 0);  // read by everyone: dropped
  channel.RemoveWatcher(watcher);
  channel.Push(Progress(v1::STAGE_DENOISE, 2));
  EXPECT_EQ(channel.retained_events(), 0);
}

TEST(JobEventChannelTest, ListenersRunForEveryReaderAndRemovalWaits) {
  JobEventChannel channel;
  int primary_calls = 0, watcher_calls = 0;
  channel.SetListener([&] { ++primary_calls; });
  const int w = channel.AddWatcher([&] { ++watcher_calls; });
  channel.Push(Progress(v1::STAGE_DENOISE, 1));
  channel.Close(absl::CancelledError("stop"));
  EXPECT_EQ(primary_calls, 2);
  EXPECT_EQ(watcher_calls, 2);
  channel.RemoveWatcher(w);
  channel.Push(Progress(v1::STAGE_DENOISE, 2));  // ignored after Close
  EXPECT_EQ(primary_calls, 2);
}

class JobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir(); }
  void TearDown() override {
    store_.reset();
    std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  std::unique_ptr<JobStore> OpenStore(const std::string& dir, int max_results = 100,
                                      double ttl = 86400) {
    JobStoreOptions options;
    options.output_dir = dir;
    options.max_results = max_results;
    options.result_ttl_seconds = ttl;
    options.clock = &clock_;
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(options);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }

  std::shared_ptr<JobHandle> Track(JobStore& store, const std::string& id,
                                   const std::string& key = "") {
    auto handle = NewJob(id, clock_.Now());
    store.Track(handle, v1::JOB_ORIGIN_SUBMIT_JOB, key);
    handle->events().DetachPrimary();
    return handle;
  }

  bool Exists(const std::string& name) { return FileSize(dir_ + "/" + name).ok(); }

  v1::Job ReadMetadata(const std::string& dir, const std::string& id) {
    absl::StatusOr<std::string> text = ReadSmallFile(dir + "/" + id + ".json", 1 << 20);
    EXPECT_TRUE(text.ok()) << text.status();
    v1::Job job;
    EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(text.ok() ? *text : "", &job).ok());
    return job;
  }

  FakeClock clock_;
  std::string dir_;
  std::unique_ptr<JobStore> store_;
};

TEST_F(JobStoreTest, StoresTheResultAndMetadataAtomically) {
  store_ = OpenStore(dir_ + "/nested/jobs");  // parents are created
  dir_ += "/nested/jobs";
  auto handle = Track(*store_, "job-1-aa");
  EXPECT_EQ(ReadMetadata(dir_, "job-1-aa").state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(store_->Find("job-1-aa")->job.state(), v1::JOB_STATE_QUEUED);

  handle->set_state(JobState::kRunning);
  handle->events().Push(Progress(v1::STAGE_TEXT_ENCODE, 0));
  // Persisted once when it starts running, so that a restart knows.
  EXPECT_EQ(ReadMetadata(dir_, "job-1-aa").state(), v1::JOB_STATE_RUNNING);
  handle->events().Push(Progress(v1::STAGE_DENOISE, 1, 0.25f));
  handle->events().Push(Progress(v1::STAGE_DENOISE, 2, 0.75f));
  handle->events().Push(Chunk(0, "FAKE "));
  EXPECT_TRUE(Exists("job-1-aa.mp4.tmp"));
  EXPECT_FALSE(Exists("job-1-aa.mp4"));  // not visible while incomplete
  handle->events().Push(Chunk(5, "video"));
  handle->events().Push(Completed("job-1-aa", 10));
  handle->set_state(JobState::kSucceeded);
  handle->events().Close(absl::OkStatus());

  EXPECT_FALSE(Exists("job-1-aa.mp4.tmp"));
  EXPECT_EQ(*ReadSmallFile(dir_ + "/job-1-aa.mp4", 100), "FAKE video");
  const v1::Job job = store_->Find("job-1-aa")->job;
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job.result().size_bytes(), 10);
  EXPECT_EQ(job.result().content_type(), "video/mp4");
  EXPECT_EQ(job.result().completed().file_size_bytes(), 10);
  EXPECT_FLOAT_EQ(job.mean_achieved_sparsity(), 0.5f);
  EXPECT_EQ(job.progress().step(), 2);
  EXPECT_TRUE(job.has_start_time());
  EXPECT_TRUE(job.has_end_time());
  EXPECT_EQ(store_->Find("job-1-aa")->handle, nullptr);  // live state released
  EXPECT_EQ(ReadMetadata(dir_, "job-1-aa").state(), v1::JOB_STATE_SUCCEEDED);

  absl::StatusOr<std::unique_ptr<JobResultReader>> reader = store_->OpenResult("job-1-aa");
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->size(), 10);
  EXPECT_EQ(*(*reader)->ReadAt(5, 100), "video");
  EXPECT_EQ(*(*reader)->ReadAt(0, 4), "FAKE");
}

// A job preempted at a step boundary (a STAGE_QUEUED event while running) is QUEUED again, keeps
// its first start time, and is RUNNING again when it resumes.
TEST_F(JobStoreTest, PreemptedJobIsQueuedUntilItResumes) {
  store_ = OpenStore(dir_);
  auto handle = Track(*store_, "job-2-bb");
  handle->set_state(JobState::kRunning);  // as the executor does
  handle->events().Push(Progress(v1::STAGE_DENOISE, 1));
  ASSERT_EQ(store_->Find("job-2-bb")->job.state(), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(ReadMetadata(dir_, "job-2-bb").state(), v1::JOB_STATE_RUNNING);
  const auto started = store_->Find("job-2-bb")->job.start_time();
  clock_.Advance(absl::Seconds(5));
  handle->set_state(JobState::kQueued);
  handle->events().Push(Progress(v1::STAGE_QUEUED, 1));
  EXPECT_EQ(store_->Find("job-2-bb")->job.state(), v1::JOB_STATE_QUEUED);
  handle->set_state(JobState::kRunning);
  handle->events().Push(Progress(v1::STAGE_DENOISE, 2));
  EXPECT_EQ(store_->Find("job-2-bb")->job.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(store_->Find("job-2-bb")->job.start_time().seconds(), started.seconds());
  handle->events().Close(absl::CancelledError("test over"));
}

TEST_F(JobStoreTest, FinalStatesAndErrors) {
  store_ = OpenStore(dir_);
  auto failed = Track(*store_, "failed");
  failed->set_state(JobState::kFailed);
  failed->events().Close(absl::InternalError("fake step failed"));
  auto cancelled = Track(*store_, "cancelled");
  cancelled->Cancel(CancelReason::kClient);
  cancelled->set_state(JobState::kCancelled);
  cancelled->events().Close(absl::CancelledError("cancelled by the client after step 1/3"));
  auto late = Track(*store_, "late");
  late->set_state(JobState::kDeadlineExceeded);
  late->events().Close(absl::DeadlineExceededError("deadline exceeded while queued"));
  auto shutdown = Track(*store_, "shutdown");
  shutdown->Cancel(CancelReason::kShutdown);
  shutdown->set_state(JobState::kCancelled);
  shutdown->events().Close(absl::UnavailableError("server shutting down after step 1/3"));
  // A job that "succeeded" without any file cannot be served.
  auto empty = Track(*store_, "empty");
  empty->set_state(JobState::kSucceeded);
  empty->events().Close(absl::OkStatus());

  auto job = [&](const std::string& id) { return store_->Find(id)->job; };
  EXPECT_EQ(job("failed").state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job("failed").error().code_name(), "INTERNAL");
  EXPECT_EQ(job("failed").error().message(), "fake step failed");
  EXPECT_EQ(job("cancelled").state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(job("cancelled").error().code(), 1);
  EXPECT_EQ(job("late").state(), v1::JOB_STATE_DEADLINE_EXCEEDED);
  EXPECT_EQ(job("shutdown").state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(job("shutdown").error().message(), HasSubstr("interrupted"));
  EXPECT_EQ(job("empty").state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(job("empty").error().message(), HasSubstr("could not be stored"));

  absl::StatusOr<std::unique_ptr<JobResultReader>> r = store_->OpenResult("failed");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("is JOB_STATE_FAILED"));
  EXPECT_EQ(store_->OpenResult("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Find("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(JobStoreTest, RestartServesFinishedResultsAndReportsUnfinishedAsInterrupted) {
  store_ = OpenStore(dir_);
  auto done = Track(*store_, "done", "key-1");
  Succeed(*done, "0123456789");
  auto running = Track(*store_, "running");
  running->set_state(JobState::kRunning);
  running->events().Push(Progress(v1::STAGE_DENOISE, 1));
  running->events().Push(Chunk(0, "partial"));
  auto queued = Track(*store_, "queued");

  // A crash: the files as they are now, opened by a new server (the old one still holds dir_).
  const std::string copy = MakeTempDir();
  ASSERT_EQ(std::system(("cp -a '" + dir_ + "/.' '" + copy + "/'").c_str()), 0);
  clock_.Advance(absl::Seconds(10));
  std::unique_ptr<JobStore> restarted = OpenStore(copy);
  ASSERT_NE(restarted, nullptr);
  EXPECT_TRUE(restarted->exclusive());
  EXPECT_EQ(restarted->size(), 3);
  for (const char* id : {"running", "queued"}) {
    const v1::Job job = restarted->Find(id)->job;
    EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED) << id;
    EXPECT_EQ(job.error().message(), kInterruptedMessage) << id;
    EXPECT_EQ(job.error().code_name(), "UNAVAILABLE");
    EXPECT_TRUE(job.has_end_time());
    EXPECT_EQ(ReadMetadata(copy, id).state(), v1::JOB_STATE_FAILED) << "rewritten";
  }
  EXPECT_FALSE(FileSize(copy + "/running.mp4.tmp").ok());  // partial output removed
  const v1::Job job = restarted->Find("done")->job;
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
  absl::StatusOr<std::unique_ptr<JobResultReader>> reader = restarted->OpenResult("done");
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(*(*reader)->ReadAt(0, 100), "0123456789");
  EXPECT_EQ(restarted->FindByIdempotencyKey("key-1"), "done");
  restarted.reset();
  std::system(("rm -rf '" + copy + "'").c_str());

  // While the first store holds the directory, a second one must not touch its live jobs.
  std::unique_ptr<JobStore> shared = OpenStore(dir_);
  EXPECT_FALSE(shared->exclusive());
  EXPECT_EQ(shared->size(), 1);  // only the finished job
  EXPECT_EQ(ReadMetadata(dir_, "running").state(), v1::JOB_STATE_RUNNING);
  shared.reset();

  Succeed(*running, "");  // let the tracked jobs end before the store goes
  queued->events().Close(absl::CancelledError("x"));
}

TEST_F(JobStoreTest, RetentionKeepsTheNewestMaxResults) {
  store_ = OpenStore(dir_, /*max_results=*/3);
  for (int i = 0; i < 5; ++i) {
    auto handle = Track(*store_, absl::StrCat("job", i), absl::StrCat("k", i));
    Succeed(*handle, absl::StrCat("video", i));
    clock_.Advance(absl::Seconds(1));
  }
  EXPECT_EQ(store_->size(), 3);
  for (int i = 0; i < 5; ++i) {
    const std::string id = absl::StrCat("job", i);
    EXPECT_EQ(store_->Find(id).ok(), i >= 2) << id;
    EXPECT_EQ(Exists(id + ".json"), i >= 2) << id;
    EXPECT_EQ(Exists(id + ".mp4"), i >= 2) << id;
    EXPECT_EQ(store_->FindByIdempotencyKey(absl::StrCat("k", i)).has_value(), i >= 2);
  }
  // A live job does not count and is never removed.
  auto live = Track(*store_, "live");
  auto extra = Track(*store_, "extra");
  Succeed(*extra, "x");
  EXPECT_TRUE(store_->Find("live").ok());
  EXPECT_FALSE(store_->Find("job2").ok());
  EXPECT_EQ(store_->size(), 4);
  live->events().Close(absl::CancelledError("x"));
}

TEST_F(JobStoreTest, RetentionRemovesResultsOlderThanTheTtlOnFinishAndAtStartup) {
  store_ = OpenStore(dir_, 100, /*ttl=*/60);
  Succeed(*Track(*store_, "old"), "a");
  clock_.Advance(absl::Seconds(40));
  Succeed(*Track(*store_, "middle"), "b");
  clock_.Advance(absl::Seconds(30));  // old: 70 s, middle: 30 s
  Succeed(*Track(*store_, "new"), "c");
  EXPECT_FALSE(store_->Find("old").ok());
  EXPECT_FALSE(Exists("old.mp4"));
  EXPECT_TRUE(store_->Find("middle").ok());
  store_.reset();
  clock_.Advance(absl::Seconds(45));  // middle: 75 s, new: 45 s
  store_ = OpenStore(dir_, 100, 60);
  EXPECT_FALSE(store_->Find("middle").ok());
  EXPECT_FALSE(Exists("middle.json"));
  EXPECT_TRUE(store_->Find("new").ok());
}

TEST_F(JobStoreTest, ListsNewestFirstWithPagingAndStateFilter) {
  store_ = OpenStore(dir_);
  std::vector<std::shared_ptr<JobHandle>> live;
  for (int i = 0; i < 7; ++i) {
    auto handle = Track(*store_, absl::StrCat("j", i));
    if (i % 2 == 0) {
      Succeed(*handle, "v");
    } else {
      live.push_back(handle);
    }
    clock_.Advance(absl::Seconds(1));
  }
  v1::ListJobsRequest request;
  request.set_page_size(3);
  std::vector<std::string> ids;
  int pages = 0;
  do {
    absl::StatusOr<v1::ListJobsResponse> page = store_->List(request);
    ASSERT_TRUE(page.ok()) << page.status();
    for (const v1::Job& job : page->jobs()) ids.push_back(job.job_id());
    request.set_page_token(page->next_page_token());
    ++pages;
  } while (!request.page_token().empty() && pages < 10);
  EXPECT_THAT(ids, ElementsAre("j6", "j5", "j4", "j3", "j2", "j1", "j0"));
  EXPECT_EQ(pages, 3);

  request.Clear();
  request.add_states(v1::JOB_STATE_QUEUED);
  absl::StatusOr<v1::ListJobsResponse> queued = store_->List(request);
  ASSERT_TRUE(queued.ok());
  ASSERT_EQ(queued->jobs_size(), 3);
  EXPECT_EQ(queued->jobs(0).job_id(), "j5");
  EXPECT_TRUE(queued->next_page_token().empty());

  request.Clear();
  request.add_states(v1::JOB_STATE_SUCCEEDED);
  request.set_page_size(2);
  absl::StatusOr<v1::ListJobsResponse> first = store_->List(request);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->jobs(1).job_id(), "j4");
  request.set_page_token(first->next_page_token());
  absl::StatusOr<v1::ListJobsResponse> second = store_->List(request);
  ASSERT_TRUE(second.ok());
  ASSERT_EQ(second->jobs_size(), 2);
  EXPECT_EQ(second->jobs(0).job_id(), "j2");
  EXPECT_EQ(second->jobs(1).job_id(), "j0");
  EXPECT_TRUE(second->next_page_token().empty());

  request.Clear();
  request.set_page_token("garbage!");
  EXPECT_THAT(store_->List(request).status().message(), HasSubstr("page_token: must be"));
  request.Clear();
  request.set_page_size(5000);
  EXPECT_THAT(store_->List(request).status().message(),
              HasSubstr("page_size: must be in [0, 1000], got 5000"));
  request.Clear();
  request.add_states(static_cast<v1::JobState>(42));
  EXPECT_EQ(store_->List(request).status().code(), absl::StatusCode::kInvalidArgument);
  for (auto& h : live) h->events().Close(absl::CancelledError("x"));
}

TEST(JobIdTest, OnlySafeIdsAreValid) {
  EXPECT_TRUE(ValidateJobId("job-12-0a1b2c3d").ok());
  for (const char* bad : {"", "..", "a/b", "../etc/passwd", "job id", "x\n"}) {
    absl::Status s = ValidateJobId(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(s.message(), HasSubstr("job_id: must be 1-128 characters of [A-Za-z0-9._-]"));
  }
  EXPECT_FALSE(ValidateJobId(std::string(129, 'a')).ok());
}

TEST(JobStoreOpenTest, BadOptionsAndUnusableDirectory) {
  JobStoreOptions options;
  options.output_dir = "";
  EXPECT_EQ(JobStore::Open(options).status().code(), absl::StatusCode::kInvalidArgument);
  const std::string dir = MakeTempDir();
  ASSERT_TRUE(WriteFileAtomically(dir + "/file", "x").ok());
  options.output_dir = dir + "/file/sub";
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(options);
  EXPECT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("jobs.output_dir"));
  std::system(("rm -rf '" + dir + "'").c_str());
}

}  // namespace
}  // namespace sparge::server
