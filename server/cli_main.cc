// sparge-cli: command-line client of sparge-server.
//   generate (default): send a prompt, show a progress bar on stderr, write the video file.
//   info: print GetServerInfo.   health: exit 0 iff the server reports SERVING.
//   submit / get / watch / cancel / list / result: the job API (jobs owned by the server).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "google/protobuf/text_format.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "server/grpc_status.h"
#include "server/health_client.h"
#include "server/internal/flag_parser.h"
#include "sparge/v1/video_service.grpc.pb.h"

namespace sparge::cli {
namespace {

namespace v1 = ::sparge::v1;
using server::internal::FlagParser;

constexpr char kUsage[] =
    "sparge-cli: client of sparge-server (sparge.v1.VideoService).\n"
    "\n"
    "Usage:\n"
    "  sparge-cli [generate] --prompt TEXT [--out FILE] [options]   generate a video\n"
    "  sparge-cli info [--server HOST:PORT]      model, device, request limits and defaults\n"
    "  sparge-cli health [--server HOST:PORT]    exit 0 iff the server reports SERVING\n"
    "\n"
    "Jobs (owned by the server: they run whether or not this client stays):\n"
    "  sparge-cli submit --prompt TEXT [options] [--idempotency-key K] [--job-timeout S]\n"
    "                                            queue a job, print its id\n"
    "  sparge-cli get JOB_ID                     print the job (state, progress, result, error)\n"
    "  sparge-cli watch JOB_ID                   progress bar until the job ends; exit 0 iff it\n"
    "                                            succeeded\n"
    "  sparge-cli cancel JOB_ID                  stop the job, print its final state\n"
    "  sparge-cli list [--states a,b] [--limit N]  jobs, newest first (states: queued, running,\n"
    "                                            succeeded, failed, cancelled, deadline_exceeded)\n"
    "  sparge-cli result JOB_ID [--out FILE]     download the video of a succeeded job\n"
    "\n"
    "Request options left unset take the server's defaults (see `sparge-cli info`).\n"
    "\n"
    "Flags:\n";

struct Options {
  std::string server = "localhost:50051";
  float timeout_seconds = 0;  // 0: the command's default
  bool quiet = false;
  std::string prompt;
  std::string negative_prompt;
  std::string out;
  int width = 0, height = 0, frames = 0, fps = 0, steps = 0;
  uint64_t seed = 0;
  float guidance = 0, shift = 0;
  std::string sampler, format, mode, priority;
  float topk = 0, topp = 0;
  int dense_steps = 0;
  std::string idempotency_key;
  float job_timeout_seconds = 0;
  std::string states;
  int limit = 100;
};

std::shared_ptr<grpc::Channel> Connect(const Options& o) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(o.server, grpc::InsecureChannelCredentials(), args);
}

void SetDeadline(grpc::ClientContext* context, double seconds) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "sparge-cli: %s\n", what.c_str());
  return 1;
}

int FailRpc(const grpc::Status& status) {
  return Fail(absl::StrCat("error: ", server::StatusCodeName(
                                          static_cast<absl::StatusCode>(status.error_code())),
                           ": ", status.error_message()));
}

int Health(const Options& o) {
  absl::StatusOr<server::HealthStatus> status = server::CheckHealth(
      Connect(o), "", absl::Seconds(o.timeout_seconds > 0 ? o.timeout_seconds : 5));
  if (!status.ok()) return Fail(absl::StrCat("health: ", status.status().ToString()));
  std::printf("%s\n", server::ToString(*status));
  return *status == server::HealthStatus::kServing ? 0 : 1;
}

int Info(const Options& o) {
  auto stub = v1::VideoService::NewStub(Connect(o));
  grpc::ClientContext context;
  SetDeadline(&context, o.timeout_seconds > 0 ? o.timeout_seconds : 10);
  v1::ServerInfo info;
  grpc::Status status = stub->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
  if (!status.ok()) return FailRpc(status);
  std::string text;
  google::protobuf::TextFormat::PrintToString(info, &text);
  std::printf("%s", text.c_str());
  return 0;
}

