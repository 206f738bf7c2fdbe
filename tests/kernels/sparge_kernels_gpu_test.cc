// GPU tests of the SpargeAttention2 kernels (skip without a CUDA device; always compiled in CUDA
// builds): the CUDA mask predictor selects exactly the CPU op's blocks; forward and all three
// gradients match a float64 reference of the masked attention on poisoned, fully written outputs,
// for bf16/fp16, head dims 64/128, token- and head-major layouts, partial blocks, batch 3 mixing
// modes, and the Wan shapes (sampled reference rows); dense mode matches torch SDPA. The fused
// backward (default on 128-wide key blocks) is also compared with the split one
// (SPARGE_BWD_IMPL=split), and run to run (dK, dV bitwise; dQ to fp32 summation order).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "engine/ops/sparge_ops.h"
#include "kernels/sparge_kernels.h"
#include "tests/kernels/reference.h"

namespace sparge {
namespace {

using at::Tensor;
using ops::BlockMask;
namespace kn = sparge::kernels;

bool HaveGpu() { return at::hasCUDA() && at::cuda::device_count() > 0; }

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

kn::Tensor4 View(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

struct Outs {
  Tensor o, lse, dq, dk, dv;
};

// Runs the kernels directly on outputs pre-filled with NaN, so unwritten elements are caught.
// RAII setting of an environment variable the launchers read (nullptr: unset).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    if (value != nullptr) setenv(name, value, 1); else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_, old_.c_str(), 1); else unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

// bwd_impl: SPARGE_BWD_IMPL for the backward launch (nullptr: the default, fused where it applies).
Outs RunKernels(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const BlockMask& m,
                double scale, kn::FwdImpl impl = kn::FwdImpl::kWgmma, int tile_n = 0,
                bool pipelined = false, const char* bwd_impl = nullptr) {
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  Outs r;
  r.o = at::full({B, L, H, D}, NAN, q.options());
  r.lse = at::full({B, H, L}, NAN, q.options().dtype(at::kFloat));
  kn::FwdParams f;
  f.q = View(q);
  f.k = View(k);
  f.v = View(v);
  f.o = View(r.o);
  f.dtype = q.scalar_type() == at::kBFloat16 ? kn::DType::kBF16 : kn::DType::kFP16;
  f.batch = B;
  f.seqlen = L;
  f.heads = H;
  f.head_dim = D;
  f.block_q = m.block_q;
  f.block_k = m.block_k;
  f.scale = scale;
  f.counts = m.counts.data_ptr<int32_t>();
  f.indices = m.indices.data_ptr<int32_t>();
  f.lse = r.lse.data_ptr<float>();
  f.impl = impl;
  f.tile_n = tile_n;
  f.pipelined = pipelined;
  EXPECT_EQ(kn::CanImplementFwd(f), nullptr);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  EXPECT_EQ(kn::LaunchBlockSparseFwd(f, stream), cudaSuccess);
  if (g.defined()) {
    r.dq = at::full_like(q, NAN);
    r.dk = at::full_like(k, NAN);
    r.dv = at::full_like(v, NAN);
    Tensor delta = at::full({B, H, L}, NAN, r.lse.options());
    kn::BwdParams b;
    b.q = f.q;
    b.k = f.k;
    b.v = f.v;
    b.o = f.o;
    b.d_o = View(g);
    b.dq = View(r.dq);
    b.dk = View(r.dk);
    b.dv = View(r.dv);
    b.dtype = f.dtype;
    b.batch = B;
    b.seqlen = L;
    b.heads = H;
    b.head_dim = D;
    b.block_q = m.block_q;
    b.block_k = m.block_k;
    b.scale = scale;
    b.counts = f.counts;
    b.indices = f.indices;
    b.t_counts = m.t_counts.data_ptr<int32_t>();
    b.t_indices = m.t_indices.data_ptr<int32_t>();
    b.lse = f.lse;
    b.delta = delta.data_ptr<float>();
    b.impl = impl;
    EXPECT_EQ(kn::CanImplementBwd(b), nullptr);
    ScopedEnv env("SPARGE_BWD_IMPL", bwd_impl);
    EXPECT_EQ(kn::LaunchBlockSparseBwd(b, stream), cudaSuccess);
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return r;
}

bool AllFinite(const Tensor& t) { return at::isfinite(t).all().item<bool>(); }

// dQ, dK and dV against the float64 reference within 2.5 x tol, printed with a label.
void ExpectGradsNearReference(const Outs& r, const testing::DenseRef& ref, double tol, const std::string& what,
                              const char* label = "") {
  const double eq = testing::RelErr(r.dq, ref.dq), ek = testing::RelErr(r.dk, ref.dk),
               ev = testing::RelErr(r.dv, ref.dv);
  std::printf("%s%s: dq %.2e dk %.2e dv %.2e\n", label, what.c_str(), eq, ek, ev);
  EXPECT_LT(eq, 2.5 * tol) << what;
  EXPECT_LT(ek, 2.5 * tol) << what;
  EXPECT_LT(ev, 2.5 * tol) << what;
}

// Either mask may live on either device: both sides are compared on the CPU.
void ExpectMaskEqual(const BlockMask& a, const BlockMask& b, const std::string& what) {
  EXPECT_TRUE(a.counts.cpu().equal(b.counts.cpu())) << what << " counts";
  EXPECT_TRUE(a.indices.cpu().equal(b.indices.cpu())) << what << " indices";
  EXPECT_TRUE(a.t_counts.cpu().equal(b.t_counts.cpu())) << what << " t_counts";
  EXPECT_TRUE(a.t_indices.cpu().equal(b.t_indices.cpu())) << what << " t_indices";
}

struct Knobs {
  Tensor mode, topk, topp;
};
Knobs MixedKnobs(int64_t B) {
  std::vector<int> modes = {ops::kModeHybrid, ops::kModeTopK, ops::kModeTopP, ops::kModeDense};
  std::vector<float> tk = {0.05f, 0.2f, 0.1f, 0.f}, tp = {0.9f, 0.5f, 0.7f, 0.f};
  Knobs k;
  k.mode = at::tensor(std::vector<int>(modes.begin(), modes.begin() + B), at::kInt);
  k.topk = at::tensor(std::vector<float>(tk.begin(), tk.begin() + B));
  k.topp = at::tensor(std::vector<float>(tp.begin(), tp.begin() + B));
  return k;
}

TEST(SpargeKernelsGpu, MaskMatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  int cases = 0;
  for (int64_t D : {64, 128})
    for (int64_t bk : {64, 128})
      for (int64_t L : {1, 63, 127, 129, 1000, 5000}) {
        auto [q, k] = testing::StructuredQK(3, L, 3, D, at::kBFloat16, at::kCUDA, 1000 + L + D + bk);
        Knobs kb = MixedKnobs(3);
        BlockMask cm = ops::PredictBlockMask(q.cpu(), k.cpu(), kb.mode, kb.topk, kb.topp, 128, bk);
        BlockMask gm = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, bk);
        ExpectMaskEqual(gm, cm, "L=" + std::to_string(L) + " D=" + std::to_string(D) + " bk=" + std::to_string(bk));
        ++cases;
      }
  EXPECT_EQ(cases, 24);
  // Per-head topk with per-batch mode/topp (mixed knob shapes), knobs already on the GPU.
  auto [q, k] = testing::StructuredQK(2, 3000, 3, 128, at::kBFloat16, at::kCUDA, 99);
  Tensor mode = at::tensor({ops::kModeHybrid, ops::kModeTopK}, at::kInt);
  Tensor topk = at::tensor({0.02f, 0.1f, 0.3f, 0.05f, 0.5f, 0.01f}).view({2, 3});
  Tensor topp = at::tensor({0.8f, 0.1f});
  BlockMask gm = ops::PredictBlockMask(q, k, mode.cuda(), topk.cuda(), topp.cuda(), 128, 64);
  BlockMask cm = ops::PredictBlockMask(q.cpu(), k.cpu(), mode, topk, topp, 128, 64);
  ExpectMaskEqual(gm, cm, "per-head knobs");
}

// Exact ties on both sides, where only the tie rule (lower key block first) and the top-p count
// over tied probabilities decide: (a) K the same vector at every token, so every centred pooled
// block is 0 and the row is uniform; (b) Q = e0 and K = g(block) * e0 with g in {0, 1, 2}, so the
// key blocks fall into three groups of bit-identical probabilities. Also rows of 313 and 2500 key
// blocks (the register-resident and the spilling selection paths).
// The inference mask (transposed = false: no bitmap, memset or transpose launch) has the same
// counts and LUT as the full one, and an empty transposed part.
TEST(SpargeKernelsGpu, InferenceMaskEqualsFullMask) {
  SKIP_WITHOUT_GPU();
  for (int64_t bk : {64, 128}) {
    auto [q, k] = testing::StructuredQK(3, 2000, 4, 128, at::kBFloat16, at::kCUDA, 17 + bk);
    Knobs kb = MixedKnobs(3);
    BlockMask full = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, bk);
    BlockMask inf = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, bk, false);
    EXPECT_TRUE(inf.counts.equal(full.counts)) << bk;
    EXPECT_TRUE(inf.indices.equal(full.indices)) << bk;
    EXPECT_EQ(inf.t_counts.numel(), 0) << bk;
    EXPECT_EQ(inf.t_indices.numel(), 0) << bk;
  }
}

TEST(SpargeKernelsGpu, MaskMatchesCpuReferenceOnTiesAndWideRows) {
  SKIP_WITHOUT_GPU();
  const int64_t B = 4, H = 2;
  Knobs kb = MixedKnobs(B);
  // Top-p values away from multiples of the tied probabilities, top-k fractions giving partial groups.
  kb.topk = at::tensor({0.07f, 0.33f, 0.f, 0.f});
  kb.topp = at::tensor({0.55f, 0.f, 0.41f, 0.f});
  int cases = 0;
  for (int64_t D : {64, 128})
    for (int64_t bk : {16, 64})
      for (int64_t L : {1000, 5000}) {
        const auto opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
        const std::string what = "D=" + std::to_string(D) + " bk=" + std::to_string(bk) + " L=" + std::to_string(L);
        {  // (a) uniform rows
          auto [q, k0] = testing::StructuredQK(B, L, H, D, at::kBFloat16, at::kCUDA, 31 + L + D + bk);
          Tensor k = k0.select(1, 0).unsqueeze(1).expand({B, L, H, D}).contiguous();
          BlockMask gm = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, bk);
          BlockMask cm = ops::PredictBlockMask(q.cpu(), k.cpu(), kb.mode, kb.topk, kb.topp, 128, bk);
          ExpectMaskEqual(gm, cm, what + " uniform");
          // All probabilities tie, so top-k keeps the lowest-index blocks.
          const int n = cm.counts[1][0][0].item<int>();
          EXPECT_TRUE(cm.indices[1][0][0].slice(0, 0, n).equal(at::arange(n, at::kInt))) << what;
        }
        {  // (b) three tied groups
          Tensor q = at::zeros({B, L, H, D}, opts), k = at::zeros({B, L, H, D}, opts);
          q.select(3, 0).fill_(1.0);
          Tensor blk = at::floor_divide(at::arange(L, at::TensorOptions().dtype(at::kLong).device(at::kCUDA)), bk);
          Tensor g = at::remainder(blk * 7, 3);
          k.select(3, 0).copy_(g.to(at::kBFloat16).view({1, L, 1}).expand({B, L, H}));
          BlockMask gm = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, bk);
          BlockMask cm = ops::PredictBlockMask(q.cpu(), k.cpu(), kb.mode, kb.topk, kb.topp, 128, bk);
          ExpectMaskEqual(gm, cm, what + " grouped");
        }
        ++cases;
      }
  EXPECT_EQ(cases, 8);
  {  // 2500 key blocks: 79 keys per lane, past the register-resident sizes.
    const int64_t L = 40000, bk = 16;
    auto [q, k] = testing::StructuredQK(1, L, 1, 64, at::kBFloat16, at::kCUDA, 2500);
    Knobs k1 = MixedKnobs(1);
    BlockMask gm = ops::PredictBlockMask(q, k, k1.mode, k1.topk, k1.topp, 128, bk);
    BlockMask cm = ops::PredictBlockMask(q.cpu(), k.cpu(), k1.mode, k1.topk, k1.topp, 128, bk);
    ExpectMaskEqual(gm, cm, "nk=2500");
  }
}

