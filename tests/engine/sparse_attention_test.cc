// The ATen sparse-attention reference: mask prediction on hand-checked pooling
// (partial blocks), block-sparse attention against dense SDPA and against an
// independent full-token-mask reference, achieved sparsity, and SelfAttention's
// dispatch (dense/sparse mix, backend hook).
#include "engine/attention/sparse_attention.h"

#include <dlfcn.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <string>
#include <vector>

#include "engine/attention/block_selection.h"
#include "gtest/gtest.h"

#if defined(SPARGE_WITH_CUDA)
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace sparge::engine {
namespace {

// A [B] sparsity tensor as host floats.
std::vector<float> Host(const at::Tensor& t) {
  at::Tensor c = t.to(at::kCPU, at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

at::Tensor Randn(std::vector<int64_t> shape, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
}

// Full [B, H, L, L] token mask from a block mask, built with plain loops.
at::Tensor TokenMask(const BlockSparseMask& mask) {
  const int64_t batch = mask.counts.size(0), heads = mask.counts.size(1), L = mask.seq_len;
  at::Tensor full = at::zeros({batch, heads, L, L}, at::kBool);
  auto acc = full.accessor<bool, 4>();
  auto counts = mask.counts.accessor<int32_t, 3>();
  auto indices = mask.indices.accessor<int32_t, 4>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t qi = 0; qi < L; ++qi) {
        const int64_t row = qi / mask.block_q;
        for (int32_t s = 0; s < counts[b][h][row]; ++s) {
          const int64_t kb = indices[b][h][row][s];
          for (int64_t kj = kb * mask.block_k; kj < std::min(L, (kb + 1) * mask.block_k); ++kj)
            acc[b][h][qi][kj] = true;
        }
      }
  return full;
}

// Independent masked attention: full scores, -inf outside the mask, softmax,
// AV.
std::pair<at::Tensor, at::Tensor> MaskedDense(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& token_mask) {
  at::Tensor qh = q.permute({0, 2, 1, 3}).to(at::kDouble);
  at::Tensor kh = k.permute({0, 2, 1, 3}).to(at::kDouble);
  at::Tensor vh = v.permute({0, 2, 1, 3}).to(at::kDouble);
  at::Tensor scores = at::matmul(qh, kh.transpose(-1, -2)) / std::sqrt(double(q.size(3)));
  scores = scores.masked_fill(token_mask.logical_not(), -INFINITY);
  at::Tensor lse = at::logsumexp(scores, -1);
  at::Tensor out = at::matmul(at::softmax(scores, -1), vh).permute({0, 2, 1, 3});
  return {out.to(at::kFloat), lse.to(at::kFloat)};
}

TEST(SparseAttentionTest, MaskPoolingAveragesRealTokensOfPartialLastBlock) {
  // L = 5 with blocks of 2: key blocks {0,1}, {2,3}, {4}. D = 1, one head.
  // q is constant 1, so every query block's pooled q is 1 and the row is
  // softmax(k_j / 1).
  at::Tensor q = at::ones({1, 5, 1, 1});
  at::Tensor k = at::tensor({0.0f, 2.0f, 1.0f, 1.0f, 6.0f}).view({1, 5, 1, 1});
  // mean k = 2, smoothed k = -2, 0, -1, -1, 4; pooled: -1, -1, 4 (the last
  // block is one token: averaging over the padded size 2 would give 2 instead).
  AttentionKnobs knobs{AttentionMode::kTopP, 1.0f, 0.99f};
  BlockSparseMask mask = PredictBlockMask(q, k, {knobs}, 2, 2);
  EXPECT_EQ(mask.num_q_blocks, 3);
  EXPECT_EQ(mask.num_k_blocks, 3);
  // Probabilities e^-1, e^-1, e^4 normalized: the last block holds 0.9867 ->
  // n_p = 2 for p=0.99.
  const double e4 = std::exp(4.0), em1 = std::exp(-1.0);
  const double p_last = e4 / (e4 + 2 * em1);
  ASSERT_LT(p_last, 0.99);
  ASSERT_GT(p_last + em1 / (e4 + 2 * em1), 0.99);
  for (int row = 0; row < 3; ++row) {
    EXPECT_EQ(mask.counts[0][0][row].item<int>(), 2) << row;
    EXPECT_EQ(mask.indices[0][0][row][0].item<int>(), 0) << row;  // tie 0 vs 1: lower index
    EXPECT_EQ(mask.indices[0][0][row][1].item<int>(), 2) << row;
    EXPECT_EQ(mask.indices[0][0][row][2].item<int>(), -1) << row;
  }
  // With p = 0.98 the last block alone suffices.
  knobs.topp = 0.98f;
  mask = PredictBlockMask(q, k, {knobs}, 2, 2);
  EXPECT_EQ(mask.counts[0][0][0].item<int>(), 1);
  EXPECT_EQ(mask.indices[0][0][0][0].item<int>(), 2);
}

TEST(SparseAttentionTest, MaskMatchesLoopReferenceOnRandomInputs) {
  const int64_t B = 2, L = 77, H = 3, D = 16, bq = 16, bk = 8;
  at::Tensor q = Randn({B, L, H, D}, 1), k = Randn({B, L, H, D}, 2);
  std::vector<AttentionKnobs> knobs = {{AttentionMode::kHybrid, 0.2f, 0.6f},
                                       {AttentionMode::kTopK, 0.4f, 0.1f}};
  BlockSparseMask mask = PredictBlockMask(q, k, knobs, bq, bk);
  const int64_t nq = (L + bq - 1) / bq, nk = (L + bk - 1) / bk;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      at::Tensor qs = q[b].select(1, h).to(at::kDouble), ks = k[b].select(1, h).to(at::kDouble);
      ks = ks - ks.mean(0);
      for (int64_t i = 0; i < nq; ++i) {
        at::Tensor pq = qs.slice(0, i * bq, std::min(L, (i + 1) * bq)).mean(0);
        std::vector<float> probs;
        std::vector<double> scores;
        for (int64_t j = 0; j < nk; ++j) {
          at::Tensor pk = ks.slice(0, j * bk, std::min(L, (j + 1) * bk)).mean(0);
          scores.push_back((pq * pk).sum().item<double>() / std::sqrt(double(D)));
        }
        double mx = *std::max_element(scores.begin(), scores.end()), z = 0;
        for (double s : scores) z += std::exp(s - mx);
        for (double s : scores) probs.push_back(static_cast<float>(std::exp(s - mx) / z));
        std::vector<int32_t> scratch(nk), kept(nk);
        const int n = SelectKeyBlocks(probs, knobs[b].mode, knobs[b].topk, knobs[b].topp,
                                      absl::MakeSpan(scratch), absl::MakeSpan(kept));
        ASSERT_EQ(mask.counts[b][h][i].item<int>(), n) << b << " " << h << " " << i;
        for (int s = 0; s < n; ++s) EXPECT_EQ(mask.indices[b][h][i][s].item<int>(), kept[s]);
      }
    }
}

TEST(SparseAttentionTest, AllBlocksKeptEqualsDenseSdpa) {
  const int64_t B = 2, L = 100, H = 2,
                D = 32;  // L is not a multiple of either block size
  at::Tensor q = Randn({B, L, H, D}, 3), k = Randn({B, L, H, D}, 4), v = Randn({B, L, H, D}, 5);
  std::vector<AttentionKnobs> knobs(B, {AttentionMode::kHybrid, 1.0f, 1.0f});
  BlockSparseMask mask = PredictBlockMask(q, k, knobs, 32, 16);
  EXPECT_TRUE(mask.counts.eq(mask.num_k_blocks).all().item<bool>());
  AttentionOutput sparse = BlockSparseAttentionReference(q, k, v, mask);
  at::Tensor dense = DenseAttention(q, k, v);
  EXPECT_LT((sparse.out - dense).abs().max().item<float>(), 1e-5f);
  at::Tensor scores =
      at::matmul(q.permute({0, 2, 1, 3}), k.permute({0, 2, 3, 1})) / std::sqrt(double(D));
  EXPECT_LT((sparse.lse - at::logsumexp(scores, -1)).abs().max().item<float>(), 1e-4f);
  for (float s : MaskSparsity(mask)) EXPECT_FLOAT_EQ(s, 0.0f);
}

TEST(SparseAttentionTest, SparseMatchesIndependentMaskedReference) {
  const int64_t B = 2, L = 150, H = 2, D = 16;
  at::Tensor q = Randn({B, L, H, D}, 6), k = Randn({B, L, H, D}, 7), v = Randn({B, L, H, D}, 8);
  std::vector<AttentionKnobs> knobs = {{AttentionMode::kHybrid, 0.2f, 0.5f},
                                       {AttentionMode::kTopK, 0.3f, 1.0f}};
  BlockSparseMask mask = PredictBlockMask(q, k, knobs, 32, 16);
  at::Tensor token_mask = TokenMask(mask);
  AttentionOutput sparse = BlockSparseAttentionReference(q, k, v, mask);
  auto [ref_out, ref_lse] = MaskedDense(q, k, v, token_mask);
  EXPECT_LT((sparse.out - ref_out).abs().max().item<float>(), 1e-5f);
  EXPECT_LT((sparse.lse - ref_lse).abs().max().item<float>(), 1e-4f);
  EXPECT_LT((MaskedSdpaAttention(q, k, v, mask) - ref_out).abs().max().item<float>(), 1e-5f);
  // The mask really is sparse, and the dense answer differs from it.
  EXPECT_GT((sparse.out - DenseAttention(q, k, v)).abs().max().item<float>(), 1e-3f);
  // Achieved sparsity = 1 - kept token pairs / (L * L), averaged over heads.
  std::vector<float> sparsity = MaskSparsity(mask);
  ASSERT_EQ(sparsity.size(), 2u);
  for (int64_t b = 0; b < B; ++b) {
    const double kept = token_mask[b].to(at::kDouble).mean().item<double>();
    EXPECT_NEAR(sparsity[b], 1.0 - kept, 1e-6) << b;
    EXPECT_GT(sparsity[b], 0.3f) << b;
  }
}

TEST(SparseAttentionTest, RespectsTokenMajorStridedInputsAndBf16) {
  const int64_t B = 1, L = 70, H = 2, D = 8;
  // A [B, H, L, D] tensor viewed token-major: non-contiguous input.
  at::Tensor qh = Randn({B, H, L, D}, 9), kh = Randn({B, H, L, D}, 10),
             vh = Randn({B, H, L, D}, 11);
  at::Tensor q = qh.transpose(1, 2), k = kh.transpose(1, 2), v = vh.transpose(1, 2);
  std::vector<AttentionKnobs> knobs = {{AttentionMode::kTopP, 1.0f, 0.7f}};
  BlockSparseMask mask = PredictBlockMask(q, k, knobs, 16, 16);
  auto [ref_out, ref_lse] = MaskedDense(q, k, v, TokenMask(mask));
  EXPECT_LT((BlockSparseAttentionReference(q, k, v, mask).out - ref_out).abs().max().item<float>(),
            1e-5f);
  at::Tensor out_bf16 = BlockSparseAttentionReference(q.to(at::kBFloat16), k.to(at::kBFloat16),
                                                      v.to(at::kBFloat16), mask)
                            .out;
  EXPECT_EQ(out_bf16.scalar_type(), at::kBFloat16);
  EXPECT_LT((out_bf16.to(at::kFloat) - ref_out).abs().max().item<float>(), 5e-2f);
}

TEST(SparseAttentionTest, SelfAttentionMixesDenseAndSparseElements) {
  const int64_t L = 96, H = 2, D = 16;
  at::Tensor q = Randn({3, L, H, D}, 12), k = Randn({3, L, H, D}, 13), v = Randn({3, L, H, D}, 14);
  std::vector<AttentionKnobs> knobs = {{AttentionMode::kDense, 1.0f, 1.0f},
                                       {AttentionMode::kHybrid, 0.25f, 0.5f},
                                       {AttentionMode::kTopK, 0.25f, 1.0f}};
  at::Tensor sparsity_t;
  at::Tensor out = SelfAttention(q, k, v, knobs, 16, 16, &sparsity_t);
  EXPECT_EQ(sparsity_t.scalar_type(), at::kFloat);
  EXPECT_EQ(sparsity_t.device(), q.device());
  const std::vector<float> sparsity = Host(sparsity_t);
  ASSERT_EQ(sparsity.size(), 3u);
  EXPECT_EQ(sparsity[0], 0.0f);
  EXPECT_GT(sparsity[1], 0.0f);
  // TOPK with k = 0.25 of 6 key blocks keeps ceil(1.5) = 2 full blocks: 1/3 of
  // every row.
  EXPECT_NEAR(sparsity[2], 2.0f / 3.0f, 1e-6f);
  // Each element equals its own single-element computation.
  EXPECT_LT((out[0] - DenseAttention(q.slice(0, 0, 1), k.slice(0, 0, 1), v.slice(0, 0, 1))[0])
                .abs()
                .max()
                .item<float>(),
            1e-5f);
  for (int64_t b = 1; b < 3; ++b) {
    at::Tensor single;
    at::Tensor one = SelfAttention(q.slice(0, b, b + 1), k.slice(0, b, b + 1), v.slice(0, b, b + 1),
                                   {knobs[b]}, 16, 16, &single);
    EXPECT_LT((out[b] - one[0]).abs().max().item<float>(), 1e-6f) << b;
    EXPECT_EQ(Host(single), std::vector<float>{sparsity[b]});
  }
}

TEST(SparseAttentionTest, RegisteredBackendReceivesOnlySparseElements) {
  const int64_t L = 32, H = 1, D = 8;
  at::Tensor q = Randn({2, L, H, D}, 15), k = Randn({2, L, H, D}, 16), v = Randn({2, L, H, D}, 17);
  int calls = 0;
  int64_t seen_batch = -1;
  SparseAttentionBackend backend;
  backend.name = "test-backend";
  backend.supports = [](const at::Tensor&, int64_t, int64_t) { return true; };
  backend.run = [&](const at::Tensor& bq, const at::Tensor&, const at::Tensor&,
                    absl::Span<const AttentionKnobs> knobs, int64_t, int64_t,
                    at::Tensor* sparsity) {
    ++calls;
    seen_batch = bq.size(0);
    *sparsity = at::full({static_cast<int64_t>(knobs.size())}, 0.5f);
    return at::zeros_like(bq);
  };
  RegisterSparseAttentionBackend(c10::DeviceType::CPU, backend);
  EXPECT_EQ(SparseAttentionBackendName(c10::DeviceType::CPU), "test-backend");
  at::Tensor sparsity_t;
  at::Tensor out = SelfAttention(q, k, v,
                                 {AttentionKnobs{AttentionMode::kTopK, 0.5f, 1.0f},
                                  AttentionKnobs{AttentionMode::kDense, 1.0f, 1.0f}},
                                 16, 16, &sparsity_t);
  const std::vector<float> sparsity = Host(sparsity_t);
  ASSERT_EQ(sparsity.size(), 2u);
  UnregisterSparseAttentionBackend(c10::DeviceType::CPU);
  EXPECT_EQ(SparseAttentionBackendName(c10::DeviceType::CPU), "aten-reference");
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(seen_batch, 1);
  EXPECT_EQ(sparsity[0], 0.5f);
  EXPECT_EQ(sparsity[1], 0.0f);
  EXPECT_EQ(out[0].abs().max().item<float>(), 0.0f);
  EXPECT_GT(out[1].abs().max().item<float>(), 0.0f);
}

// Loads build/engine/ops/libsparge_ops.so (built by the default target) next to this binary's
// build tree; returns false if it is not there.
bool LoadSpargeOps() {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return false;
  std::string path(exe, n);
  path = path.substr(0, path.rfind('/'));  // .../tests/engine
  path = path.substr(0, path.rfind('/'));  // .../tests
  path = path.substr(0, path.rfind('/')) + "/engine/ops/libsparge_ops.so";
  return dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr;
}

// The engine/ops CPU implementation and this reference must pick the same blocks and agree on
// the output: the CUDA kernels are tested against the former, the engine runs on the latter.
TEST(SparseAttentionTest, SpargeOpsBackendAgreesWithReference) {
  if (!LoadSpargeOps()) GTEST_SKIP() << "libsparge_ops.so not built";
  SparseAttentionBackend backend = SpargeOpsBackend();
  const int64_t B = 2, L = 200, H = 2, D = 32;
  at::Tensor q = Randn({B, L, H, D}, 18), k = Randn({B, L, H, D}, 19), v = Randn({B, L, H, D}, 20);
  ASSERT_TRUE(backend.supports(q, 32, 16));
  std::vector<AttentionKnobs> knobs = {{AttentionMode::kHybrid, 0.2f, 0.6f},
                                       {AttentionMode::kTopK, 0.3f, 1.0f}};
  at::Tensor ops_sparsity_t;
  at::Tensor ops_out = backend.run(q, k, v, knobs, 32, 16, &ops_sparsity_t);
  const std::vector<float> ops_sparsity = Host(ops_sparsity_t);
  BlockSparseMask mask = PredictBlockMask(q, k, knobs, 32, 16);
  at::Tensor ref_out = BlockSparseAttentionReference(q, k, v, mask).out;
  std::vector<float> ref_sparsity = MaskSparsity(mask);
  ASSERT_EQ(ops_sparsity.size(), 2u);
  for (int b = 0; b < 2; ++b) EXPECT_FLOAT_EQ(ops_sparsity[b], ref_sparsity[b]) << b;
  EXPECT_LT((ops_out - ref_out).abs().max().item<float>(), 1e-5f);
}

// MaskSparsityTensor counts partial last blocks (query and key side) from the counts and each
// row's last kept block; checked against the token mask on hand-made masks.
TEST(SparseAttentionTest, MaskSparsityCountsPartialBlocks) {
  for (int64_t L : {10, 12}) {  // partial last blocks, then none
    BlockSparseMask mask;
    mask.seq_len = L;
    mask.block_q = 4;
    mask.block_k = 4;
    mask.num_q_blocks = mask.num_k_blocks = 3;
    mask.counts = at::tensor({2, 1, 1, 3, 2, 1}, at::kInt).view({1, 2, 3});
    mask.indices = at::tensor({0, 2, -1, 1, -1, -1, 2, -1, -1,    // head 0: {0, 2}, {1}, {2}
                               0, 1, 2, 0, 1, -1, 1, -1, -1},     // head 1: all, {0, 1}, {1}
                              at::kInt)
                       .view({1, 2, 3, 3});
    const double kept = TokenMask(mask).to(at::kDouble).mean().item<double>();
    const std::vector<float> s = MaskSparsity(mask);
    ASSERT_EQ(s.size(), 1u);
    EXPECT_NEAR(s[0], 1.0 - kept, 1e-7) << "L=" << L;
    at::Tensor t = MaskSparsityTensor(mask);
    EXPECT_EQ(t.scalar_type(), at::kFloat);
    EXPECT_EQ(t.sizes(), at::IntArrayRef({1}));
  }
}

TEST(SparseAttentionTest, CudaKernelMismatchNamesTheSettings) {
  EXPECT_EQ(CudaKernelMismatch("bfloat16", 128, 128, 128), "");
  EXPECT_EQ(CudaKernelMismatch("float16", 128, 64, 64), "");
  const std::string why = CudaKernelMismatch("float32", 64, 96, 16);
  for (const char* part : {"dtype float32", "block_q 64", "block_k 96", "head dim 16", "reference"})
    EXPECT_NE(why.find(part), std::string::npos) << part << " in: " << why;
  EXPECT_EQ(CudaKernelMismatch("bfloat16", 128, 128, 0), "");  // head dim unknown: not checked
  PipelineConfig config;  // cpu, float32, 64 x 64: the CPU defaults are not a CUDA mismatch
  EXPECT_EQ(CudaSparseKernelMismatch(config), "");
  config.device = "cuda:1";
  EXPECT_NE(CudaSparseKernelMismatch(config).find("dtype float32, block_q 64"), std::string::npos);
  config.dtype = "bfloat16";
  config.block_q = 128;
  config.block_k = 128;
  EXPECT_EQ(CudaSparseKernelMismatch(config), "");
}

TEST(SparseAttentionTest, ToDeviceAsyncLeavesHostTensorsOnTheHost) {
  at::Tensor t = at::tensor({1, 2, 3}, at::kInt);
  EXPECT_TRUE(ToDeviceAsync(t, c10::Device(c10::kCPU)).is_same(t));
}

#if defined(SPARGE_WITH_CUDA)
// On a GPU one layer's self-attention never waits for the device: knobs and index lists reach it
// through pinned memory and the achieved sparsity stays there (the dispatch used to copy the knobs
// and the whole [B, H, Nq, Nk] mask to the host in every layer). Torch's sync debug mode turns
// any such wait into an error.
TEST(SparseAttentionTest, CudaDispatchNeverWaitsOnTheDevice) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!LoadSpargeOps()) GTEST_SKIP() << "libsparge_ops.so not built";
  const int64_t L = 1000, H = 2, D = 64;
  const auto opt = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  at::Tensor q = Randn({3, L, H, D}, 21).to(opt), k = Randn({3, L, H, D}, 22).to(opt),
             v = Randn({3, L, H, D}, 23).to(opt);
  const std::vector<AttentionKnobs> knobs = {{AttentionMode::kHybrid, 0.2f, 0.6f},
                                             {AttentionMode::kDense, 1.0f, 1.0f},
                                             {AttentionMode::kTopK, 0.3f, 1.0f}};
  // Warm-up outside the check: the pinned-memory pool and the kernels' attributes.
  at::Tensor warm;
  const at::Tensor warm_out = SelfAttention(q, k, v, knobs, 128, 64, &warm);
  torch::cuda::synchronize();
  at::Tensor out, sparsity;
  std::string error;
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  try {
    for (int layer = 0; layer < 3; ++layer) out = SelfAttention(q, k, v, knobs, 128, 64, &sparsity);
  } catch (const c10::Error& e) {
    error = e.what();
  }
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  ASSERT_EQ(error, "");
  ASSERT_TRUE(sparsity.is_cuda());
  EXPECT_TRUE(at::equal(out, warm_out));
  // The values are the sparge ops' own for the sparse elements, 0 for the dense one.
  at::Tensor ops_sparsity;
  const at::Tensor ids = at::tensor({0, 2}, at::kLong).to(at::kCUDA);
  SpargeOpsBackend().run(q.index_select(0, ids), k.index_select(0, ids), v.index_select(0, ids),
                         {knobs[0], knobs[2]}, 128, 64, &ops_sparsity);
  const std::vector<float> got = Host(sparsity), ops = Host(ops_sparsity);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[0], ops[0]);
  EXPECT_EQ(got[1], 0.0f);
  EXPECT_EQ(got[2], ops[1]);
  EXPECT_GT(got[0], 0.2f);
  EXPECT_EQ(Host(warm), got);
}
#endif

}  // namespace
}  // namespace sparge::engine