// Builds the request from the flags that were given.
absl::StatusOr<v1::GenerateRequest> BuildRequest(const Options& o, const FlagParser& flags) {
  v1::GenerateRequest r;
  r.set_prompt(o.prompt);
  if (flags.IsSet("negative-prompt")) r.set_negative_prompt(o.negative_prompt);
  if (flags.IsSet("width")) r.set_width(o.width);
  if (flags.IsSet("height")) r.set_height(o.height);
  if (flags.IsSet("frames")) r.set_num_frames(o.frames);
  if (flags.IsSet("fps")) r.set_fps(o.fps);
  if (flags.IsSet("steps")) r.set_num_steps(o.steps);
  if (flags.IsSet("seed")) r.set_seed(o.seed);
  if (flags.IsSet("guidance")) r.set_guidance_scale(o.guidance);
  if (flags.IsSet("shift")) r.set_shift(o.shift);
  if (flags.IsSet("sampler")) {
    if (o.sampler == "euler") {
      r.set_sampler(v1::SAMPLER_EULER);
    } else if (o.sampler == "unipc") {
      r.set_sampler(v1::SAMPLER_UNIPC);
    } else {
      return absl::InvalidArgumentError("--sampler: must be euler or unipc");
    }
  }
  if (flags.IsSet("format")) {
    if (o.format == "mp4") {
      r.set_output_format(v1::OUTPUT_FORMAT_MP4);
    } else if (o.format == "png") {
      r.set_output_format(v1::OUTPUT_FORMAT_PNG_FRAMES);
    } else {
      return absl::InvalidArgumentError("--format: must be mp4 or png");
    }
  }
  if (flags.IsSet("priority")) {
    if (o.priority == "low") {
      r.set_priority(v1::PRIORITY_LOW);
    } else if (o.priority == "normal") {
      r.set_priority(v1::PRIORITY_NORMAL);
    } else if (o.priority == "high") {
      r.set_priority(v1::PRIORITY_HIGH);
    } else {
      return absl::InvalidArgumentError("--priority: must be low, normal or high");
    }
  }
  v1::SparsityConfig* s = r.mutable_sparsity();
  if (flags.IsSet("mode")) {
    if (o.mode == "dense") {
      s->set_mode(v1::ATTENTION_MODE_DENSE);
    } else if (o.mode == "topk") {
      s->set_mode(v1::ATTENTION_MODE_TOPK);
    } else if (o.mode == "topp") {
      s->set_mode(v1::ATTENTION_MODE_TOPP);
    } else if (o.mode == "hybrid") {
      s->set_mode(v1::ATTENTION_MODE_HYBRID);
    } else {
      return absl::InvalidArgumentError("--mode: must be dense, topk, topp or hybrid");
    }
  }
  if (flags.IsSet("topk")) s->set_topk(o.topk);
  if (flags.IsSet("topp")) s->set_topp(o.topp);
  if (flags.IsSet("dense-steps")) s->set_dense_steps(o.dense_steps);
  return r;
}

const char* StageName(v1::Stage stage) {
  switch (stage) {
    case v1::STAGE_QUEUED:
      return "queued";
    case v1::STAGE_TEXT_ENCODE:
      return "encoding prompt";
    case v1::STAGE_DENOISE:
      return "denoising";
    case v1::STAGE_VAE_DECODE:
      return "decoding";
    case v1::STAGE_VIDEO_ENCODE:
      return "encoding video";
    default:
      return "working";
  }
}

// Progress on stderr: one redrawn line on a terminal, one line per event otherwise.
class ProgressBar {
 public:
  explicit ProgressBar(bool quiet) : quiet_(quiet), tty_(isatty(STDERR_FILENO) == 1) {}