void CheckSmall(at::ScalarType dtype, int64_t D, int64_t L, int64_t bk, bool head_major) {
  const int64_t B = 3, H = 2;
  auto [q, k] = testing::StructuredQK(B, L, H, D, dtype, at::kCUDA, 77 + L + D);
  Tensor v = at::randn({B, L, H, D}, q.options());
  Tensor g = at::randn({B, L, H, D}, q.options());
  if (head_major) {
    q = q.transpose(1, 2).contiguous().transpose(1, 2);
    k = k.transpose(1, 2).contiguous().transpose(1, 2);
    v = v.transpose(1, 2).contiguous().transpose(1, 2);
    g = g.transpose(1, 2).contiguous().transpose(1, 2);
  }
  Knobs kb = MixedKnobs(B);
  BlockMask m = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, bk);
  const double scale = 1.0 / std::sqrt(double(D));
  Outs r = RunKernels(q, k, v, g, m, scale);
  auto ref = testing::DenseMaskedReference(q, k, v, g, m.counts, m.indices, 128, bk, scale);
  const std::string what = std::string(dtype == at::kBFloat16 ? "bf16" : "fp16") + " D=" +
                           std::to_string(D) + " L=" + std::to_string(L) + " bk=" +
                           std::to_string(bk) + (head_major ? " head-major" : " token-major");
  ASSERT_TRUE(AllFinite(r.o) && AllFinite(r.lse) && AllFinite(r.dq) && AllFinite(r.dk) && AllFinite(r.dv))
      << what;
  const double tol = dtype == at::kBFloat16 ? 1e-2 : 2e-3;
  const double eo = testing::RelErr(r.o, ref.o), el = testing::RelErr(r.lse, ref.lse),
               eq = testing::RelErr(r.dq, ref.dq), ek = testing::RelErr(r.dk, ref.dk),
               ev = testing::RelErr(r.dv, ref.dv);
  std::printf("%s: o %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", what.c_str(), eo, el, eq, ek, ev);
  EXPECT_LT(eo, tol) << what;
  EXPECT_LT(el, 1e-4) << what;
  EXPECT_LT(eq, 2.5 * tol) << what;
  EXPECT_LT(ek, 2.5 * tol) << what;
  EXPECT_LT(ev, 2.5 * tol) << what;
  // The portable mma.sync kernels compute the same function.
  Outs rm = RunKernels(q, k, v, g, m, scale, kn::FwdImpl::kMmaSync);
  ASSERT_TRUE(AllFinite(rm.o) && AllFinite(rm.lse) && AllFinite(rm.dq) && AllFinite(rm.dk) && AllFinite(rm.dv)) << what;
  EXPECT_LT(testing::RelErr(rm.o, ref.o), tol) << what << " (mma.sync)";
  EXPECT_LT(testing::RelErr(rm.lse, ref.lse), 1e-4) << what << " (mma.sync)";
  EXPECT_LT(testing::RelErr(rm.dq, ref.dq), 2.5 * tol) << what << " (mma.sync)";
  EXPECT_LT(testing::RelErr(rm.dk, ref.dk), 2.5 * tol) << what << " (mma.sync)";
  EXPECT_LT(testing::RelErr(rm.dv, ref.dv), 2.5 * tol) << what << " (mma.sync)";
  if (bk % 128 == 0) {  // the other wgmma forward variants on 128-wide blocks
    for (int tile : {64, 128}) {  // 128 here = the cp.async kernel (pipelined flag), 64 = TMA
      Outs rt = RunKernels(q, k, v, Tensor(), m, scale, kn::FwdImpl::kWgmma, tile, tile == 128);
      ASSERT_TRUE(AllFinite(rt.o) && AllFinite(rt.lse)) << what << " tile " << tile;
      EXPECT_LT(testing::RelErr(rt.o, ref.o), tol) << what << " (wgmma tile " << tile << ")";
      EXPECT_LT(testing::RelErr(rt.lse, ref.lse), 1e-4) << what << " (wgmma tile " << tile << ")";
    }
  }
  if (bk % 128 == 0) {
    // Beside the fused default (v10): the split (deterministic, two-kernel) backward, which rounds
    // fp32 sums of the same products once (differences are rounding only), and the v9 fused
    // kernel kept for A/B, whose GEMMs run in the same order (dK, dV bit for bit).
    for (const char* impl : {"split", "v9"}) {
      const std::string tag = what + " (" + impl + " bwd)";
      Outs rs = RunKernels(q, k, v, g, m, scale, kn::FwdImpl::kWgmma, 0, false, impl);
      ASSERT_TRUE(AllFinite(rs.dq) && AllFinite(rs.dk) && AllFinite(rs.dv)) << tag;
      EXPECT_LT(testing::RelErr(rs.dq, ref.dq), 2.5 * tol) << tag;
      EXPECT_LT(testing::RelErr(rs.dk, ref.dk), 2.5 * tol) << tag;
      EXPECT_LT(testing::RelErr(rs.dv, ref.dv), 2.5 * tol) << tag;
      const bool v9 = std::string(impl) == "v9";
      EXPECT_LT(testing::RelErr(r.dq, rs.dq), v9 ? 1e-3 : 1e-2) << tag << " vs default";
      if (v9) {
        EXPECT_TRUE(r.dk.equal(rs.dk) && r.dv.equal(rs.dv)) << tag << " vs default dK/dV";
      } else {
        EXPECT_LT(testing::RelErr(r.dk, rs.dk), 1e-2) << tag << " vs default";
        EXPECT_LT(testing::RelErr(r.dv, rs.dv), 1e-2) << tag << " vs default";
      }
    }
  }
  // The autograd op gives the same numbers as the raw kernels (the wiring is right). dQ of the
  // fused backward sums fp32 partials in a varying order (bulk reductions), so it may differ in
  // the last bit of a few elements; dK, dV and O are deterministic.
  Tensor qg = q.detach().clone().set_requires_grad(true), kg = k.detach().clone().set_requires_grad(true),
         vg = v.detach().clone().set_requires_grad(true);
  auto [o2, lse2] = ops::BlockSparseAttention(qg, kg, vg, m, 0.0);
  o2.backward(g);
  EXPECT_TRUE(o2.equal(r.o)) << what;
  EXPECT_TRUE(kg.grad().equal(r.dk) && vg.grad().equal(r.dv)) << what;
  EXPECT_LT(testing::RelErr(qg.grad(), r.dq), 1e-3) << what;
}

