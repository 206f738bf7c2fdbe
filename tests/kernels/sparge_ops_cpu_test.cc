// CPU tests of the sparge Torch ops (run everywhere): mask selection rules against an independent
// scalar implementation, masked attention forward and gradients against a float64 dense reference,
// autograd through the registered op, layouts through strides, and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "engine/ops/sparge_ops.h"
#include "tests/kernels/reference.h"

namespace sparge {
namespace {

using at::Tensor;
using ops::BlockMask;

// Independent scalar implementation of SPARSE_ATTENTION.md section 2 for one (b, h), in double.
std::vector<std::vector<int>> ScalarMask(const Tensor& q_bh, const Tensor& k_bh, int mode, double topk,
                                         double topp, int bq, int bk) {
  Tensor q = q_bh.to(at::kDouble).contiguous(), k = k_bh.to(at::kDouble).contiguous();
  const int L = q.size(0), D = q.size(1);
  const int nq = (L + bq - 1) / bq, nk = (L + bk - 1) / bk;
  auto qa = q.accessor<double, 2>();
  auto ka = k.accessor<double, 2>();
  std::vector<double> mean(D, 0.0);
  for (int l = 0; l < L; ++l)
    for (int d = 0; d < D; ++d) mean[d] += ka[l][d] / L;
  std::vector<std::vector<double>> kp(nk, std::vector<double>(D, 0.0));
  for (int j = 0; j < nk; ++j) {
    const int r0 = j * bk, r1 = std::min(L, r0 + bk);
    for (int l = r0; l < r1; ++l)
      for (int d = 0; d < D; ++d) kp[j][d] += (ka[l][d] - mean[d]) / (r1 - r0);
  }
  std::vector<std::vector<int>> out;
  for (int i = 0; i < nq; ++i) {
    const int r0 = i * bq, r1 = std::min(L, r0 + bq);
    std::vector<double> qp(D, 0.0);
    for (int l = r0; l < r1; ++l)
      for (int d = 0; d < D; ++d) qp[d] += qa[l][d] / (r1 - r0);
    std::vector<double> s(nk);
    for (int j = 0; j < nk; ++j) {
      double acc = 0;
      for (int d = 0; d < D; ++d) acc += qp[d] * kp[j][d];
      s[j] = acc / std::sqrt(double(D));
    }
    const double mx = *std::max_element(s.begin(), s.end());
    double sum = 0;
    for (double& x : s) sum += (x = std::exp(x - mx));
    for (double& x : s) x /= sum;
    std::vector<int> order(nk);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });
    int n_p = 1;
    double c = 0;
    for (int t = 0; t < nk; ++t) {
      c += s[order[t]];
      if (c >= topp) break;
      ++n_p;
    }
    const int n_k = static_cast<int>(std::ceil(topk * nk - 1e-6));
    int n = mode == ops::kModeTopK ? n_k : mode == ops::kModeTopP ? n_p
            : mode == ops::kModeHybrid ? std::max(n_k, n_p) : nk;
    n = std::clamp(n, 1, nk);
    std::vector<int> kept(order.begin(), order.begin() + n);
    std::sort(kept.begin(), kept.end());
    out.push_back(kept);
  }
  return out;
}

std::vector<int> Row(const Tensor& indices, const Tensor& counts, int b, int h, int i) {
  const int c = counts[b][h][i].item<int>();
  std::vector<int> v(c);
  for (int t = 0; t < c; ++t) v[t] = indices[b][h][i][t].item<int>();
  return v;
}

TEST(SpargeOpsCpu, MaskMatchesScalarReferenceForAllModes) {
  const int64_t B = 4, H = 2, D = 64;
  for (int64_t L : {1, 63, 127, 129, 700}) {
    auto [q, k] = testing::StructuredQK(B, L, H, D, at::kFloat, at::kCPU, 7 + L);
    Tensor mode = at::tensor({ops::kModeTopK, ops::kModeTopP, ops::kModeHybrid, ops::kModeDense}, at::kInt);
    Tensor topk = at::tensor({0.3f, 0.1f, 0.05f, 0.2f});
    Tensor topp = at::tensor({0.5f, 0.9f, 0.7f, 0.3f});
    BlockMask m = ops::PredictBlockMask(q, k, mode, topk, topp, 128, 32);
    const int nq = (L + 127) / 128;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        auto ref = ScalarMask(q[b].select(1, h), k[b].select(1, h), mode[b].item<int>(),
                              topk[b].item<double>(), topp[b].item<double>(), 128, 32);
        for (int i = 0; i < nq; ++i)
          ASSERT_EQ(Row(m.indices, m.counts, b, h, i), ref[i]) << "L=" << L << " b=" << b << " h=" << h << " i=" << i;
      }
    // The transpose lists exactly the same pairs.
    Tensor keep = testing::KeepFromLut(m.counts, m.indices);
    Tensor keep_t = testing::KeepFromLut(m.t_counts, m.t_indices);
    EXPECT_TRUE(keep.equal(keep_t.transpose(-1, -2)));
    EXPECT_TRUE(m.t_counts.equal(keep.sum(2).to(at::kInt)));
  }
}