  void Show(const v1::JobProgress& p) {
    if (quiet_) return;
    std::string line;
    if (p.stage() == v1::STAGE_QUEUED) {
      line = absl::StrFormat("queued: %d job(s) ahead", p.queue_position());
    } else {
      constexpr int kWidth = 30;
      const int total = std::max(1, p.total_steps());
      const int filled = kWidth * std::min(p.step(), total) / total;
      line = absl::StrFormat("[%s%s] step %d/%d  sparsity %.2f  elapsed %.1fs  eta %.1fs  %s",
                             std::string(filled, '#'), std::string(kWidth - filled, '.'),
                             p.step(), p.total_steps(), p.achieved_sparsity(),
                             p.elapsed_seconds(), p.eta_seconds(), StageName(p.stage()));
    }
    if (tty_) {
      std::fprintf(stderr, "\r%-100s", line.c_str());
      open_line_ = true;
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }
  void Message(const std::string& text) {
    if (quiet_) return;
    EndLine();
    std::fprintf(stderr, "%s\n", text.c_str());
  }
  void EndLine() {
    if (open_line_) std::fprintf(stderr, "\n");
    open_line_ = false;
  }

 private:
  const bool quiet_;
  const bool tty_;
  bool open_line_ = false;
};

int Generate(const Options& o, const FlagParser& flags) {
  if (o.prompt.empty() && !flags.IsSet("prompt")) {
    return Fail("generate: --prompt is required (see --help)");
  }
  absl::StatusOr<v1::GenerateRequest> request = BuildRequest(o, flags);
  if (!request.ok()) return Fail(std::string(request.status().message()));
  std::string out = o.out;
  if (out.empty()) out = o.format == "png" ? "out.tar" : "out.mp4";
  const std::string partial = out + ".part";

  auto stub = v1::VideoService::NewStub(Connect(o));
  grpc::ClientContext context;
  SetDeadline(&context, o.timeout_seconds > 0 ? o.timeout_seconds : 3600);
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader =
      stub->Generate(&context, *request);

  ProgressBar bar(o.quiet);
  std::ofstream file;
  int64_t written = 0;
  bool completed = false;
  v1::GenerateCompleted done;
  v1::GenerateEvent event;
  while (reader->Read(&event)) {
    switch (event.event_case()) {
      case v1::GenerateEvent::kAccepted:
        bar.Message(absl::StrFormat("job %s accepted (seed %d, %d job(s) ahead)",
                                    event.accepted().job_id(),
                                    event.accepted().resolved_request().seed(),
                                    event.accepted().queue_position()));
        break;
      case v1::GenerateEvent::kProgress:
        bar.Show(event.progress());
        break;
      case v1::GenerateEvent::kChunk: {
        if (event.chunk().offset() != written) {
          context.TryCancel();
          return Fail(absl::StrCat("chunk at offset ", event.chunk().offset(), ", expected ",
                                   written));
        }
        if (!file.is_open()) {
          file.open(partial, std::ios::binary | std::ios::trunc);
          if (!file) {
            context.TryCancel();
            return Fail(absl::StrCat("cannot write ", partial));
          }
        }
        file.write(event.chunk().data().data(),
                   static_cast<std::streamsize>(event.chunk().data().size()));
        written += static_cast<int64_t>(event.chunk().data().size());
        break;
      }
      case v1::GenerateEvent::kCompleted:
        done = event.completed();
        completed = true;
        break;
      default:
        break;
    }
  }
  bar.EndLine();
  grpc::Status status = reader->Finish();
  if (file.is_open()) file.close();
  if (!status.ok()) {
    std::remove(partial.c_str());
    return FailRpc(status);
  }
  if (!completed) return Fail("the stream ended without a completed event");
  if (done.file_size_bytes() != written || !file) {
    std::remove(partial.c_str());
    return Fail(absl::StrCat("received ", written, " bytes, the server sent ",
                             done.file_size_bytes()));
  }
  if (std::rename(partial.c_str(), out.c_str()) != 0) {
    return Fail(absl::StrCat("cannot rename ", partial, " to ", out));
  }
  absl::PrintF(
      "wrote %s (%d bytes, %s): %dx%d, %d frames at %d fps, seed %d, mean sparsity %.3f\n"
      "timings: queue %.2fs, text %.2fs, denoise %.2fs, decode %.2fs, encode %.2fs, total "
      "%.2fs\n",
      out, written, done.content_type(), done.width(), done.height(), done.num_frames(),
      done.fps(), done.seed(), done.mean_achieved_sparsity(), done.queue_wait_seconds(),
      done.text_encode_seconds(), done.denoise_seconds(), done.vae_decode_seconds(),
      done.video_encode_seconds(), done.total_seconds());
  return 0;
}

std::unique_ptr<v1::VideoService::Stub> Stub(const Options& o) {
  return v1::VideoService::NewStub(Connect(o));
}

double UnarySeconds(const Options& o) { return o.timeout_seconds > 0 ? o.timeout_seconds : 30; }

std::string StateName(v1::JobState state) {
  absl::string_view name = v1::JobState_Name(state);
  absl::ConsumePrefix(&name, "JOB_STATE_");
  return std::string(name);
}

std::string JobSummary(const v1::Job& job) {
  std::string line = absl::StrCat("job ", job.job_id(), " ", StateName(job.state()));
  switch (job.state()) {
    case v1::JOB_STATE_QUEUED:
      absl::StrAppend(&line, ", ", job.progress().queue_position(), " job(s) ahead");
      break;
    case v1::JOB_STATE_RUNNING:
      absl::StrAppendFormat(&line, ", step %d/%d", job.progress().step(),
                            job.progress().total_steps());
      break;
    case v1::JOB_STATE_SUCCEEDED:
      absl::StrAppendFormat(&line, ": %d bytes of %s, mean sparsity %.3f",
                            job.result().size_bytes(), job.result().content_type(),
                            job.mean_achieved_sparsity());
      break;
    default:
      if (job.has_error()) {
        absl::StrAppend(&line, ": ", job.error().code_name(), ": ", job.error().message());
      }
      break;
  }
  return line;
}

// The one JOB_ID argument of get / watch / cancel / result.
absl::StatusOr<std::string> JobIdArgument(const std::vector<std::string>& positional) {
  if (positional.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(positional.front(), ": a JOB_ID is required (see --help)"));
  }
  if (positional.size() > 2) {
    return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", positional[2], "'"));
  }
  return positional[1];
}