TEST(SpargeKernelsGpu, ForwardBackwardSmallBf16) {
  SKIP_WITHOUT_GPU();
  for (int64_t D : {64, 128})
    for (int64_t L : {1, 127, 129, 1000})
      for (int64_t bk : {64, 128}) CheckSmall(at::kBFloat16, D, L, bk, (L + bk) % 2 == 1);
}

TEST(SpargeKernelsGpu, ForwardBackwardSmallFp16) {
  SKIP_WITHOUT_GPU();
  for (int64_t D : {64, 128}) {
    for (int64_t L : {128, 333}) CheckSmall(at::kHalf, D, L, 64, L == 333);
    // 128-wide key blocks: the fused backward (v10 default, v9 and split compared in CheckSmall).
    CheckSmall(at::kHalf, D, 333, 128, D == 64);
  }
}

// Small case for compute-sanitizer (memcheck, racecheck): partial blocks, both head dims.
TEST(SpargeKernelsGpu, SanitizerCase) {
  SKIP_WITHOUT_GPU();
  CheckSmall(at::kBFloat16, 128, 200, 128, false);
  CheckSmall(at::kHalf, 64, 129, 64, true);
}

TEST(SpargeKernelsGpu, DenseModeEqualsSdpa) {
  SKIP_WITHOUT_GPU();
  const int64_t B = 2, L = 2000, H = 4, D = 128;
  auto [q, k] = testing::StructuredQK(B, L, H, D, at::kBFloat16, at::kCUDA, 9);
  Tensor v = at::randn_like(q), g = at::randn_like(q);
  BlockMask m = ops::PredictBlockMask(q, k, at::tensor({ops::kModeDense}, at::kInt), at::tensor({0.f}),
                                      at::tensor({0.f}), 128, 64);
  EXPECT_TRUE((m.counts.cpu() == (L + 63) / 64).all().item<bool>());
  Outs r = RunKernels(q, k, v, g, m, 1.0 / std::sqrt(double(D)));
  Tensor qh = q.transpose(1, 2).detach().set_requires_grad(true);
  Tensor kh = k.transpose(1, 2).detach().set_requires_grad(true);
  Tensor vh = v.transpose(1, 2).detach().set_requires_grad(true);
  Tensor o = at::scaled_dot_product_attention(qh, kh, vh);
  o.backward(g.transpose(1, 2));
  const double eo = testing::RelErr(r.o, o.transpose(1, 2)), eq = testing::RelErr(r.dq, qh.grad().transpose(1, 2)),
               ek = testing::RelErr(r.dk, kh.grad().transpose(1, 2)), ev = testing::RelErr(r.dv, vh.grad().transpose(1, 2));
  std::printf("dense vs SDPA: o %.2e dq %.2e dk %.2e dv %.2e\n", eo, eq, ek, ev);
  EXPECT_LT(eo, 1e-2);
  EXPECT_LT(eq, 2e-2);
  EXPECT_LT(ek, 2e-2);
  EXPECT_LT(ev, 2e-2);
}

