// Tests for the umT5 text encoder: relative position buckets, masking, padding rows, determinism,
// and the whole forward pass against an independent reference written from WAN21.md section 3.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/models/umt5_encoder.h"

namespace sparge::engine {
namespace {

UMT5Config TinyUmt5() {
  UMT5Config c;
  c.vocab_size = 512;
  c.d_model = 64;
  c.d_kv = 16;
  c.num_heads = 4;
  c.d_ff = 128;
  c.num_layers = 2;
  c.relative_attention_num_buckets = 32;
  c.relative_attention_max_distance = 128;
  c.text_len = 64;
  return c;
}

std::unique_ptr<TextEncoder> MakeEncoder(uint64_t seed, torch::ScalarType dtype = torch::kFloat32) {
  auto tokenizer = Tokenizer::Embedded();
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  if (!tokenizer.ok()) return nullptr;
  auto encoder = TextEncoder::Create(TinyUmt5(), std::move(tokenizer).value(), seed,
                                     torch::Device(torch::kCPU), dtype);
  EXPECT_TRUE(encoder.ok()) << encoder.status();
  return encoder.ok() ? std::move(encoder).value() : nullptr;
}

// Bucket of offset r = key - query, 32 buckets, max distance 128. Non-boundary values were worked
// out by hand from 16*[r > 0] + (|r| < 8 ? |r| : min(15, 8 + floor(ln(|r|/8) / ln(16) * 8))),
// e.g. r = 12: ln(1.5)/ln(16)*8 = 1.17 -> 9 -> 25; r = 46: ln(5.75)/ln(16)*8 = 5.05 -> 13 -> 29.
TEST(Umt5Test, RelativePositionBucketsMatchHandComputedValues) {
  const std::vector<std::pair<int, int64_t>> expected = {
      {0, 0},    {1, 17},     {-1, 1},    {2, 18},     {-3, 3},   {7, 23},   {-7, 7},
      {8, 24},   {-8, 8},     {9, 24},    {11, 24},    {12, 25},  {-15, 9},  {16, 26},
      {-16, 10}, {22, 26},    {23, 27},   {32, 28},    {-32, 12}, {45, 28},  {46, 29},
      {64, 30},  {-64, 14},   {90, 30},   {91, 31},    {127, 31}, {128, 31}, {-128, 15},
      {500, 31}, {-1000, 15}, {1000, 31}, {-1999, 15}, {1999, 31}};
  // One query at position 0 sees keys at offsets 0..1999; one key at 0 sees queries at -0..-1999.
  const torch::Tensor forward = RelativePositionBuckets(1, 2000, 32, 128);
  const torch::Tensor backward = RelativePositionBuckets(2000, 1, 32, 128);
  ASSERT_EQ(forward.sizes(), (std::vector<int64_t>{1, 2000}));
  ASSERT_EQ(backward.sizes(), (std::vector<int64_t>{2000, 1}));
  for (const auto& [r, bucket] : expected) {
    const int64_t got = r >= 0 ? forward[0][r].item<int64_t>() : backward[-r][0].item<int64_t>();
    EXPECT_EQ(got, bucket) << "relative position " << r;
  }
  // Only the offset matters.
  const torch::Tensor grid = RelativePositionBuckets(50, 70, 32, 128);
  for (int q = 0; q < 50; q += 7) {
    for (int k = 0; k < 70; k += 5) {
      const int r = k - q;
      const int64_t want = r >= 0 ? forward[0][r].item<int64_t>() : backward[-r][0].item<int64_t>();
      EXPECT_EQ(grid[q][k].item<int64_t>(), want) << q << "," << k;
    }
  }
}

TEST(Umt5Test, OutputShapeAndZeroPaddingRows) {
  auto encoder = MakeEncoder(7);
  ASSERT_NE(encoder, nullptr);
  const std::vector<std::string> prompts = {"A cat sleeps on a windowsill as rain falls.",
                                            "A surfer rides a large wave at sunset over the sea"};
  auto out = encoder->Encode(prompts);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->sizes(), (std::vector<int64_t>{2, 64, 64}));
  ASSERT_EQ(out->scalar_type(), torch::kFloat32);
  for (int b = 0; b < 2; ++b) {
    const auto enc = encoder->tokenizer().Encode(prompts[b], 64);
    int n = 0;
    for (int64_t m : enc.mask) n += static_cast<int>(m);
    ASSERT_GT(n, 3);
    const torch::Tensor rows = (*out)[b];
    EXPECT_EQ(rows.slice(0, n).abs().max().item<float>(), 0.0f) << "padding rows must be zero";
    // Real rows: finite, and the final RMS norm (weight 1) leaves each with RMS ~1.
    const torch::Tensor real = rows.slice(0, 0, n);
    EXPECT_TRUE(torch::isfinite(real).all().item<bool>());
    const torch::Tensor rms = real.pow(2).mean(-1).sqrt();
    EXPECT_TRUE(torch::allclose(rms, torch::ones_like(rms), 1e-3, 1e-3)) << rms;
    // Non-degenerate: rows differ from each other.
    EXPECT_GT((real[0] - real[n - 1]).abs().max().item<float>(), 0.1f);
  }
}

TEST(Umt5Test, MaskedKeysAreIgnoredAndTheMaskMatters) {
  auto encoder = MakeEncoder(7);
  ASSERT_NE(encoder, nullptr);
  const auto enc = encoder->tokenizer().Encode("A child blows bubbles in a garden", 64);
  int n = 0;
  for (int64_t m : enc.mask) n += static_cast<int>(m);
  const torch::Tensor ids = torch::tensor(enc.ids, torch::kInt64).view({1, 64});
  const torch::Tensor mask = torch::tensor(enc.mask, torch::kInt64).view({1, 64});

  auto base = encoder->EncodeTokens(ids, mask);
  ASSERT_TRUE(base.ok()) << base.status();
  // Junk token ids under mask 0 must not change the real rows.
  torch::Tensor junk_ids = ids.clone();
  junk_ids.slice(1, n).fill_(123);
  auto junk = encoder->EncodeTokens(junk_ids, mask);
  ASSERT_TRUE(junk.ok());
  EXPECT_TRUE(torch::allclose(base->slice(1, 0, n), junk->slice(1, 0, n), 1e-6, 1e-6));
  // Unmasking the padding positions lets the real rows attend to them: different output.
  auto unmasked = encoder->EncodeTokens(ids, torch::ones_like(mask));
  ASSERT_TRUE(unmasked.ok());
  EXPECT_GT((base->slice(1, 0, n) - unmasked->slice(1, 0, n)).abs().max().item<float>(), 1e-3f);
  // A prompt's rows do not depend on its batch neighbours.
  auto batch = encoder->Encode({"A child blows bubbles in a garden", "a dog"});
  ASSERT_TRUE(batch.ok());
  EXPECT_TRUE(torch::allclose((*batch)[0], (*base)[0], 1e-5, 1e-5));
}

TEST(Umt5Test, DeterministicFromSeed) {
  auto a = MakeEncoder(11);
  auto b = MakeEncoder(11);
  auto c = MakeEncoder(12);
  ASSERT_TRUE(a && b && c);
  const std::vector<std::string> prompt = {"A hot air balloon rises slowly over green hills."};
  auto ya = a->Encode(prompt);
  auto yb = b->Encode(prompt);
  auto yc = c->Encode(prompt);
  ASSERT_TRUE(ya.ok() && yb.ok() && yc.ok());
  EXPECT_TRUE(torch::equal(*ya, *yb));
  EXPECT_FALSE(torch::allclose(*ya, *yc));
}

TEST(Umt5Test, ParameterNamesShapesAndCount) {
  auto encoder = MakeEncoder(1);
  ASSERT_NE(encoder, nullptr);
  std::map<std::string, torch::Tensor> params;
  for (auto& [name, tensor] : encoder->named_parameters()) params[name] = tensor;
  const std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"shared.weight", {512, 64}},
      {"encoder.block.0.layer.0.SelfAttention.q.weight", {64, 64}},
      {"encoder.block.0.layer.0.SelfAttention.k.weight", {64, 64}},
      {"encoder.block.0.layer.0.SelfAttention.v.weight", {64, 64}},
      {"encoder.block.0.layer.0.SelfAttention.o.weight", {64, 64}},
      {"encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight", {32, 4}},
      {"encoder.block.1.layer.0.layer_norm.weight", {64}},
      {"encoder.block.1.layer.1.DenseReluDense.wi_0.weight", {128, 64}},
      {"encoder.block.1.layer.1.DenseReluDense.wi_1.weight", {128, 64}},
      {"encoder.block.1.layer.1.DenseReluDense.wo.weight", {64, 128}},
      {"encoder.block.1.layer.1.layer_norm.weight", {64}},
      {"encoder.final_layer_norm.weight", {64}},
  };
  for (const auto& [name, shape] : expected) {
    ASSERT_TRUE(params.count(name)) << name;
    EXPECT_EQ(params[name].sizes().vec(), shape) << name;
  }
  const int64_t per_layer = 4 * 64 * 64 + 32 * 4 + 64 + 2 * 128 * 64 + 64 * 128 + 64;
  EXPECT_EQ(encoder->num_parameters(), 512 * 64 + 2 * per_layer + 64);
  EXPECT_EQ(params.size(), 1u + 2u * 10u + 1u);  // 10 tensors per layer
}