int Submit(const Options& o, const FlagParser& flags) {
  if (!flags.IsSet("prompt")) return Fail("submit: --prompt is required (see --help)");
  absl::StatusOr<v1::GenerateRequest> request = BuildRequest(o, flags);
  if (!request.ok()) return Fail(std::string(request.status().message()));
  v1::SubmitJobRequest submit;
  *submit.mutable_request() = *request;
  submit.set_idempotency_key(o.idempotency_key);
  if (flags.IsSet("job-timeout")) submit.set_timeout_seconds(o.job_timeout_seconds);
  grpc::ClientContext context;
  SetDeadline(&context, UnarySeconds(o));
  v1::Job job;
  grpc::Status status = Stub(o)->SubmitJob(&context, submit, &job);
  if (!status.ok()) return FailRpc(status);
  absl::PrintF("%s (seed %d)\n", JobSummary(job), job.request().seed());
  return 0;
}

int Get(const Options& o, const std::string& id) {
  grpc::ClientContext context;
  SetDeadline(&context, UnarySeconds(o));
  v1::GetJobRequest request;
  request.set_job_id(id);
  v1::Job job;
  grpc::Status status = Stub(o)->GetJob(&context, request, &job);
  if (!status.ok()) return FailRpc(status);
  std::string text;
  google::protobuf::TextFormat::PrintToString(job, &text);
  std::printf("%s", text.c_str());
  return 0;
}

int Cancel(const Options& o, const std::string& id) {
  grpc::ClientContext context;
  SetDeadline(&context, UnarySeconds(o));
  v1::CancelJobRequest request;
  request.set_job_id(id);
  v1::Job job;
  grpc::Status status = Stub(o)->CancelJob(&context, request, &job);
  if (!status.ok()) return FailRpc(status);
  absl::PrintF("%s\n", JobSummary(job));
  return 0;
}

int Watch(const Options& o, const std::string& id) {
  grpc::ClientContext context;
  SetDeadline(&context, o.timeout_seconds > 0 ? o.timeout_seconds : 3600);
  v1::WatchJobRequest request;
  request.set_job_id(id);
  auto reader = Stub(o)->WatchJob(&context, request);
  ProgressBar bar(o.quiet);
  std::optional<v1::GenerateCompleted> done;
  v1::GenerateEvent event;
  while (reader->Read(&event)) {
    if (event.has_accepted()) {
      bar.Message(absl::StrFormat("watching job %s (seed %d)", event.accepted().job_id(),
                                  event.accepted().resolved_request().seed()));
    } else if (event.has_progress()) {
      bar.Show(event.progress());
    } else if (event.has_completed()) {
      done = event.completed();
    }
  }
  bar.EndLine();
  grpc::Status status = reader->Finish();
  if (!status.ok()) return FailRpc(status);
  if (!done.has_value()) return Fail("the stream ended without a completed event");
  absl::PrintF(
      "job %s SUCCEEDED: %d bytes of %s, %dx%d, %d frames, seed %d, mean sparsity %.3f, total "
      "%.2fs (fetch it with `sparge-cli result %s`)\n",
      id, done->file_size_bytes(), done->content_type(), done->width(), done->height(),
      done->num_frames(), done->seed(), done->mean_achieved_sparsity(), done->total_seconds(), id);
  return 0;
}

