// Safetensors reader: round trips in every supported dtype, zero-copy views, header validation
// (each corruption gives a message naming the problem), sharded checkpoints with an index JSON.
#include "engine/weights/safetensors.h"

#include <torch/torch.h>

#include <cstdio>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace sparge::engine {
namespace {

// POSIX, not std::filesystem: libtorch.so exports std::filesystem symbols that crash when called.
int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }
void RemoveTree(const std::string& dir) { ::nftw(dir.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }
std::string MakeTempDir() {
  std::string templ = "/tmp/sparge_weights_test_XXXXXX";
  return ::mkdtemp(templ.data()) != nullptr ? templ : "";
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { RemoveTree(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // A raw file: 8-byte little-endian header length, header text, data bytes.
  void WriteRaw(const std::string& name, const std::string& header, size_t data_bytes) {
    std::ofstream out(Path(name), std::ios::binary);
    const uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header << std::string(data_bytes, '\0');
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, RoundTripsEveryFloatDtypeWithoutCopying) {
  std::map<std::string, torch::Tensor> tensors = {
      {"a.f32", torch::randn({3, 5})},
      {"b.bf16", torch::randn({7}).to(torch::kBFloat16)},
      {"c.f16", torch::randn({2, 2, 3}).to(torch::kHalf)},
      {"d.i64", torch::arange(6, torch::kLong).view({2, 3})},
      {"e.scalar", torch::tensor(3.5)},
      {"f.empty", torch::zeros({0, 4})},
  };
  ASSERT_TRUE(WriteSafetensors(Path("m.safetensors"), tensors, {{"format", "pt"}}).ok());
  auto file = SafetensorsFile::Open(Path("m.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  ASSERT_EQ((*file)->tensors().size(), tensors.size());
  EXPECT_EQ((*file)->tensors().at("b.bf16").dtype_name, "BF16");
  for (const auto& [name, expected] : tensors) {
    auto got = (*file)->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->scalar_type(), expected.scalar_type()) << name;
    EXPECT_EQ(got->sizes(), expected.sizes()) << name;
    EXPECT_TRUE(torch::equal(*got, expected)) << name;
  }
  // A view into the mapping, not a copy: two Gets see the same bytes.
  auto x = (*file)->Get("a.f32");
  auto y = (*file)->Get("a.f32");
  EXPECT_EQ(x->data_ptr(), y->data_ptr());
  // The view keeps the mapping alive after the file object is gone.
  file->reset();
  EXPECT_TRUE(torch::equal(*x, tensors["a.f32"]));
  EXPECT_EQ(SafetensorsFile::Open(Path("m.safetensors")).value()->Get("nope").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, RejectsCorruptHeadersWithClearMessages) {
  struct Case {
    std::string header;
    size_t data;
    std::string expect;
  };
  const Case cases[] = {
      {"{not json", 0, "not valid JSON"},
      {"[1,2]", 0, "not a JSON object"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 8, "needs 8"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4, "past the data section"},
      {R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2, "not supported"},
      {R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "bad dimension"},
      {R"({"w":{"dtype":"F32","shape":[2]}})", 8, "data_offsets"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, "overlap"},
  };
  for (const Case& c : cases) {
    WriteRaw("bad.safetensors", c.header, c.data);
    auto file = SafetensorsFile::Open(Path("bad.safetensors"));
    ASSERT_FALSE(file.ok()) << c.header;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << c.header;
    EXPECT_NE(file.status().message().find(c.expect), std::string::npos)
        << c.header << " -> " << file.status();
    EXPECT_NE(file.status().message().find("bad.safetensors"), std::string::npos);
  }
  // Header length larger than the file.
  {
    std::ofstream out(Path("short.safetensors"), std::ios::binary);
    const uint64_t n = 1000;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{}";
  }
  auto file = SafetensorsFile::Open(Path("short.safetensors"));
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("does not fit the file"), std::string::npos);
  EXPECT_EQ(SafetensorsFile::Open(Path("absent.safetensors")).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, MisalignedDataIsCopiedNotMisread) {
  // The data section starts 8-byte aligned (header padded); a 1-byte tensor first puts the
  // floats at an odd address.
  std::string header =
      R"({"pad":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');
  {
    std::ofstream out(Path("odd.safetensors"), std::ios::binary);
    const uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header;
    const float values[2] = {1.5f, -2.25f};
    out.put('\x07');
    out.write(reinterpret_cast<const char*>(values), sizeof(values));
  }
  auto file = SafetensorsFile::Open(Path("odd.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  auto w = (*file)->Get("w");
  ASSERT_TRUE(w.ok());
  EXPECT_FLOAT_EQ((*w)[0].item<float>(), 1.5f);
  EXPECT_FLOAT_EQ((*w)[1].item<float>(), -2.25f);
  EXPECT_EQ((*file)->Get("pad")->item<uint8_t>(), 7);
}

TEST_F(SafetensorsTest, ShardedCheckpointFollowsTheIndex) {
  ::mkdir(Path("sharded").c_str(), 0755);
  const torch::Tensor a = torch::randn({4, 4}), b = torch::randn({3}).to(torch::kBFloat16);
  ASSERT_TRUE(WriteSafetensors(Path("sharded/m-00001-of-00002.safetensors"), {{"a", a}}).ok());
  ASSERT_TRUE(WriteSafetensors(Path("sharded/m-00002-of-00002.safetensors"), {{"b", b}}).ok());
  auto write_index = [&](const std::string& body) {
    std::ofstream(Path("sharded/m.safetensors.index.json")) << body;
  };
  write_index(R"({"metadata":{"total_size":38},"weight_map":{"a":"m-00001-of-00002.safetensors",)"
              R"("b":"m-00002-of-00002.safetensors"}})");
  // The directory resolves to the index (two .safetensors files alone would be ambiguous).
  auto ckpt = Checkpoint::Open(Path("sharded"));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(torch::equal((*ckpt)->Get("a").value(), a));
  EXPECT_TRUE(torch::equal((*ckpt)->Get("b").value(), b));
  EXPECT_EQ((*ckpt)->Info("b")->shape, (std::vector<int64_t>{3}));

  write_index(R"({"weight_map":{"a":"m-00002-of-00002.safetensors",)"
              R"("b":"m-00002-of-00002.safetensors"}})");
  auto wrong = Checkpoint::Open(Path("sharded"));
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("does not hold it"), std::string::npos) << wrong.status();

  ASSERT_TRUE(WriteSafetensors(Path("sharded/m-00001-of-00002.safetensors"),
                               {{"a", a}, {"c", a}}).ok());
  write_index(R"({"weight_map":{"a":"m-00001-of-00002.safetensors",)"
              R"("b":"m-00002-of-00002.safetensors"}})");
  auto omitted = Checkpoint::Open(Path("sharded"));
  ASSERT_FALSE(omitted.ok());
  EXPECT_NE(omitted.status().message().find("index omits"), std::string::npos);

  write_index(R"({"weight_map":{"a":"missing.safetensors"}})");
  EXPECT_EQ(Checkpoint::Open(Path("sharded")).status().code(), absl::StatusCode::kNotFound);

  ::remove(Path("sharded/m.safetensors.index.json").c_str());
  auto ambiguous = Checkpoint::Open(Path("sharded"));
  ASSERT_FALSE(ambiguous.ok());
  EXPECT_NE(ambiguous.status().message().find("no .safetensors.index.json"), std::string::npos);
}

}  // namespace
}  // namespace sparge::engine