// Independent forward pass straight from the spec, on the encoder's own weights.
torch::Tensor ReferenceEncode(std::map<std::string, torch::Tensor> p, const UMT5Config& c,
                              const torch::Tensor& ids, const torch::Tensor& mask) {
  const int64_t l = ids.size(1);
  const auto rms = [&](const torch::Tensor& x, const std::string& w) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * p[w];
  };
  std::vector<int64_t> bucket(l * l);
  for (int64_t q = 0; q < l; ++q) {
    for (int64_t k = 0; k < l; ++k) {
      const int64_t r = k - q, n = std::abs(r);
      const int64_t b =
          n < 8 ? n
                : std::min<int64_t>(15, 8 + static_cast<int64_t>(std::floor(std::log(n / 8.0) /
                                                                            std::log(16.0) * 8)));
      bucket[q * l + k] = (r > 0 ? 16 : 0) + b;
    }
  }
  const torch::Tensor buckets = torch::tensor(bucket, torch::kInt64).view({l, l});
  torch::Tensor h = p["shared.weight"].index_select(0, ids[0]);  // [L, D]
  const torch::Tensor key_ok = mask[0].to(torch::kBool);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string pre = "encoder.block." + std::to_string(i) + ".layer.";
    const torch::Tensor a = rms(h, pre + "0.layer_norm.weight");
    const auto proj = [&](const char* w) {
      return torch::matmul(a, p[pre + "0.SelfAttention." + w + ".weight"].t())
          .view({l, c.num_heads, c.d_kv})
          .transpose(0, 1);
    };
    const torch::Tensor q = proj("q"), k = proj("k"), v = proj("v");
    const torch::Tensor bias =
        p[pre + "0.SelfAttention.relative_attention_bias.weight"].index({buckets}).permute(
            {2, 0, 1});
    torch::Tensor scores = torch::matmul(q, k.transpose(1, 2)) + bias;  // no 1/sqrt(d)
    scores = scores.masked_fill(~key_ok.view({1, 1, l}), -1e30);
    const torch::Tensor attn = torch::matmul(torch::softmax(scores, -1), v);
    h = h + torch::matmul(attn.transpose(0, 1).reshape({l, -1}),
                          p[pre + "0.SelfAttention.o.weight"].t());
    const torch::Tensor f = rms(h, pre + "1.layer_norm.weight");
    const torch::Tensor gate =
        torch::gelu(torch::matmul(f, p[pre + "1.DenseReluDense.wi_0.weight"].t()), "tanh");
    const torch::Tensor lin = torch::matmul(f, p[pre + "1.DenseReluDense.wi_1.weight"].t());
    h = h + torch::matmul(gate * lin, p[pre + "1.DenseReluDense.wo.weight"].t());
  }
  h = rms(h, "encoder.final_layer_norm.weight");
  return (h * mask[0].unsqueeze(1).to(h.scalar_type())).unsqueeze(0);
}

