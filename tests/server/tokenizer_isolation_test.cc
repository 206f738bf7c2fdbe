// The tokenizer in a process that also runs the system protobuf (as every gRPC binary does):
// Debian's libsentencepiece exports its own protobuf 3.14, so linking it directly made its calls
// bind to the system 3.21 and fail ("compiled against version 3.14.0"). The engine now reaches
// SentencePiece only through the dlopen()ed shim (engine/spm_shim/); these tests fail if that
// isolation breaks. Kept out of server_test: it links the engine (link only, see CMakeLists.txt).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/assets/embedded_assets.h"
#include "engine/models/tokenizer.h"
#include "engine/spm_shim/spm_shim.h"
#include "google/protobuf/stubs/common.h"
#include "sparge/v1/video_service.pb.h"

namespace sparge::server {
namespace {

using engine::Tokenizer;

// A round trip through the system protobuf runtime, so that it is loaded and in use.
void ExpectProtobufRoundTrip(const std::string& prompt) {
  v1::GenerateRequest request;
  request.set_prompt(prompt);
  request.set_num_frames(17);
  request.set_seed(42);
  std::string wire;
  ASSERT_TRUE(request.SerializeToString(&wire));
  v1::GenerateRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire));
  EXPECT_EQ(parsed.prompt(), prompt);
  EXPECT_EQ(parsed.num_frames(), 17);
  EXPECT_EQ(parsed.seed(), 42u);
}

TEST(TokenizerIsolationTest, SystemProtobufIsTheOneInUse) {
  // Headers and runtime agree, and they are not SentencePiece's embedded 3.14.
  EXPECT_GE(GOOGLE_PROTOBUF_VERSION, 3015000);
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  ExpectProtobufRoundTrip("a red fox");
}

TEST(TokenizerIsolationTest, EmbeddedTokenizerWorksBesideSystemProtobuf) {
  ExpectProtobufRoundTrip("before the tokenizer");
  auto tokenizer = Tokenizer::Embedded();
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_GE((*tokenizer)->vocab_size(), 100);
  const Tokenizer::Encoded e = (*tokenizer)->Encode("A red fox runs across a snowy field.", 32);
  ASSERT_EQ(e.ids.size(), 32u);
  int real = 0;
  for (int64_t m : e.mask) real += static_cast<int>(m);
  EXPECT_GE(real, 5);
  EXPECT_EQ(e.ids[real - 1], Tokenizer::kEosId);
  for (int i = 0; i < real - 1; ++i) EXPECT_GT(e.ids[i], Tokenizer::kEosId) << i;
  ExpectProtobufRoundTrip("after the tokenizer");
}

TEST(TokenizerIsolationTest, BadModelBytesAreAnErrorNotACrash) {
  // Parsing goes through SentencePiece's own protobuf; with the wrong one bound it aborted here.
  auto tokenizer = Tokenizer::FromSerializedModel("definitely not a model proto");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
}

// The shim's C contract, called directly: short buffers report the size needed, pieces map to
// ids, errors come back as text.
TEST(TokenizerIsolationTest, ShimCApi) {
  void* lib = dlopen(SPARGE_SPM_SHIM_PATH, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  ASSERT_NE(lib, nullptr) << dlerror();
  const auto load = reinterpret_cast<decltype(&sparge_spm_load)>(dlsym(lib, "sparge_spm_load"));
  const auto free = reinterpret_cast<decltype(&sparge_spm_free)>(dlsym(lib, "sparge_spm_free"));
  const auto encode =
      reinterpret_cast<decltype(&sparge_spm_encode)>(dlsym(lib, "sparge_spm_encode"));
  const auto piece_to_id =
      reinterpret_cast<decltype(&sparge_spm_piece_to_id)>(dlsym(lib, "sparge_spm_piece_to_id"));
  const auto abi =
      reinterpret_cast<decltype(&sparge_spm_abi_version)>(dlsym(lib, "sparge_spm_abi_version"));
  ASSERT_TRUE(load && free && encode && piece_to_id && abi);
  EXPECT_EQ(abi(), SPARGE_SPM_ABI_VERSION);

  char error[256] = {'x', '\0'};
  EXPECT_EQ(load("junk", 4, error, sizeof(error)), nullptr);
  EXPECT_STRNE(error, "x");
  EXPECT_NE(std::string(error), "");

  const std::string_view model = engine::TinyTokenizerModel();
  SpargeSpm* spm = load(model.data(), model.size(), error, sizeof(error));
  ASSERT_NE(spm, nullptr) << error;
  const std::string text = "a golden retriever catches a frisbee";
  const int64_t needed = encode(spm, text.data(), text.size(), nullptr, 0, nullptr, 0);
  ASSERT_GT(needed, 2);
  std::vector<int32_t> short_buffer(1, -7);
  EXPECT_EQ(encode(spm, text.data(), text.size(), short_buffer.data(), 1, nullptr, 0), needed);
  EXPECT_EQ(short_buffer[0], -7);  // untouched: the ids did not fit
  std::vector<int32_t> ids(static_cast<size_t>(needed));
  ASSERT_EQ(encode(spm, text.data(), text.size(), ids.data(), ids.size(), nullptr, 0), needed);
  EXPECT_EQ(piece_to_id(spm, "</s>", 4), 1);
  EXPECT_EQ(piece_to_id(spm, "<pad>", 5), 0);
  free(spm);
  free(nullptr);
  ExpectProtobufRoundTrip("after the C API");
}

}  // namespace
}  // namespace sparge::server