// Wan shapes: full outputs finite and written; forward, lse and dQ checked on sampled query blocks,
// dK and dV on sampled key blocks (summing every query block that keeps them), in float64.
// bk = 128 runs the fused backward (the default there) and also compares it with the split one.
// Backward schedule variant "<chunk>[s]": SPARGE_BWD_CHUNK=<chunk>, and SPARGE_BWD_SORT=1 with
// the "s", =0 without; nullptr: both 0 (chunking off, the bitwise-reproducible order); "default":
// both unset (the launcher's defaults, chunks of 32 with the sort).
struct ScopedBwdSchedule {
  static bool IsDefault(const char* spec) { return spec != nullptr && std::string(spec) == "default"; }
  // The number alone: the launcher rejects (and reports) values with trailing characters.
  static std::string Digits(const char* spec) {
    if (spec == nullptr) return "0";
    const std::string s(spec);
    return s.substr(0, s.find_first_not_of("0123456789"));
  }
  static const char* Sort(const char* spec) {
    if (IsDefault(spec)) return nullptr;
    return spec != nullptr && std::string(spec).find('s') != std::string::npos ? "1" : "0";
  }
  explicit ScopedBwdSchedule(const char* spec)
      : chunk_value(Digits(spec)),
        chunk("SPARGE_BWD_CHUNK", IsDefault(spec) ? nullptr : chunk_value.c_str()),
        sort("SPARGE_BWD_SORT", Sort(spec)) {}
  std::string chunk_value;
  ScopedEnv chunk, sort;
};