absl::StatusOr<std::vector<v1::JobState>> ParseStates(const std::string& list) {
  std::vector<v1::JobState> states;
  for (absl::string_view name : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    v1::JobState state;
    const std::string full = absl::StrCat("JOB_STATE_", absl::AsciiStrToUpper(name));
    if (!v1::JobState_Parse(full, &state) || state == v1::JOB_STATE_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--states: unknown state '", name,
          "' (queued, running, succeeded, failed, cancelled, deadline_exceeded)"));
    }
    states.push_back(state);
  }
  return states;
}

int List(const Options& o) {
  absl::StatusOr<std::vector<v1::JobState>> states = ParseStates(o.states);
  if (!states.ok()) return Fail(std::string(states.status().message()));
  if (o.limit < 1) return Fail("--limit: must be >= 1");
  auto stub = Stub(o);
  v1::ListJobsRequest request;
  for (v1::JobState s : *states) request.add_states(s);
  int shown = 0;
  absl::PrintF("%-22s %-18s %-20s %-12s %s\n", "JOB_ID", "STATE", "CREATED (UTC)", "SIZE",
               "PROMPT");
  while (shown < o.limit) {
    request.set_page_size(std::min(o.limit - shown, 1000));
    grpc::ClientContext context;
    SetDeadline(&context, UnarySeconds(o));
    v1::ListJobsResponse response;
    grpc::Status status = stub->ListJobs(&context, request, &response);
    if (!status.ok()) return FailRpc(status);
    for (const v1::Job& job : response.jobs()) {
      const v1::GenerateRequest& r = job.request();
      std::string prompt = r.prompt().substr(0, 40);
      std::replace(prompt.begin(), prompt.end(), '\n', ' ');
      absl::PrintF("%-22s %-18s %-20s %-12s %s\n", job.job_id(), StateName(job.state()),
                   absl::FormatTime("%Y-%m-%d %H:%M:%S",
                                    absl::FromUnixSeconds(job.create_time().seconds()),
                                    absl::UTCTimeZone()),
                   absl::StrCat(r.width(), "x", r.height(), "x", r.num_frames()), prompt);
      ++shown;
    }
    if (response.next_page_token().empty()) break;
    request.set_page_token(response.next_page_token());
  }
  return 0;
}

int Result(const Options& o, const std::string& id) {
  grpc::ClientContext context;
  SetDeadline(&context, o.timeout_seconds > 0 ? o.timeout_seconds : 600);
  v1::GetJobResultRequest request;
  request.set_job_id(id);
  auto reader = Stub(o)->GetJobResult(&context, request);
  std::string out = o.out;
  std::string partial;
  std::ofstream file;
  int64_t written = 0, total = -1;
  std::string content_type;
  v1::JobResultChunk chunk;
  while (reader->Read(&chunk)) {
    if (!file.is_open()) {
      if (out.empty()) {
        out = absl::StrCat(id, chunk.output_format() == v1::OUTPUT_FORMAT_PNG_FRAMES ? ".tar"
                                                                                     : ".mp4");
      }
      partial = out + ".part";
      file.open(partial, std::ios::binary | std::ios::trunc);
      if (!file) {
        context.TryCancel();
        return Fail(absl::StrCat("cannot write ", partial));
      }
      total = chunk.total_size_bytes();
      content_type = chunk.content_type();
    }
    if (chunk.offset() != written) {
      context.TryCancel();
      file.close();
      std::remove(partial.c_str());
      return Fail(absl::StrCat("chunk at offset ", chunk.offset(), ", expected ", written));
    }
    file.write(chunk.data().data(), static_cast<std::streamsize>(chunk.data().size()));
    written += static_cast<int64_t>(chunk.data().size());
  }
  grpc::Status status = reader->Finish();
  const bool opened = file.is_open();
  if (opened) file.close();
  if (!status.ok()) {
    if (opened) std::remove(partial.c_str());
    return FailRpc(status);
  }
  if (!opened) return Fail("the server sent no data");
  if (written != total || !file) {
    std::remove(partial.c_str());
    return Fail(absl::StrCat("received ", written, " bytes, the file has ", total));
  }
  if (std::rename(partial.c_str(), out.c_str()) != 0) {
    return Fail(absl::StrCat("cannot rename ", partial, " to ", out));
  }
  absl::PrintF("wrote %s (%d bytes, %s)\n", out, written, content_type);
  return 0;
}