TEST(SpargeOpsCpu, MaskCountRules) {
  // Nk = 10 key blocks: TOPK 0.3 keeps exactly 3 (epsilon rule), topk 0 still keeps 1, DENSE all,
  // HYBRID the max of the two counts, TOPP with p = 1 keeps every block that has mass.
  const int64_t L = 640, H = 3, D = 64;
  auto [q, k] = testing::StructuredQK(1, L, H, D, at::kFloat, at::kCPU, 3);
  auto pred = [&](int mode, float tk, float tp) {
    return ops::PredictBlockMask(q, k, at::tensor({mode}, at::kInt), at::tensor({tk}),
                                 at::tensor({tp}), 128, 64);
  };
  EXPECT_TRUE((pred(ops::kModeTopK, 0.3f, 0.f).counts == 3).all().item<bool>());
  EXPECT_TRUE((pred(ops::kModeTopK, 0.f, 0.f).counts == 1).all().item<bool>());
  BlockMask dense = pred(ops::kModeDense, 0.f, 0.f);
  EXPECT_TRUE((dense.counts == 10).all().item<bool>());
  EXPECT_TRUE(dense.indices.equal(at::arange(10, at::kInt).expand_as(dense.indices)));
  Tensor ck = pred(ops::kModeTopK, 0.2f, 0.f).counts, cp = pred(ops::kModeTopP, 0.f, 0.8f).counts;
  EXPECT_TRUE(pred(ops::kModeHybrid, 0.2f, 0.8f).counts.equal(at::maximum(ck, cp)));
  EXPECT_TRUE((pred(ops::kModeTopP, 0.f, 0.f).counts == 1).all().item<bool>());
}

// transposed = false (inference): the same counts and LUT, an empty transposed part, and a clear
// error where a backward pass would need it (at the forward, when inputs require grad).
TEST(SpargeOpsCpu, InferenceMaskSkipsTheTransposedPart) {
  const int64_t B = 2, L = 300, H = 2, D = 64;
  auto [q, k] = testing::StructuredQK(B, L, H, D, at::kFloat, at::kCPU, 21);
  Tensor mode = at::tensor({ops::kModeHybrid, ops::kModeTopK}, at::kInt);
  Tensor topk = at::tensor({0.2f, 0.3f}), topp = at::tensor({0.6f, 0.f});
  BlockMask full = ops::PredictBlockMask(q, k, mode, topk, topp, 128, 64);
  BlockMask inf = ops::PredictBlockMask(q, k, mode, topk, topp, 128, 64, /*transposed=*/false);
  EXPECT_TRUE(inf.counts.equal(full.counts));
  EXPECT_TRUE(inf.indices.equal(full.indices));
  EXPECT_EQ(inf.t_counts.sizes(), at::IntArrayRef({B, H, 0}));
  EXPECT_EQ(inf.t_indices.sizes(), at::IntArrayRef({B, H, 0, 0}));
  Tensor v = at::randn({B, L, H, D});
  auto [o_inf, lse_inf] = ops::BlockSparseAttention(q, k, v, inf);  // no grad needed: fine
  auto [o_full, lse_full] = ops::BlockSparseAttention(q, k, v, full);
  EXPECT_TRUE(o_inf.equal(o_full));
  Tensor qg = q.clone().requires_grad_(true);
  try {
    ops::BlockSparseAttention(qg, k, v, inf);
    ADD_FAILURE() << "a trainable call with an inference mask must fail";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("transposed=False"), std::string::npos) << e.what();
  }
}