// bwd_chunk: backward schedule variant (ScopedBwdSchedule); with chunking, dK/dV of chunked key
// tiles add fp32 partials in a varying order, so run to run they agree to rounding.
void CheckLarge(int64_t L, int64_t H, int64_t mask_heads, int64_t bk = 64, const char* bwd_chunk = nullptr) {
  ScopedBwdSchedule schedule(bwd_chunk);
  const int64_t B = 1, D = 128;
  auto [q, k] = testing::StructuredQK(B, L, H, D, at::kBFloat16, at::kCUDA, 4242 + L);
  Tensor v = at::randn_like(q), g = at::randn_like(q);
  Tensor mode = at::tensor({ops::kModeHybrid}, at::kInt), topk = at::tensor({0.03f}), topp = at::tensor({0.5f});
  BlockMask m = ops::PredictBlockMask(q, k, mode, topk, topp, 128, bk);
  {  // CUDA vs CPU mask on the first mask_heads heads (heads are independent).
    Tensor qs = q.slice(2, 0, mask_heads), ks = k.slice(2, 0, mask_heads);
    BlockMask cm = ops::PredictBlockMask(qs.cpu(), ks.cpu(), mode, topk, topp, 128, bk);
    BlockMask gs{m.counts.slice(1, 0, mask_heads), m.indices.slice(1, 0, mask_heads),
                 m.t_counts.slice(1, 0, mask_heads), m.t_indices.slice(1, 0, mask_heads), 128, bk};
    ExpectMaskEqual(gs, cm, "L=" + std::to_string(L));
  }
  const double sparsity = ops::AchievedSparsity(m, L);
  std::printf("L=%ld H=%ld achieved sparsity %.4f\n", long(L), long(H), sparsity);
  EXPECT_GT(sparsity, 0.5);
  const double scale = 1.0 / std::sqrt(double(D));
  Outs r = RunKernels(q, k, v, g, m, scale);
  ASSERT_TRUE(AllFinite(r.o) && AllFinite(r.lse) && AllFinite(r.dq) && AllFinite(r.dk) && AllFinite(r.dv));
  if (bk % 128 == 0) {
    Outs rs = RunKernels(q, k, v, g, m, scale, kn::FwdImpl::kWgmma, 0, false, "split");
    const double eq = testing::RelErr(r.dq, rs.dq), ek = testing::RelErr(r.dk, rs.dk),
                 ev = testing::RelErr(r.dv, rs.dv);
    std::printf("fused vs split backward: dq %.2e dk %.2e dv %.2e\n", eq, ek, ev);
    EXPECT_LT(eq, 1e-2);
    EXPECT_LT(ek, 1e-2);
    EXPECT_LT(ev, 1e-2);
    Outs r2 = RunKernels(q, k, v, g, m, scale);  // run to run: dK, dV bitwise, dQ to rounding
    if (bwd_chunk == nullptr) {
      EXPECT_TRUE(r2.dk.equal(r.dk) && r2.dv.equal(r.dv));
    } else {
      EXPECT_LT(testing::RelErr(r2.dk, r.dk), 1e-3);
      EXPECT_LT(testing::RelErr(r2.dv, r.dv), 1e-3);
    }
    EXPECT_LT(testing::RelErr(r2.dq, r.dq), 1e-3);
  }
  Tensor counts = m.counts.cpu(), indices = m.indices.cpu(), tcounts = m.t_counts.cpu(), tind = m.t_indices.cpu();
  const int64_t nq = (L + 127) / 128, nk = (L + bk - 1) / bk;
  std::vector<int64_t> heads = {0, H / 2, H - 1};
  std::vector<int64_t> qblocks = {0, nq / 3, nq - 1};
  std::vector<int64_t> kblocks = {0, nk / 2, nk - 1};
  for (int64_t h : heads) {
    for (int64_t i : qblocks) {
      auto ref = testing::QueryBlockReference(q, k, v, g, counts, indices, 0, h, i, 128, bk, scale);
      const int64_t r0 = i * 128, r1 = std::min(L, r0 + 128);
      const double eo = testing::RelErr(r.o[0].select(1, h).slice(0, r0, r1), ref.o);
      const double el = testing::RelErr(r.lse[0][h].slice(0, r0, r1), ref.lse);
      const double eq = testing::RelErr(r.dq[0].select(1, h).slice(0, r0, r1), ref.dq);
      std::printf("  h=%ld qblock=%ld kept=%d: o %.2e lse %.2e dq %.2e\n", long(h), long(i),
                  counts[0][h][i].item<int>(), eo, el, eq);
      EXPECT_LT(eo, 1e-2);
      EXPECT_LT(el, 1e-4);
      EXPECT_LT(eq, 2.5e-2);
    }
    for (int64_t j : kblocks) {
      const int64_t c0 = j * bk, c1 = std::min(L, c0 + bk);
      Tensor dk = at::zeros({c1 - c0, D}, q.options().dtype(at::kDouble));
      Tensor dv = at::zeros_like(dk);
      const int tc = tcounts[0][h][j].item<int>();
      for (int t = 0; t < tc; ++t) {
        const int64_t i = tind[0][h][j][t].item<int>();
        auto ref = testing::QueryBlockReference(q, k, v, g, counts, indices, 0, h, i, 128, bk, scale);
        Tensor sel = (ref.keys >= c0) & (ref.keys < c1);
        dk += ref.dk.index({sel});
        dv += ref.dv.index({sel});
      }
      const double ek = testing::RelErr(r.dk[0].select(1, h).slice(0, c0, c1), dk);
      const double ev = testing::RelErr(r.dv[0].select(1, h).slice(0, c0, c1), dv);
      std::printf("  h=%ld kblock=%ld kept by %d: dk %.2e dv %.2e\n", long(h), long(j), tc, ek, ev);
      if (tc > 0) {
        EXPECT_LT(ek, 2.5e-2);
        EXPECT_LT(ev, 2.5e-2);
      } else {
        EXPECT_EQ(r.dk[0].select(1, h).slice(0, c0, c1).abs().max().item<float>(), 0.f);
      }
    }
  }
}

TEST(SpargeKernelsGpu, Wan13BShape) {
  SKIP_WITHOUT_GPU();
  CheckLarge(32760, 12, 12);
}

TEST(SpargeKernelsGpu, Wan14BShape) {
  SKIP_WITHOUT_GPU();
  CheckLarge(75600, 40, 4);
}

// The fused backward (128-wide key blocks) at the Wan-1.3B shape: sampled float64 references,
// the split backward, and run-to-run agreement.
TEST(SpargeKernelsGpu, FusedBackwardWan13BShape) {
  SKIP_WITHOUT_GPU();
  CheckLarge(32760, 12, 1, 128);
}

// The same with the default schedule (SPARGE_BWD_CHUNK and SPARGE_BWD_SORT unset: heavy key
// tiles chunked by 32 query blocks, each head's entries sorted by median query block, v12): the
// sampled key blocks include block 0, the benchmark masks' sink, which every query block keeps.
TEST(SpargeKernelsGpu, FusedBackwardChunkedWan13BShape) {
  SKIP_WITHOUT_GPU();
  CheckLarge(32760, 12, 1, 128, "default");
}

// Launch variants that must not change results: the launches the backward's defaults replaced: SPARGE_BWD_SCHED_STREAM=0 (the schedule kernels on the caller's stream instead of a
// side stream under the prep kernel), SPARGE_BWD_PREP_DELTA=0 (DeltaKernel before the prep kernel
// instead of delta inside it, same summation order) and SPARGE_BWD_ONE_CONVERT=0 (the dK/dV chunk
// and dQ converts as two launches): mask, O and LSE bitwise the default's, dK and dV too with chunking off
// (a fixed order), dQ to the accumulator's addition order; with the default (chunked) schedule,
// dK/dV to rounding as well.
TEST(SpargeKernelsGpu, LaunchVariantsGiveTheSameResults) {
  SKIP_WITHOUT_GPU();
  const std::pair<at::ScalarType, int64_t> cases[] = {{at::kBFloat16, 128}, {at::kHalf, 64}};
  const std::pair<const char*, const char*> variants[] = {
      {"SPARGE_BWD_SCHED_STREAM", "0"}, {"SPARGE_BWD_PREP_DELTA", "0"},
      {"SPARGE_BWD_ONE_CONVERT", "0"}};
  for (const auto& [variant, value] : variants)
    for (const char* schedule : {static_cast<const char*>(nullptr), "default"})
      for (const auto& [dtype, D] : cases) {
        const int64_t B = 2, L = 5000, H = 5;
        auto [q, k] = testing::StructuredQK(B, L, H, D, dtype, at::kCUDA, 77 + D);
        Tensor v = at::randn_like(q), g = at::randn_like(q);
        Knobs kb = MixedKnobs(B);
        ScopedBwdSchedule order(schedule);
        const double scale = 1.0 / std::sqrt(double(D));
        BlockMask m0 = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, 128);
        Outs r0 = RunKernels(q, k, v, g, m0, scale);
        ScopedEnv on(variant, value);
        BlockMask m1 = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, 128);
        const std::string what = std::string(variant) + "=" + value + " D=" + std::to_string(D) +
                                 " schedule=" + (schedule ? schedule : "unchunked");
        ExpectMaskEqual(m1, m0, what);
        Outs r1 = RunKernels(q, k, v, g, m1, scale);
        EXPECT_TRUE(r1.o.equal(r0.o) && r1.lse.equal(r0.lse)) << what;
        if (schedule == nullptr) {
          EXPECT_TRUE(r1.dk.equal(r0.dk) && r1.dv.equal(r0.dv)) << what;
        } else {
          EXPECT_LT(testing::RelErr(r1.dk, r0.dk), 1e-3) << what;
          EXPECT_LT(testing::RelErr(r1.dv, r0.dv), 1e-3) << what;
        }
        EXPECT_LT(testing::RelErr(r1.dq, r0.dq), 1e-3) << what;
      }
}

