// Tests for the umT5 tokenizer wrapper and the embedded tiny SentencePiece model.
#include "engine/models/tokenizer.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "engine/assets/embedded_assets.h"

namespace sparge::engine {
namespace {

std::unique_ptr<Tokenizer> EmbeddedOrDie() {
  auto tokenizer = Tokenizer::Embedded();
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(tokenizer).value() : nullptr;
}

int CountReal(const Tokenizer::Encoded& e) {
  int n = 0;
  for (int64_t m : e.mask) n += static_cast<int>(m);
  return n;
}

TEST(TokenizerTest, EmbeddedModelLoadsWithUmt5Layout) {
  ASSERT_FALSE(TinyTokenizerModel().empty());
  auto tok = EmbeddedOrDie();
  ASSERT_NE(tok, nullptr);
  EXPECT_LE(tok->vocab_size(), 512);
  EXPECT_GE(tok->vocab_size(), 100);  // a real vocabulary, not just the specials
}

TEST(TokenizerTest, IdsAndMaskHaveMaxLenWithEosAfterTokens) {
  auto tok = EmbeddedOrDie();
  ASSERT_NE(tok, nullptr);
  const Tokenizer::Encoded e = tok->Encode("A red fox runs across a snowy field at dawn.", 64);
  ASSERT_EQ(e.ids.size(), 64u);
  ASSERT_EQ(e.mask.size(), 64u);
  const int n = CountReal(e);
  ASSERT_GE(n, 5);  // several word pieces plus EOS
  ASSERT_LT(n, 64);
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(e.mask[i], i < n ? 1 : 0) << i;
    EXPECT_LT(e.ids[i], tok->vocab_size());
    if (i < n - 1) {
      EXPECT_GT(e.ids[i], Tokenizer::kEosId) << "token " << i << " is a special id";
    }
  }
  EXPECT_EQ(e.ids[n - 1], Tokenizer::kEosId);
  for (int i = n; i < 64; ++i) EXPECT_EQ(e.ids[i], Tokenizer::kPadId) << i;
}

TEST(TokenizerTest, TruncationKeepsEosLast) {
  auto tok = EmbeddedOrDie();
  ASSERT_NE(tok, nullptr);
  std::string long_prompt;
  for (int i = 0; i < 60; ++i) long_prompt += "a golden retriever catches a frisbee ";
  const Tokenizer::Encoded full = tok->Encode(long_prompt, 1024);
  ASSERT_GT(CountReal(full), 16);
  const Tokenizer::Encoded cut = tok->Encode(long_prompt, 16);
  ASSERT_EQ(cut.ids.size(), 16u);
  EXPECT_EQ(CountReal(cut), 16);
  EXPECT_EQ(cut.ids[15], Tokenizer::kEosId);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(cut.ids[i], full.ids[i]) << i;
}

TEST(TokenizerTest, DegenerateLengths) {
  auto tok = EmbeddedOrDie();
  ASSERT_NE(tok, nullptr);
  const Tokenizer::Encoded empty = tok->Encode("   ", 8);
  EXPECT_EQ(empty.ids, (std::vector<int64_t>{1, 0, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(empty.mask, (std::vector<int64_t>{1, 0, 0, 0, 0, 0, 0, 0}));
  const Tokenizer::Encoded one = tok->Encode("a cat", 1);
  EXPECT_EQ(one.ids, std::vector<int64_t>{1});
  EXPECT_EQ(one.mask, std::vector<int64_t>{1});
  EXPECT_TRUE(tok->Encode("a cat", 0).ids.empty());
  EXPECT_TRUE(tok->Encode("a cat", -3).mask.empty());
}

TEST(TokenizerTest, UnknownCharactersMapToUnk) {
  auto tok = EmbeddedOrDie();
  ASSERT_NE(tok, nullptr);
  const Tokenizer::Encoded e = tok->Encode("\xE6\x97\xA5\xE6\x9C\xAC", 8);  // "日本"
  bool has_unk = false;
  for (int64_t id : e.ids) has_unk |= id == 2;
  EXPECT_TRUE(has_unk);
}

// Expected strings come from Python: re.sub(r"\s+", " ", html.unescape(html.unescape(s)).strip()).
TEST(TokenizerTest, CleanPromptMatchesWansPythonCleaning) {
  struct Case {
    const char* in;
    const char* out;
  };
  const Case cases[] = {
      {"  a &amp;amp; b\t\n c  ", "a & b c"},
      {"&lt;b&gt;", "<b>"},
      {"&amp;lt;", "<"},  // unescaped twice
      {"&#65;&#x42;&#X43", "ABC"},
      {"a&nbsp;b", "a b"},  // U+00A0 is whitespace to Python
      {"&unknown; x", "&unknown; x"},
      {"&ampx", "&x"},
      {"Tom &amp Jerry", "Tom & Jerry"},
      {"caf&eacute;", "caf\xC3\xA9"},
      {"&#0;", "\xEF\xBF\xBD"},
      {"&#x110000;", "\xEF\xBF\xBD"},
      {"&#150;", "\xE2\x80\x93"},  // Windows-1252 en dash
      {"&#1;z", "z"},
      {"5 &lt 6", "5 < 6"},
      {"&;", "&;"},
      {"&#;", "&#;"},
      {"&#xZ", "&#xZ"},
      {"A\xE3\x80\x80"
       "B\xE2\x80\x83"
       "C",
       "A B C"},  // ideographic and em spaces
      {"&copyright", "\xC2\xA9right"},
      {"", ""},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(Tokenizer::CleanPrompt(c.in), c.out) << "input: " << c.in;
  }
}

TEST(TokenizerTest, EncodingCleansFirst) {
  auto tok = EmbeddedOrDie();
  ASSERT_NE(tok, nullptr);
  const auto a = tok->Encode("a cat &amp; a dog", 32);
  const auto b = tok->Encode("  a   cat\n& a\tdog ", 32);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.mask, b.mask);
  EXPECT_NE(a.ids, tok->Encode("a cat and a dog", 32).ids);
}

TEST(TokenizerTest, DeterministicAcrossInstancesAndFromFile) {
  auto tok1 = EmbeddedOrDie();
  auto tok2 = EmbeddedOrDie();
  ASSERT_NE(tok1, nullptr);
  ASSERT_NE(tok2, nullptr);
  const std::string prompt = "A lighthouse shines its beam across the sea on a foggy night.";
  EXPECT_EQ(tok1->Encode(prompt, 64).ids, tok1->Encode(prompt, 64).ids);
  EXPECT_EQ(tok1->Encode(prompt, 64).ids, tok2->Encode(prompt, 64).ids);

  const std::string path = ::testing::TempDir() + "/tiny_tokenizer_test.model";
  {
    std::ofstream out(path, std::ios::binary);
    const std::string_view bytes = TinyTokenizerModel();
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  auto from_file = Tokenizer::FromFile(path);
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  EXPECT_EQ((*from_file)->vocab_size(), tok1->vocab_size());
  EXPECT_EQ((*from_file)->Encode(prompt, 64).ids, tok1->Encode(prompt, 64).ids);
  std::remove(path.c_str());
}

TEST(TokenizerTest, BadModelsAreRejected) {
  EXPECT_FALSE(Tokenizer::FromFile("/nonexistent/tokenizer.model").ok());
  EXPECT_FALSE(Tokenizer::FromSerializedModel("not a sentencepiece model").ok());
}

}  // namespace
}  // namespace sparge::engine
