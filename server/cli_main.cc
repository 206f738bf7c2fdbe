// sparge-cli: command-line client of sparge-server.
//   generate (default): send a prompt, show a progress bar on stderr, write the video file.
//   info: print GetServerInfo.   health: exit 0 iff the server reports SERVING.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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

int Run(int argc, char** argv) {
  Options o;
  bool help = false;
  FlagParser flags;
  flags.AddString("server", &o.server, "server address, HOST:PORT");
  flags.AddFloat("timeout", &o.timeout_seconds,
                 "call deadline in seconds; 0: 3600 for generate, 10 for info, 5 for health");
  flags.AddString("prompt", &o.prompt, "generate: what to generate (required)");
  flags.AddString("negative-prompt", &o.negative_prompt,
                  "generate: what to steer away from; unset: the server's default");
  flags.AddString("out", &o.out, "generate: output file; empty: out.mp4 (out.tar for --format png)");
  flags.AddInt("width", &o.width, "generate: width in pixels, a multiple of 16");
  flags.AddInt("height", &o.height, "generate: height in pixels, a multiple of 16");
  flags.AddInt("frames", &o.frames, "generate: number of frames, 4k+1");
  flags.AddInt("fps", &o.fps, "generate: frames per second of the MP4");
  flags.AddInt("steps", &o.steps, "generate: denoising steps");
  flags.AddUint64("seed", &o.seed, "generate: noise seed; unset: random (printed)");
  flags.AddFloat("guidance", &o.guidance, "generate: classifier-free guidance scale (<= 1: off)");
  flags.AddString("sampler", &o.sampler, "generate: euler | unipc");
  flags.AddFloat("shift", &o.shift, "generate: flow-matching timestep shift");
  flags.AddString("format", &o.format, "generate: mp4 | png (a tar of PNG frames)");
  flags.AddString("mode", &o.mode, "generate: attention sparsity, dense | topk | topp | hybrid");
  flags.AddFloat("topk", &o.topk, "generate: fraction of key blocks kept, (0, 1]");
  flags.AddFloat("topp", &o.topp, "generate: attention mass kept, (0, 1]");
  flags.AddInt("dense-steps", &o.dense_steps, "generate: first steps that run dense");
  flags.AddString("priority", &o.priority, "generate: low | normal | high");
  flags.AddBool("quiet", &o.quiet, "generate: no progress output");
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
  if (positional.size() > 1) return Fail(absl::StrCat("unexpected argument '", positional[1], "'"));
  if (command == "generate") return Generate(o, flags);
  if (command == "info") return Info(o);
  if (command == "health") return Health(o);
  return Fail(absl::StrCat("unknown command '", command, "' (generate, info or health)"));
}

}  // namespace
}  // namespace sparge::cli

int main(int argc, char** argv) { return sparge::cli::Run(argc, argv); }