TEST(SpargeOpsCpu, PerHeadKnobs) {
  auto [q, k] = testing::StructuredQK(2, 300, 2, 64, at::kFloat, at::kCPU, 11);
  Tensor mode = at::full({2, 2}, ops::kModeTopK, at::kInt);
  Tensor topk = at::tensor({0.2f, 1.0f, 0.5f, 0.1f}).view({2, 2});
  BlockMask m = ops::PredictBlockMask(q, k, mode, topk, at::zeros({2}), 128, 32);  // Nk = 10
  EXPECT_EQ(m.counts[0][0][0].item<int>(), 2);
  EXPECT_EQ(m.counts[0][1][0].item<int>(), 10);
  EXPECT_EQ(m.counts[1][0][0].item<int>(), 5);
  EXPECT_EQ(m.counts[1][1][0].item<int>(), 1);
}

TEST(SpargeOpsCpu, BadKnobsAreRejected) {
  auto [q, k] = testing::StructuredQK(1, 64, 1, 64, at::kFloat, at::kCPU, 1);
  EXPECT_THROW(ops::PredictBlockMask(q, k, at::tensor({0}, at::kInt), at::tensor({0.1f}),
                                     at::tensor({0.5f})),
               c10::Error);
  EXPECT_THROW(ops::PredictBlockMask(q, k, at::tensor({2}, at::kInt), at::tensor({1.5f}),
                                     at::tensor({0.5f})),
               c10::Error);
  EXPECT_THROW(ops::PredictBlockMask(q, k, at::tensor({2, 2}, at::kInt), at::tensor({0.1f}),
                                     at::tensor({0.5f})),
               c10::Error);
}

// Forward and all three gradients through the registered autograd op vs the float64 reference.
void CheckAttention(int64_t B, int64_t L, int64_t H, int64_t D, at::ScalarType dtype, bool head_major,
                    int64_t block_k, double tol) {
  auto [q, k] = testing::StructuredQK(B, L, H, D, dtype, at::kCPU, 100 + L + D);
  Tensor v = at::randn({B, L, H, D}).to(dtype);
  if (head_major) {  // [B, H, L, D] storage viewed as [B, L, H, D]
    q = q.transpose(1, 2).contiguous().transpose(1, 2);
    k = k.transpose(1, 2).contiguous().transpose(1, 2);
    v = v.transpose(1, 2).contiguous().transpose(1, 2);
  }
  std::vector<int> modes = {ops::kModeHybrid, ops::kModeTopK, ops::kModeTopP};
  Tensor mode = at::tensor(std::vector<int>(modes.begin(), modes.begin() + B), at::kInt);
  Tensor topk = at::tensor(std::vector<float>{0.1f, 0.3f, 0.05f}).slice(0, 0, B);
  Tensor topp = at::tensor(std::vector<float>{0.6f, 0.2f, 0.9f}).slice(0, 0, B);
  BlockMask m = ops::PredictBlockMask(q, k, mode, topk, topp, 128, block_k);
  const double scale = 1.0 / std::sqrt(double(D));
  Tensor g = at::randn({B, L, H, D}).to(dtype);
  auto ref = testing::DenseMaskedReference(q, k, v, g, m.counts, m.indices, 128, block_k, scale);

  Tensor qg = q.detach().clone().set_requires_grad(true);
  Tensor kg = k.detach().clone().set_requires_grad(true);
  Tensor vg = v.detach().clone().set_requires_grad(true);
  auto [o, lse] = ops::BlockSparseAttention(qg, kg, vg, m, 0.0);
  o.backward(g);
  EXPECT_FALSE(lse.requires_grad());
  EXPECT_LT(testing::RelErr(o, ref.o), tol) << "L=" << L;
  EXPECT_LT(testing::RelErr(lse, ref.lse), 1e-5) << "L=" << L;
  EXPECT_LT(testing::RelErr(qg.grad(), ref.dq), 2 * tol) << "L=" << L;
  EXPECT_LT(testing::RelErr(kg.grad(), ref.dk), 2 * tol) << "L=" << L;
  EXPECT_LT(testing::RelErr(vg.grad(), ref.dv), 2 * tol) << "L=" << L;
}

TEST(SpargeOpsCpu, AttentionMatchesReferenceFloat) {
  for (int64_t L : {1, 127, 129, 300}) CheckAttention(3, L, 2, 64, at::kFloat, false, 64, 1e-5);
}

TEST(SpargeOpsCpu, AttentionMatchesReferenceBf16HeadMajor) {
  CheckAttention(2, 257, 3, 128, at::kBFloat16, true, 128, 1e-2);
}

