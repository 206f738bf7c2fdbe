// CUDA implementations of the sparge ops: argument checks, output allocation on Torch's caching
// allocator and current stream, then the framework-free launchers of kernels/.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

#include "engine/ops/sparge_ops.h"
#include "engine/ops/sparge_ops_internal.h"
#include "kernels/sparge_kernels.h"

namespace sparge::ops {
namespace {

using at::Tensor;
namespace k = sparge::kernels;

// Kernels need unit stride over D, 8-element-aligned strides and 16-byte-aligned data; anything
// else is copied to a contiguous tensor first.
Tensor Prep(const Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

k::Tensor4 View(const Tensor& t) {
  return k::Tensor4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

k::DType KernelDType(const Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "CUDA sparge ops take bfloat16 or float16, got ", q.scalar_type());
  return q.scalar_type() == at::kBFloat16 ? k::DType::kBF16 : k::DType::kFP16;
}

void CheckSame(const Tensor& a, const Tensor& b, const char* name) {
  TORCH_CHECK(b.sizes() == a.sizes(), name, " must have shape ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), name, " must have dtype ", a.scalar_type());
  TORCH_CHECK(b.device() == a.device(), name, " must be on ", a.device());
}

Tensor OnDevice(const Tensor& t, const Tensor& like) { return t.to(like.device()).contiguous(); }

// A [B] or [B, H] knob as a [B, H] view on q's device with dtype (stride 0 where broadcast).
Tensor KnobView(const Tensor& t, int64_t B, int64_t H, at::ScalarType dtype, const Tensor& q,
                const char* name) {
  Tensor x = t.to(q.device(), dtype);
  if (x.dim() == 0) x = x.view({1});
  if (x.dim() == 1) {
    TORCH_CHECK(x.size(0) == B || x.size(0) == 1, name, " must have B=", B, " entries, got ", x.size(0));
    x = x.view({-1, 1});
  }
  TORCH_CHECK(x.dim() == 2 && (x.size(0) == B || x.size(0) == 1) && (x.size(1) == H || x.size(1) == 1),
              name, " must be [B] or [B, H], got ", t.sizes());
  if (!x.is_contiguous()) x = x.contiguous();
  return x.expand({B, H});
}

void Check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> PredictBlockMaskCuda(const Tensor& q_in, const Tensor& k_in,
                                                                const Tensor& mode, const Tensor& topk,
                                                                const Tensor& topp, int64_t block_q,
                                                                int64_t block_k, bool transposed) {
  internal::CheckQkv(q_in, "q");
  CheckSame(q_in, k_in, "k");
  c10::cuda::CUDAGuard guard(q_in.device());
  Tensor q = Prep(q_in), kk = Prep(k_in);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t nq = (L + block_q - 1) / block_q, nk = (L + block_k - 1) / block_k;
  // Knobs stay [B] or [B, H] views on the device (broadcast through strides, no copies).
  Tensor m = KnobView(mode, B, H, at::kInt, q, "mode");
  Tensor tk = KnobView(topk, B, H, at::kFloat, q, "topk");
  Tensor tp = KnobView(topp, B, H, at::kFloat, q, "topp");
  if (m.strides() != tk.strides() || m.strides() != tp.strides()) {  // mixed [B] / [B, H]
    m = m.contiguous();
    tk = tk.contiguous();
    tp = tp.contiguous();
  }
  // Range checks read the (small) knob tensors on the host only when they live there already.
  if (!mode.is_cuda() && !topk.is_cuda() && !topp.is_cuda()) {
    internal::CheckKnobs(internal::ExpandKnob(mode, B, H, at::kInt, "mode"),
                         internal::ExpandKnob(topk, B, H, at::kFloat, "topk"),
                         internal::ExpandKnob(topp, B, H, at::kFloat, "topp"));
  }
  auto iopt = q.options().dtype(at::kInt);
  Tensor counts = at::empty({B, H, nq}, iopt), indices = at::empty({B, H, nq, nk}, iopt);
  Tensor t_counts, t_indices;
  if (transposed) {
    t_counts = at::empty({B, H, nk}, iopt);
    t_indices = at::empty({B, H, nk, nq}, iopt);
  } else {
    std::tie(t_counts, t_indices) = internal::NoTransposedMask(B, H, q.options());
  }
  k::MaskParams p;
  p.q = View(q);
  p.k = View(kk);
  p.dtype = KernelDType(q);
  p.batch = B;
  p.seqlen = L;
  p.heads = H;
  p.head_dim = D;
  p.block_q = block_q;
  p.block_k = block_k;
  p.knob_stride_b = m.stride(0);
  p.knob_stride_h = m.stride(1);
  p.mode = m.data_ptr<int32_t>();
  p.topk = tk.data_ptr<float>();
  p.topp = tp.data_ptr<float>();
  p.counts = counts.data_ptr<int32_t>();
  p.indices = indices.data_ptr<int32_t>();
  // Without the transposed mask the kernels skip its bitmap, memset and transpose launch.
  p.t_counts = transposed ? t_counts.data_ptr<int32_t>() : nullptr;
  p.t_indices = transposed ? t_indices.data_ptr<int32_t>() : nullptr;
  Tensor ws = at::empty({static_cast<int64_t>(k::MaskWorkspaceBytes(p)) + 256}, q.options().dtype(at::kByte));
  p.workspace = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data_ptr()) + 255) / 256 * 256);
  if (const char* why = k::CanImplementMask(p)) TORCH_CHECK(false, "predict_block_mask: ", why);
  Check(k::LaunchMaskPredictor(p, at::cuda::getCurrentCUDAStream()), "predict_block_mask");
  return {counts, indices, t_counts, t_indices};
}

std::tuple<Tensor, Tensor> AttentionFwdCuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                            const Tensor& counts_in, const Tensor& indices_in,
                                            int64_t block_q, int64_t block_k, double scale) {
  internal::CheckQkv(q_in, "q");
  CheckSame(q_in, k_in, "k");
  CheckSame(q_in, v_in, "v");
  c10::cuda::CUDAGuard guard(q_in.device());
  Tensor q = Prep(q_in), kk = Prep(k_in), v = Prep(v_in);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t nq = (L + block_q - 1) / block_q, nk = (L + block_k - 1) / block_k;
  internal::CheckMask(counts_in, indices_in, B, H, nq, nk);
  Tensor counts = OnDevice(counts_in, q), indices = OnDevice(indices_in, q);
  Tensor o = at::empty({B, L, H, D}, q.options());
  Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  k::FwdParams p;
  p.q = View(q);
  p.k = View(kk);
  p.v = View(v);
  p.o = View(o);
  p.dtype = KernelDType(q);
  p.batch = B;
  p.seqlen = L;
  p.heads = H;
  p.head_dim = D;
  p.block_q = block_q;
  p.block_k = block_k;
  p.scale = static_cast<float>(scale > 0 ? scale : 1.0 / std::sqrt(double(D)));
  p.counts = counts.data_ptr<int32_t>();
  p.indices = indices.data_ptr<int32_t>();
  p.lse = lse.data_ptr<float>();
  // SPARGE_FWD_IMPL=mma selects the portable mma.sync kernel (benchmarks, A/B checks).
  const char* impl_env = std::getenv("SPARGE_FWD_IMPL");
  const bool use_mma = impl_env != nullptr && std::string(impl_env) == "mma";
  p.impl = use_mma ? k::FwdImpl::kMmaSync : k::FwdImpl::kWgmma;
  // SPARGE_FWD_TILE=64 and SPARGE_FWD_PIPELINED=1 select other wgmma variants (benchmarks).
  const char* tile_env = std::getenv("SPARGE_FWD_TILE");
  p.tile_n = tile_env != nullptr ? std::atoi(tile_env) : 0;
  const char* pipe_env = std::getenv("SPARGE_FWD_PIPELINED");
  p.pipelined = pipe_env != nullptr && std::string(pipe_env) == "1";
  if (const char* why = k::CanImplementFwd(p)) TORCH_CHECK(false, "block_sparse_attention_fwd: ", why);
  Check(k::LaunchBlockSparseFwd(p, at::cuda::getCurrentCUDAStream()), "block_sparse_attention_fwd");
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> AttentionBwdCuda(
    const Tensor& g_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& o_in, const Tensor& lse_in, const Tensor& counts_in, const Tensor& indices_in,
    const Tensor& t_counts_in, const Tensor& t_indices_in, int64_t block_q, int64_t block_k,
    double scale) {
  internal::CheckQkv(q_in, "q");
  CheckSame(q_in, k_in, "k");
  CheckSame(q_in, v_in, "v");
  CheckSame(q_in, o_in, "o");
  CheckSame(q_in, g_in, "grad_o");
  c10::cuda::CUDAGuard guard(q_in.device());
  Tensor q = Prep(q_in), kk = Prep(k_in), v = Prep(v_in), o = Prep(o_in), g = Prep(g_in);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t nq = (L + block_q - 1) / block_q, nk = (L + block_k - 1) / block_k;
  internal::CheckMask(counts_in, indices_in, B, H, nq, nk);
  internal::CheckTransposedMask(t_counts_in);
  internal::CheckMask(t_counts_in, t_indices_in, B, H, nk, nq);
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, L}), "lse must be [B, H, L]");
  Tensor lse = lse_in.to(at::kFloat).contiguous();
  Tensor counts = OnDevice(counts_in, q), indices = OnDevice(indices_in, q);
  Tensor t_counts = OnDevice(t_counts_in, q), t_indices = OnDevice(t_indices_in, q);
  Tensor dq = at::empty({B, L, H, D}, q.options()), dk = at::empty({B, L, H, D}, q.options()),
         dv = at::empty({B, L, H, D}, q.options());
  Tensor delta = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  k::BwdParams p;
  p.q = View(q);
  p.k = View(kk);
  p.v = View(v);
  p.o = View(o);
  p.d_o = View(g);
  p.dq = View(dq);
  p.dk = View(dk);
  p.dv = View(dv);
  p.dtype = KernelDType(q);
  p.batch = B;
  p.seqlen = L;
  p.heads = H;
  p.head_dim = D;
  p.block_q = block_q;
  p.block_k = block_k;
  p.scale = static_cast<float>(scale > 0 ? scale : 1.0 / std::sqrt(double(D)));
  p.counts = counts.data_ptr<int32_t>();
  p.indices = indices.data_ptr<int32_t>();
  p.t_counts = t_counts.data_ptr<int32_t>();
  p.t_indices = t_indices.data_ptr<int32_t>();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  const char* impl_env = std::getenv("SPARGE_FWD_IMPL");
  p.impl = impl_env != nullptr && std::string(impl_env) == "mma" ? k::FwdImpl::kMmaSync
                                                                 : k::FwdImpl::kWgmma;
  if (const char* why = k::CanImplementBwd(p)) TORCH_CHECK(false, "block_sparse_attention_bwd: ", why);
  Check(k::LaunchBlockSparseBwd(p, at::cuda::getCurrentCUDAStream()), "block_sparse_attention_bwd");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace sparge::ops

TORCH_LIBRARY_IMPL(sparge, CUDA, m) {
  m.impl("predict_block_mask", &sparge::ops::PredictBlockMaskCuda);
  m.impl("block_sparse_attention_fwd", &sparge::ops::AttentionFwdCuda);
  m.impl("block_sparse_attention_bwd", &sparge::ops::AttentionBwdCuda);
}