int Run(int argc, char** argv) {
  Options o;
  bool help = false;
  FlagParser flags;
  flags.AddString("server", &o.server, "server address, HOST:PORT");
  flags.AddFloat("timeout", &o.timeout_seconds,
                 "call deadline in seconds; 0: 3600 for generate and watch, 600 for result, 10 "
                 "for info, 5 for health, 30 for the other job commands");
  flags.AddString("prompt", &o.prompt, "generate / submit: what to generate (required)");
  flags.AddString("negative-prompt", &o.negative_prompt,
                  "generate / submit: what to steer away from; unset: the server's default");
  flags.AddString("out", &o.out,
                  "generate / result: output file; empty: out.mp4 (out.tar for --format png) for "
                  "generate, JOB_ID.mp4 (.tar) for result");
  flags.AddInt("width", &o.width, "generate / submit: width in pixels, a multiple of 16");
  flags.AddInt("height", &o.height, "generate / submit: height in pixels, a multiple of 16");
  flags.AddInt("frames", &o.frames, "generate / submit: number of frames, 4k+1");
  flags.AddInt("fps", &o.fps, "generate / submit: frames per second of the MP4");
  flags.AddInt("steps", &o.steps, "generate / submit: denoising steps");
  flags.AddUint64("seed", &o.seed, "generate / submit: noise seed; unset: random (printed)");
  flags.AddFloat("guidance", &o.guidance,
                 "generate / submit: classifier-free guidance scale (<= 1: off)");
  flags.AddString("sampler", &o.sampler, "generate / submit: euler | unipc");
  flags.AddFloat("shift", &o.shift, "generate / submit: flow-matching timestep shift");
  flags.AddString("format", &o.format, "generate / submit: mp4 | png (a tar of PNG frames)");
  flags.AddString("mode", &o.mode,
                  "generate / submit: attention sparsity, dense | topk | topp | hybrid");
  flags.AddFloat("topk", &o.topk, "generate / submit: fraction of key blocks kept, (0, 1]");
  flags.AddFloat("topp", &o.topp, "generate / submit: attention mass kept, (0, 1]");
  flags.AddInt("dense-steps", &o.dense_steps, "generate / submit: first steps that run dense");
  flags.AddString("priority", &o.priority, "generate / submit: low | normal | high");
  flags.AddBool("quiet", &o.quiet, "generate / watch: no progress output");
  flags.AddString("idempotency-key", &o.idempotency_key,
                  "submit: a retry with the same key returns the first job instead of a new one");
  flags.AddFloat("job-timeout", &o.job_timeout_seconds,
                 "submit: stop the job (DEADLINE_EXCEEDED) if not done this many seconds after "
                 "submission; unset: no limit");
  flags.AddString("states", &o.states,
                  "list: comma-separated states to show; empty: all");
  flags.AddInt("limit", &o.limit, "list: show at most this many jobs");
  flags.AddBool("help", &help, "print this help and exit");

  std::vector<std::string> positional;
  if (absl::Status s = flags.Parse(argc, argv, &positional); !s.ok()) {
    return Fail(std::string(s.message()));
  }
  if (help) {
    std::printf("%s%s", kUsage, flags.Usage().c_str());
    return 0;
  }
  const std::string command = positional.empty() ? "generate" : positional.front();
  if (command == "get" || command == "watch" || command == "cancel" || command == "result") {
    absl::StatusOr<std::string> id = JobIdArgument(positional);
    if (!id.ok()) return Fail(std::string(id.status().message()));
    if (command == "get") return Get(o, *id);
    if (command == "watch") return Watch(o, *id);
    if (command == "cancel") return Cancel(o, *id);
    return Result(o, *id);
  }
  if (positional.size() > 1) return Fail(absl::StrCat("unexpected argument '", positional[1], "'"));
  if (command == "generate") return Generate(o, flags);
  if (command == "info") return Info(o);
  if (command == "health") return Health(o);
  if (command == "submit") return Submit(o, flags);
  if (command == "list") return List(o);
  return Fail(absl::StrCat("unknown command '", command,
                           "' (generate, info, health, submit, get, watch, cancel, list or "
                           "result; see --help)"));
}

}  // namespace
}  // namespace sparge::cli

int main(int argc, char** argv) { return sparge::cli::Run(argc, argv); }