// Query blocks that keep no key block (a whole row of one head, the partial last block of
// another): O = 0, LSE = -inf, no contribution to any gradient, in the CPU op and the float64
// reference alike (the GPU test FusedBackwardEmptyRowsAndWideBlocks compares the kernels to the
// same reference).
TEST(SpargeOpsCpu, EmptyRowsMatchReference) {
  const int64_t B = 1, L = 300, H = 2, D = 64;
  auto [q, k] = testing::StructuredQK(B, L, H, D, at::kFloat, at::kCPU, 9);
  Tensor v = at::randn({B, L, H, D}), g = at::randn({B, L, H, D});
  BlockMask m = ops::PredictBlockMask(q, k, at::tensor({ops::kModeTopK}, at::kInt), at::tensor({0.5f}),
                                      at::tensor({0.f}), 128, 64);
  m.counts = m.counts.clone();
  m.indices = m.indices.clone();
  m.counts[0][1][0] = 0;  // head 1, query block 0
  m.counts[0][0][2] = 0;  // head 0, the partial last query block (rows 256..299)
  m.indices[0][1][0].fill_(-1);
  m.indices[0][0][2].fill_(-1);
  const double scale = 1.0 / std::sqrt(double(D));
  auto ref = testing::DenseMaskedReference(q, k, v, g, m.counts, m.indices, 128, 64, scale);
  for (const Tensor& t : {ref.o, ref.dq, ref.dk, ref.dv}) ASSERT_TRUE(at::isfinite(t).all().item<bool>());
  Tensor qg = q.detach().clone().set_requires_grad(true);
  Tensor kg = k.detach().clone().set_requires_grad(true);
  Tensor vg = v.detach().clone().set_requires_grad(true);
  auto [o, lse] = ops::BlockSparseAttention(qg, kg, vg, m, 0.0);
  o.backward(g);
  EXPECT_EQ(o[0].select(1, 1).slice(0, 0, 128).abs().max().item<float>(), 0.f);
  EXPECT_EQ(o[0].select(1, 0).slice(0, 256, L).abs().max().item<float>(), 0.f);
  EXPECT_EQ(qg.grad()[0].select(1, 1).slice(0, 0, 128).abs().max().item<float>(), 0.f);
  Tensor fin = at::isfinite(ref.lse);
  EXPECT_TRUE(fin.equal(at::isfinite(lse)));
  EXPECT_TRUE(at::isneginf(lse[0][1].slice(0, 0, 128)).all().item<bool>());
  EXPECT_LT(testing::RelErr(lse.masked_select(fin), ref.lse.masked_select(fin)), 1e-5);
  EXPECT_LT(testing::RelErr(o, ref.o), 1e-5);
  EXPECT_LT(testing::RelErr(qg.grad(), ref.dq), 2e-5);
  EXPECT_LT(testing::RelErr(kg.grad(), ref.dk), 2e-5);
  EXPECT_LT(testing::RelErr(vg.grad(), ref.dv), 2e-5);
}

TEST(SpargeOpsCpu, DenseModeEqualsDenseAttention) {
  const int64_t B = 1, L = 200, H = 2, D = 64;
  auto [q, k] = testing::StructuredQK(B, L, H, D, at::kFloat, at::kCPU, 5);
  Tensor v = at::randn({B, L, H, D});
  BlockMask m = ops::PredictBlockMask(q, k, at::tensor({ops::kModeDense}, at::kInt),
                                      at::tensor({0.f}), at::tensor({0.f}), 128, 64);
  auto [o, lse] = ops::BlockSparseAttention(q, k, v, m, 0.0);
  Tensor s = at::matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)) / std::sqrt(double(D));
  Tensor dense = at::matmul(at::softmax(s, -1), v.transpose(1, 2)).transpose(1, 2);
  EXPECT_LT(testing::RelErr(o, dense), 1e-5);
  EXPECT_DOUBLE_EQ(ops::AchievedSparsity(m, L), 0.0);
}

TEST(SpargeOpsCpu, AchievedSparsityCountsTokens) {
  // L = 130: blocks of 128 and 2 rows/cols. Keep only the diagonal blocks.
  const int64_t L = 130;
  BlockMask m;
  m.block_q = 128;
  m.block_k = 128;
  m.counts = at::ones({1, 1, 2}, at::kInt);
  m.indices = at::tensor({0, -1, 1, -1}, at::kInt).view({1, 1, 2, 2});
  const double kept = 128.0 * 128 + 2 * 2;
  EXPECT_NEAR(ops::AchievedSparsity(m, L), 1.0 - kept / (L * L), 1e-12);
}

}  // namespace
}  // namespace sparge