TEST(Umt5Test, MatchesIndependentReference) {
  auto encoder = MakeEncoder(5);
  ASSERT_NE(encoder, nullptr);
  torch::NoGradGuard no_grad;
  std::map<std::string, torch::Tensor> params;
  for (auto& [name, tensor] : encoder->named_parameters()) params[name] = tensor;
  // A long prompt so that offsets reach the log-spaced buckets.
  std::string prompt;
  for (int i = 0; i < 8; ++i) prompt += "a fox runs across a snowy field at dawn ";
  const auto enc = encoder->tokenizer().Encode(prompt, 64);
  const torch::Tensor ids = torch::tensor(enc.ids, torch::kInt64).view({1, 64});
  const torch::Tensor mask = torch::tensor(enc.mask, torch::kInt64).view({1, 64});
  auto got = encoder->EncodeTokens(ids, mask);
  ASSERT_TRUE(got.ok()) << got.status();
  const torch::Tensor want = ReferenceEncode(params, encoder->config(), ids, mask);
  EXPECT_LT((*got - want).abs().max().item<float>(), 1e-4f);
}

TEST(Umt5Test, LowPrecisionStaysCloseToFloat32) {
  auto fp32 = MakeEncoder(3);
  auto bf16 = MakeEncoder(3, torch::kBFloat16);
  ASSERT_TRUE(fp32 && bf16);
  const std::vector<std::string> prompt = {"A steam train crosses a stone bridge."};
  auto a = fp32->Encode(prompt);
  auto b = bf16->Encode(prompt);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(b->scalar_type(), torch::kBFloat16);
  EXPECT_LT((*a - b->to(torch::kFloat32)).abs().mean().item<float>(), 0.05f);
}

TEST(Umt5Test, RejectsBadConfigAndInputs) {
  auto tokenizer = Tokenizer::Embedded();
  ASSERT_TRUE(tokenizer.ok());
  UMT5Config small_vocab = TinyUmt5();
  small_vocab.vocab_size = 100;  // fewer rows than the tokenizer has pieces
  EXPECT_EQ(TextEncoder::Create(small_vocab, std::move(tokenizer).value(), 1,
                                torch::Device(torch::kCPU), torch::kFloat32)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  auto encoder = MakeEncoder(1);
  ASSERT_NE(encoder, nullptr);
  EXPECT_EQ(encoder->Encode({}).status().code(), absl::StatusCode::kInvalidArgument);
  const torch::Tensor bad_ids = torch::full({1, 4}, 9999, torch::kInt64);
  EXPECT_EQ(encoder->EncodeTokens(bad_ids, torch::ones({1, 4}, torch::kInt64)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sparge::engine