// Block mask from a keep matrix [B, H, Nq, Nk] (bool, CPU): ascending LUTs padded with -1, both ways.
BlockMask MaskFromKeep(const Tensor& keep, int64_t bq, int64_t bk) {
  auto lut = [](const Tensor& kp) {  // [..., N] bool -> counts [...], indices [..., N]
    const int64_t n = kp.size(-1);
    Tensor pos = at::arange(n, at::kInt).expand_as(kp);
    Tensor key = at::where(kp, pos, at::full({}, int(n), at::kInt));
    Tensor idx = std::get<0>(key.sort(-1));
    idx = at::where(idx == n, at::full({}, -1, at::kInt), idx).to(at::kInt).contiguous();
    return std::make_pair(kp.sum(-1).to(at::kInt).contiguous(), idx);
  };
  auto [c, i] = lut(keep);
  auto [tc, ti] = lut(keep.transpose(2, 3).contiguous());
  return BlockMask{c.cuda(), i.cuda(), tc.cuda(), ti.cuda(), bq, bk};
}

// Chunked heavy key tiles (and sorted schedules, "s") against the float64 reference, with more
// candidates than slots (chunks of 4: 66 sink tiles, items / 8 + B * H = 30 slots; the rest go
// whole, first), more chunks than list entries (of 1: 32 chunks per sink tile, 3 * items = 576
// extra entries fit 18 tiles) and chunks as long as the sequence (of 32 = all query blocks: the
// launcher turns chunking off): per head `sinks` key blocks and the partial last one kept by
// every query block (its chunks' dK/dV rows past L are not written), a random 6% and the
// diagonal, the block before the last kept by none (dK = dV = 0 there).
// "4scd": chunks of 4 and the sort with the launches the defaults replaced (DeltaKernel before the
// prep kernel, two converts).
// (SanitizerCaseChunked: L = 2000, two sinks per head, chunks of one block and the sort (also with
// "cd"), whose
// 366 list entries leave 174 before the 192-entry tail; no float64 reference: small enough for
// racecheck.)
void CheckChunkedHeavyTiles(at::ScalarType dtype, int64_t D, int64_t L = 4000, int sinks = 10,
                            std::vector<const char*> chunks = {nullptr, "4", "4s", "4sg", "4scd", "1s", "32s", "default"},
                            bool reference = true) {
  const int64_t B = 2, H = 3, nb = (L + 127) / 128;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(31 + D);
  Tensor keep = at::rand({B, H, nb, nb}, gen) < 0.06;
  keep.logical_or_(at::eye(nb, at::kBool).expand({B, H, nb, nb}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < sinks; ++j) keep[b][h].select(1, (3 * j + b + h) % (nb - 2)).fill_(true);
  keep.select(3, nb - 1).fill_(true);   // the partial last key block: a sink too
  keep.select(3, nb - 2).fill_(false);  // every query block still keeps its sink blocks
  BlockMask m = MaskFromKeep(keep, 128, 128);
  auto opts = at::TensorOptions().dtype(dtype).device(at::kCUDA);
  Tensor q = at::randn({B, L, H, D}, opts), k = at::randn({B, L, H, D}, opts), v = at::randn({B, L, H, D}, opts),
         g = at::randn({B, L, H, D}, opts);
  const double scale = 1.0 / std::sqrt(double(D));
  testing::DenseRef ref;
  if (reference) ref = testing::DenseMaskedReference(q, k, v, g, m.counts, m.indices, 128, 128, scale);
  const double tol = dtype == at::kBFloat16 ? 1e-2 : 2e-3;
  Outs off;
  if (chunks.front() != nullptr) chunks.insert(chunks.begin(), nullptr);  // the unchunked run first
  for (const char* chunk_spec : chunks) {
    // Letters after the chunk number: "s" the sort (ScopedBwdSchedule); "g" the chunk schedule
    // reads the counts from global memory instead of shared (the path for lists too long for
    // shared memory); "c" the dK/dV chunk and dQ converts as two launches (SPARGE_BWD_ONE_CONVERT=0);
    // "d" delta by DeltaKernel before the prep kernel (SPARGE_BWD_PREP_DELTA=0).
    std::string spec = chunk_spec ? chunk_spec : "";
    const bool is_default = spec == "default";
    auto take = [&](char c) {
      const size_t at = is_default ? std::string::npos : spec.find(c);
      if (at != std::string::npos) spec.erase(at, 1);
      return at != std::string::npos;
    };
    const bool global_counts = take('g'), two_converts = take('c'), delta_kernel = take('d');
    const char* chunk = chunk_spec ? spec.c_str() : nullptr;
    ScopedEnv counts("SPARGE_BWD_SCHED_COUNTS", global_counts ? "global" : nullptr);
    ScopedEnv convert("SPARGE_BWD_ONE_CONVERT", two_converts ? "0" : nullptr);
    ScopedEnv prep("SPARGE_BWD_PREP_DELTA", delta_kernel ? "0" : nullptr);
    ScopedBwdSchedule schedule(chunk);
    Outs r = RunKernels(q, k, v, g, m, scale);
    const std::string what = std::string(dtype == at::kBFloat16 ? "bf16" : "fp16") + " D=" + std::to_string(D) +
                             " chunk=" + (chunk_spec ? chunk_spec : "off");
    ASSERT_TRUE(AllFinite(r.dq) && AllFinite(r.dk) && AllFinite(r.dv)) << what;
    if (reference) ExpectGradsNearReference(r, ref, tol, what, "chunked heavy tiles ");
    EXPECT_EQ(r.dk.slice(1, (nb - 2) * 128, (nb - 1) * 128).abs().max().item<float>(), 0.f) << what;
    EXPECT_EQ(r.dv.slice(1, (nb - 2) * 128, (nb - 1) * 128).abs().max().item<float>(), 0.f) << what;
    if (chunk == nullptr) {
      off = r;
    } else {
      EXPECT_LT(testing::RelErr(r.dk, off.dk), 1e-3) << what << " vs off";
      EXPECT_LT(testing::RelErr(r.dv, off.dv), 1e-3) << what << " vs off";
      EXPECT_LT(testing::RelErr(r.dq, off.dq), 1e-3) << what << " vs off";
    }
  }
}

TEST(SpargeKernelsGpu, ChunkedHeavyKeyTiles) {
  SKIP_WITHOUT_GPU();
  CheckChunkedHeavyTiles(at::kBFloat16, 128);
  CheckChunkedHeavyTiles(at::kHalf, 64);
}

TEST(SpargeKernelsGpu, SanitizerCaseChunked) {
  SKIP_WITHOUT_GPU();
  CheckChunkedHeavyTiles(at::kBFloat16, 128, 2000, 2, {"1s", "1scd"}, false);
}

// The fused backward on poisoned outputs with rows and heads that keep nothing: a query block that
// keeps no key block (its dQ rows are the converted zeros of an untouched accumulator), a head of
// the second batch element that keeps nothing at all (dQ = dK = dV = 0), the partial last key
// block kept by every other query block, 128- and 256-wide key blocks (a kept 256-wide block is
// two 128-key work items, the partial last one a single item), both head dims, chunked and whole
// schedules, and three calls in a row whose length grows and shrinks again (workspace reuse).
// Against the float64 reference (reference = false: only the zeros and finiteness, small enough
// for the sanitizers). Carried over from the removed per-head dQ conversion's test
// (kernels/NOTES.md, "Thirteenth session"), where it covered the same cases.
void CheckEmptyRowsAndWideBlocks(at::ScalarType dtype, int64_t D, int64_t bk, const char* schedule, bool reference) {
  const int64_t B = 2, H = 3;
  const double scale = 1.0 / std::sqrt(double(D));
  const double tol = dtype == at::kBFloat16 ? 1e-2 : 2e-3;
  ScopedBwdSchedule order(schedule);
  for (const int64_t L : {1000, 2333, 1000}) {
    const int64_t nq = (L + 127) / 128, nk = (L + bk - 1) / bk;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(11 + D + bk + L);
    Tensor keep = at::rand({B, H, nq, nk}, gen) < 0.3;
    keep.select(3, nk - 1).fill_(true);  // the partial last key block, kept by every query block
    keep.select(2, 1).fill_(false);      // but query block 1, which keeps nothing
    keep[1][2].fill_(false);             // and head 2 of batch element 1 keeps nothing at all
    auto opts = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    Tensor q = at::randn({B, L, H, D}, opts), k = at::randn({B, L, H, D}, opts),
           v = at::randn({B, L, H, D}, opts), g = at::randn({B, L, H, D}, opts);
    const BlockMask m = MaskFromKeep(keep, 128, bk);
    const Outs r = RunKernels(q, k, v, g, m, scale);
    const std::string what = std::string(dtype == at::kBFloat16 ? "bf16" : "fp16") + " D=" + std::to_string(D) +
                             " bk=" + std::to_string(bk) + " L=" + std::to_string(L) +
                             " schedule=" + (schedule ? schedule : "unchunked");
    ASSERT_TRUE(AllFinite(r.dq) && AllFinite(r.dk) && AllFinite(r.dv)) << what;
    EXPECT_EQ(r.dq.slice(1, 128, 256).abs().max().item<float>(), 0.f) << what << " (empty query block)";
    for (const Tensor& t : {r.dq, r.dk, r.dv})
      EXPECT_EQ(t[1].select(1, 2).abs().max().item<float>(), 0.f) << what << " (empty head)";
    if (reference)
      ExpectGradsNearReference(r, testing::DenseMaskedReference(q, k, v, g, m.counts, m.indices, 128, bk, scale),
                               tol, what);
  }
}

TEST(SpargeKernelsGpu, FusedBackwardEmptyRowsAndWideBlocks) {
  SKIP_WITHOUT_GPU();
  CheckEmptyRowsAndWideBlocks(at::kBFloat16, 128, 128, nullptr, true);
  CheckEmptyRowsAndWideBlocks(at::kBFloat16, 128, 256, "default", true);
  CheckEmptyRowsAndWideBlocks(at::kHalf, 64, 128, "default", true);
  CheckEmptyRowsAndWideBlocks(at::kHalf, 64, 256, nullptr, true);
}

TEST(SpargeKernelsGpu, SanitizerCaseEmptyRows) {
  SKIP_WITHOUT_GPU();
  CheckEmptyRowsAndWideBlocks(at::kBFloat16, 128, 256, "default", false);
  CheckEmptyRowsAndWideBlocks(at::kHalf, 64, 128, nullptr, false);
}

// The warp-specialised TMA forward (the default) against the float64 reference: 128- and
// 64-key tiles (64-key tiles also on 128-wide blocks, whose last sub-tile can lie past L), both
// layouts, partial blocks, batch 3 mixing modes, poisoned outputs.
void CheckWarpSpecialized(at::ScalarType dtype, int64_t D, int64_t L, int64_t bk, bool head_major) {
  const int64_t B = 3, H = 2;
  auto [q, k] = testing::StructuredQK(B, L, H, D, dtype, at::kCUDA, 505 + L + D);
  Tensor v = at::randn({B, L, H, D}, q.options());
  if (head_major) {
    q = q.transpose(1, 2).contiguous().transpose(1, 2);
    k = k.transpose(1, 2).contiguous().transpose(1, 2);
    v = v.transpose(1, 2).contiguous().transpose(1, 2);
  }
  Knobs kb = MixedKnobs(B);
  BlockMask m = ops::PredictBlockMask(q, k, kb.mode, kb.topk, kb.topp, 128, bk);
  const double scale = 1.0 / std::sqrt(double(D));
  auto ref = testing::DenseMaskedReference(q, k, v, Tensor(), m.counts, m.indices, 128, bk, scale);
  const double tol = dtype == at::kBFloat16 ? 1e-2 : 2e-3;
  for (int tile : {0, 64}) {
    if (tile == 64 && bk == 64) continue;  // tile 0 already means 64 keys there
    Outs r = RunKernels(q, k, v, Tensor(), m, scale, kn::FwdImpl::kWgmma, tile);
    const std::string what = std::string(dtype == at::kBFloat16 ? "bf16" : "fp16") + " D=" +
                             std::to_string(D) + " L=" + std::to_string(L) + " bk=" + std::to_string(bk) +
                             " tile=" + std::to_string(tile) + (head_major ? " head-major" : " token-major");
    ASSERT_TRUE(AllFinite(r.o) && AllFinite(r.lse)) << what;
    const double eo = testing::RelErr(r.o, ref.o), el = testing::RelErr(r.lse, ref.lse);
    std::printf("ws %s: o %.2e lse %.2e\n", what.c_str(), eo, el);
    EXPECT_LT(eo, tol) << what;
    EXPECT_LT(el, 1e-4) << what;
  }
}

TEST(SpargeKernelsGpu, WarpSpecializedForwardSmall) {
  SKIP_WITHOUT_GPU();
  for (int64_t D : {64, 128})
    for (int64_t L : {1, 127, 129, 1000})
      for (int64_t bk : {64, 128}) CheckWarpSpecialized(at::kBFloat16, D, L, bk, (L + bk) % 2 == 1);
  CheckWarpSpecialized(at::kHalf, 64, 333, 64, true);
  CheckWarpSpecialized(at::kHalf, 128, 128, 128, false);
}

// Query blocks that keep nothing: zero rows and -inf LSE; the other rows equal the cp.async kernel's.
TEST(SpargeKernelsGpu, WarpSpecializedEmptyRows) {
  SKIP_WITHOUT_GPU();
  const int64_t B = 1, L = 700, H = 2, D = 128, bk = 128;
  auto [q, k] = testing::StructuredQK(B, L, H, D, at::kBFloat16, at::kCUDA, 31);
  Tensor v = at::randn_like(q);
  BlockMask m = ops::PredictBlockMask(q, k, at::tensor({ops::kModeTopK}, at::kInt), at::tensor({0.3f}),
                                      at::tensor({0.f}), 128, bk);
  m.counts = m.counts.clone();
  m.counts[0][1][0] = 0;  // head 1, query block 0
  m.counts[0][0][5] = 0;  // head 0, the partial last query block
  const double scale = 1.0 / std::sqrt(double(D));
  Outs ws = RunKernels(q, k, v, Tensor(), m, scale);
  Outs base = RunKernels(q, k, v, Tensor(), m, scale, kn::FwdImpl::kWgmma, 0, /*pipelined=*/true);
  ASSERT_TRUE(AllFinite(ws.o));
  EXPECT_EQ(ws.o[0].select(1, 1).slice(0, 0, 128).abs().max().item<float>(), 0.f);
  EXPECT_EQ(ws.o[0].select(1, 0).slice(0, 640, L).abs().max().item<float>(), 0.f);
  EXPECT_TRUE(at::isneginf(ws.lse[0][1].slice(0, 0, 128)).all().item<bool>());
  EXPECT_TRUE(at::isneginf(ws.lse[0][0].slice(0, 640, L)).all().item<bool>());
  EXPECT_LT(testing::RelErr(ws.o, base.o), 1e-3);
  Tensor fin = at::isfinite(base.lse);
  EXPECT_TRUE(fin.equal(at::isfinite(ws.lse)));
  EXPECT_LT(testing::RelErr(ws.lse.masked_select(fin), base.lse.masked_select(fin)), 1e-6);
}

// Wan-1.3B shape (hybrid mask at ~95%, 128- and 64-wide key blocks) and dense mode: the
// warp-specialised kernel matches the cp.async wgmma kernel everywhere and the float64 reference
// on sampled query blocks; dense mode matches SDPA.
TEST(SpargeKernelsGpu, WarpSpecializedWanShape) {
  SKIP_WITHOUT_GPU();
  const int64_t B = 1, L = 32760, H = 12, D = 128;
  auto [q, k] = testing::StructuredQK(B, L, H, D, at::kBFloat16, at::kCUDA, 4242 + L);
  Tensor v = at::randn_like(q);
  const double scale = 1.0 / std::sqrt(double(D));
  for (int64_t bk : {128, 64}) {
    BlockMask m = ops::PredictBlockMask(q, k, at::tensor({ops::kModeHybrid}, at::kInt), at::tensor({0.05f}),
                                        at::tensor({0.3f}), 128, bk);
    Outs ws = RunKernels(q, k, v, Tensor(), m, scale);
    Outs base = RunKernels(q, k, v, Tensor(), m, scale, kn::FwdImpl::kWgmma, 0, /*pipelined=*/true);
    ASSERT_TRUE(AllFinite(ws.o) && AllFinite(ws.lse)) << "bk=" << bk;
    const double eo = testing::RelErr(ws.o, base.o), el = testing::RelErr(ws.lse, base.lse);
    std::printf("ws Wan-1.3B bk=%ld sparsity %.4f: vs cp.async kernel o %.2e lse %.2e\n", long(bk),
                ops::AchievedSparsity(m, L), eo, el);
    EXPECT_LT(eo, 1e-3);
    EXPECT_LT(el, 1e-6);
    Tensor counts = m.counts.cpu(), indices = m.indices.cpu();
    const int64_t nq = (L + 127) / 128;
    for (int64_t h : {int64_t{0}, H - 1})
      for (int64_t i : {int64_t{0}, nq / 2, nq - 1}) {
        auto ref = testing::QueryBlockReference(q, k, v, Tensor(), counts, indices, 0, h, i, 128, bk, scale);
        const int64_t r0 = i * 128, r1 = std::min(L, r0 + 128);
        EXPECT_LT(testing::RelErr(ws.o[0].select(1, h).slice(0, r0, r1), ref.o), 1e-2) << h << " " << i;
        EXPECT_LT(testing::RelErr(ws.lse[0][h].slice(0, r0, r1), ref.lse), 1e-4) << h << " " << i;
      }
  }
  const int64_t Ld = 2000;
  Tensor qd = q.slice(1, 0, Ld).slice(2, 0, 4).contiguous(), kd = k.slice(1, 0, Ld).slice(2, 0, 4).contiguous(),
         vd = v.slice(1, 0, Ld).slice(2, 0, 4).contiguous();
  BlockMask md = ops::PredictBlockMask(qd, kd, at::tensor({ops::kModeDense}, at::kInt), at::tensor({0.f}),
                                       at::tensor({0.f}), 128, 128);
  Outs wd = RunKernels(qd, kd, vd, Tensor(), md, scale);
  Tensor od = at::scaled_dot_product_attention(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2));
  const double ed = testing::RelErr(wd.o, od.transpose(1, 2));
  std::printf("ws dense vs SDPA: o %.2e\n", ed);
  EXPECT_LT(ed, 1e-2);
}

// Small warp-specialised cases for compute-sanitizer (memcheck, racecheck).
TEST(SpargeKernelsGpu, SanitizerCaseWs) {
  SKIP_WITHOUT_GPU();
  CheckWarpSpecialized(at::kBFloat16, 128, 200, 128, false);
  CheckWarpSpecialized(at::kHalf, 64, 129, 64, true);
}

}  // namespace
}  // namespace sparge
