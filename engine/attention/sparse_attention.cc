#include "engine/attention/sparse_attention.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "engine/attention/block_selection.h"

namespace sparge::engine {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void CheckTokenMajor(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "attention expects [B, L, H, D], got q of rank ", q.dim());
  TORCH_CHECK(k.sizes() == q.sizes(), "k shape ", k.sizes(), " != q shape ", q.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "v shape ", v.sizes(), " != q shape ", q.sizes());
}

// Real token count of each of num_blocks blocks of size block over seq_len
// tokens.
std::vector<int64_t> BlockTokenCounts(int64_t seq_len, int64_t block, int64_t num_blocks) {
  std::vector<int64_t> counts(num_blocks, block);
  counts.back() = seq_len - (num_blocks - 1) * block;
  return counts;
}

// [B, H, L, D] fp32 -> [B, H, N, block, D], zero-padding the last block.
at::Tensor SplitBlocks(const at::Tensor& x, int64_t block, int64_t num_blocks) {
  const int64_t pad = num_blocks * block - x.size(2);
  at::Tensor padded = pad > 0 ? at::constant_pad_nd(x, {0, 0, 0, pad}, 0.0) : x;
  return padded.reshape({x.size(0), x.size(1), num_blocks, block, x.size(3)});
}

// Mean of each block over its real tokens: [B, H, L, D] -> [B, H, N, D].
at::Tensor PoolBlocks(const at::Tensor& x, int64_t block, int64_t num_blocks) {
  const std::vector<int64_t> counts = BlockTokenCounts(x.size(2), block, num_blocks);
  at::Tensor divisor =
      at::tensor(std::vector<float>(counts.begin(), counts.end()), x.options()).view({-1, 1});
  return SplitBlocks(x, block, num_blocks).sum(3) / divisor;
}

std::mutex& BackendMutex() {
  static std::mutex* const mu = new std::mutex;
  return *mu;
}

std::map<c10::DeviceType, SparseAttentionBackend>& Backends() {
  static auto* const backends = new std::map<c10::DeviceType, SparseAttentionBackend>;
  return *backends;
}

bool FindBackend(c10::DeviceType device_type, SparseAttentionBackend* backend) {
  std::lock_guard<std::mutex> lock(BackendMutex());
  auto it = Backends().find(device_type);
  if (it == Backends().end()) return false;
  *backend = it->second;
  return true;
}

// The "sparge" ops when their library is loaded and has a kernel for this device.
struct SpargeOps {
  c10::OperatorHandle predict;
  c10::OperatorHandle forward;
  // The autograd op (forward + backward kernels), for training; absent in an old library.
  std::optional<c10::OperatorHandle> trainable;
};

std::optional<SpargeOps> FindSpargeOps(c10::DeviceType device_type) {
  auto& dispatcher = c10::Dispatcher::singleton();
  std::optional<c10::OperatorHandle> predict =
      dispatcher.findSchema({"sparge::predict_block_mask", ""});
  std::optional<c10::OperatorHandle> forward =
      dispatcher.findSchema({"sparge::block_sparse_attention_fwd", ""});
  if (!predict.has_value() || !forward.has_value()) return std::nullopt;
  const c10::DispatchKey key =
      c10::computeDispatchKey(std::nullopt, std::nullopt, c10::Device(device_type));
  if (!predict->hasKernelForDispatchKey(key) || !forward->hasKernelForDispatchKey(key)) {
    return std::nullopt;
  }
  return SpargeOps{*predict, *forward,
                   dispatcher.findSchema({"sparge::block_sparse_attention", ""})};
}

}  // namespace

SparseAttentionBackend SpargeOpsBackend() {
  SparseAttentionBackend backend;
  backend.name = "sparge-ops";
  backend.supports = [](const at::Tensor& q, int64_t block_q, int64_t block_k) {
    if (!FindSpargeOps(q.device().type()).has_value()) return false;
    if (q.is_cpu()) return true;  // the ops' CPU path is ATen, any dtype
    // The CUDA kernels' limits (kernels/README.md; CudaKernelMismatch is the one statement of
    // them); anything else takes the ATen reference path on the same device instead of failing.
    const std::string dtype = q.scalar_type() == at::kBFloat16 ? "bfloat16"
                              : q.scalar_type() == at::kHalf   ? "float16"
                                                               : "other";
    return CudaKernelMismatch(dtype, block_q, block_k, q.size(3)).empty();
  };
  backend.run = [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   absl::Span<const AttentionKnobs> knobs, int64_t block_q, int64_t block_k,
                   at::Tensor* sparsity) {
    std::optional<SpargeOps> ops = FindSpargeOps(q.device().type());
    TORCH_CHECK(ops.has_value(), "sparge ops are not loaded for ", q.device());
    // The ops number modes like sparge.v1.AttentionMode: DENSE = 1 ... HYBRID = 4.
    std::vector<int32_t> mode;
    std::vector<float> topk, topp;
    for (const AttentionKnobs& kb : knobs) {
      mode.push_back(static_cast<int32_t>(kb.mode) + 1);
      topk.push_back(kb.topk);
      topp.push_back(kb.topp);
    }
    auto predict = ops->predict.typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t, int64_t, bool)>();
    auto forward = ops->forward.typed<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t, int64_t, double)>();
    const bool needs_grad =
        at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
    // The mask is stop-gradient (SPARSE_ATTENTION.md section 3): predicted from detached q, k.
    // Knobs travel without a host wait (a pageable copy would block once per layer). Inference
    // skips the transposed mask, which only the backward pass reads.
    auto [counts, indices, t_counts, t_indices] = predict.call(
        q.detach(), k.detach(), ToDeviceAsync(at::tensor(mode, at::kInt), q.device()),
        ToDeviceAsync(at::tensor(topk, at::kFloat), q.device()),
        ToDeviceAsync(at::tensor(topp, at::kFloat), q.device()), block_q, block_k, needs_grad);
    at::Tensor out;
    if (needs_grad) {
      TORCH_CHECK(ops->trainable.has_value(),
                  "the loaded sparge op library has no sparge::block_sparse_attention (autograd)");
      auto trainable = ops->trainable->typed<std::tuple<at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double)>();
      out = std::get<0>(
          trainable.call(q, k, v, counts, indices, t_counts, t_indices, block_q, block_k, 0.0));
    } else {
      out = std::get<0>(forward.call(q, k, v, counts, indices, block_q, block_k, 0.0));
    }
    BlockSparseMask mask;
    mask.seq_len = q.size(1);
    mask.block_q = block_q;
    mask.block_k = block_k;
    mask.num_q_blocks = counts.size(2);
    mask.num_k_blocks = indices.size(3);
    mask.counts = counts;
    mask.indices = indices;
    *sparsity = MaskSparsityTensor(mask);
    return out;
  };
  return backend;
}

BlockSparseMask PredictBlockMask(const at::Tensor& q, const at::Tensor& k,
                                 absl::Span<const AttentionKnobs> knobs, int64_t block_q,
                                 int64_t block_k) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes(), "q, k must be [B, L, H, D] alike");
  TORCH_CHECK(block_q > 0 && block_k > 0, "block sizes must be positive");
  at::NoGradGuard no_grad;  // the mask is stop-gradient
  const int64_t batch = q.size(0), seq_len = q.size(1), heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(seq_len > 0, "empty sequence");
  TORCH_CHECK(static_cast<int64_t>(knobs.size()) == batch, "need one knob set per batch element (",
              batch, "), got ", knobs.size());

  BlockSparseMask mask;
  mask.seq_len = seq_len;
  mask.block_q = block_q;
  mask.block_k = block_k;
  mask.num_q_blocks = CeilDiv(seq_len, block_q);
  mask.num_k_blocks = CeilDiv(seq_len, block_k);
  const int64_t nq = mask.num_q_blocks, nk = mask.num_k_blocks;

  at::Tensor qf = q.to(at::kFloat).permute({0, 2, 1, 3});  // [B, H, L, D]
  at::Tensor kf = k.to(at::kFloat).permute({0, 2, 1, 3});
  // Softmax over keys is invariant to subtracting one vector from every key;
  // removing the mean stops a shared bias from drowning the pooled block
  // scores.
  kf = kf - kf.mean({2}, /*keepdim=*/true);
  at::Tensor pooled_q = PoolBlocks(qf, block_q, nq);
  at::Tensor pooled_k = PoolBlocks(kf, block_k, nk);
  at::Tensor scores =
      at::matmul(pooled_q, pooled_k.transpose(-1, -2)) / std::sqrt(static_cast<double>(head_dim));
  at::Tensor probs = at::softmax(scores, -1).to(at::kCPU).contiguous();  // [B, H, Nq, Nk]

  mask.counts = at::empty({batch, heads, nq}, at::TensorOptions().dtype(at::kInt));
  mask.indices = at::full({batch, heads, nq, nk}, -1, at::TensorOptions().dtype(at::kInt));
  const float* p = probs.data_ptr<float>();
  int32_t* counts = mask.counts.data_ptr<int32_t>();
  int32_t* indices = mask.indices.data_ptr<int32_t>();
  std::vector<int32_t> scratch(nk);
  for (int64_t b = 0; b < batch; ++b) {
    const AttentionKnobs& kb = knobs[b];
    for (int64_t row = b * heads * nq; row < (b + 1) * heads * nq; ++row) {
      counts[row] =
          SelectKeyBlocks(absl::MakeConstSpan(p + row * nk, nk), kb.mode, kb.topk, kb.topp,
                          absl::MakeSpan(scratch), absl::MakeSpan(indices + row * nk, nk));
    }
  }
  return mask;
}

at::Tensor MaskSparsityTensor(const BlockSparseMask& mask) {
  const int64_t heads = mask.counts.size(1);
  const int64_t L = mask.seq_len, bq = mask.block_q, bk = mask.block_k;
  const int64_t nq = mask.num_q_blocks, nk = mask.num_k_blocks;
  TORCH_CHECK(mask.counts.dim() == 3 && mask.counts.size(2) == nq, "mask counts must be [B, H, ",
              nq, "], got ", mask.counts.sizes());
  TORCH_CHECK(mask.indices.dim() == 4 && mask.indices.size(3) == nk,
              "mask indices must be [B, H, Nq, ", nk, "], got ", mask.indices.sizes());
  at::NoGradGuard no_grad;
  const auto dopt = mask.counts.options().dtype(at::kDouble);
  at::Tensor counts = mask.counts.to(at::kLong);  // [B, H, Nq]
  // Every kept key block holds bk tokens except the partial last one (indices ascending: it can
  // only be a row's last kept entry).
  at::Tensor kept_keys = (counts * bk).to(at::kDouble);
  const int64_t tail = nk * bk - L;
  if (tail > 0) {
    // One element per row (int32 source, int64 index): the [B, H, Nq, Nk] LUT is not copied.
    at::Tensor last = mask.indices.gather(3, (counts - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1);
    kept_keys = kept_keys - ((counts > 0) & (last == nk - 1)).to(at::kDouble) * tail;
  }
  // Real tokens of each query block: bq, except the last.
  at::Tensor q_tokens = (L - at::arange(nq, dopt) * bq).clamp_max(bq);
  at::Tensor kept = (kept_keys * q_tokens).sum({1, 2});  // [B] token pairs over heads
  const double total = static_cast<double>(L) * L * heads;
  return (1.0 - kept / total).to(at::kFloat);
}

std::vector<float> MaskSparsity(const BlockSparseMask& mask) {
  at::Tensor s = MaskSparsityTensor(mask).to(at::kCPU).contiguous();
  return std::vector<float>(s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
}

at::Tensor ToDeviceAsync(const at::Tensor& host, c10::Device device) {
  TORCH_CHECK(host.is_cpu(), "ToDeviceAsync takes a host tensor");
  if (device.is_cpu()) return host;
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

AttentionOutput BlockSparseAttentionReference(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const BlockSparseMask& mask) {
  CheckTokenMajor(q, k, v);
  const int64_t batch = q.size(0), seq_len = q.size(1), heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(mask.seq_len == seq_len, "mask built for L=", mask.seq_len,
              ", inputs have L=", seq_len);
  TORCH_CHECK(mask.counts.size(0) == batch && mask.counts.size(1) == heads,
              "mask batch/heads do not match the inputs");
  const int64_t bq = mask.block_q, bk = mask.block_k;
  const int64_t nq = mask.num_q_blocks, nk = mask.num_k_blocks;
  const auto device = q.device();

  at::Tensor counts = mask.counts.to(device, at::kLong);  // [B, H, Nq]
  const int64_t max_kept = counts.max().item<int64_t>();
  at::Tensor slots = mask.indices.to(device, at::kLong).narrow(3, 0, max_kept);  // [B,H,Nq,S]
  at::Tensor slot_used =
      at::arange(max_kept, counts.options()).view({1, 1, 1, -1}) < counts.unsqueeze(-1);
  at::Tensor block_ids = slots.clamp_min(0);

  at::Tensor qb = SplitBlocks(q.to(at::kFloat).permute({0, 2, 1, 3}), bq,
                              nq);  // [B,H,Nq,BQ,D]
  at::Tensor kb = SplitBlocks(k.to(at::kFloat).permute({0, 2, 1, 3}), bk,
                              nk);  // [B,H,Nk,BK,D]
  at::Tensor vb = SplitBlocks(v.to(at::kFloat).permute({0, 2, 1, 3}), bk, nk);

  // Gather each query block's kept key/value blocks as whole rows of a [B*H*Nk,
  // BK*D] table: [B, H, Nq, S * BK, D].
  at::Tensor bh = at::arange(batch * heads, counts.options()).view({batch, heads, 1, 1});
  at::Tensor rows = (bh * nk + block_ids).reshape({-1});
  at::Tensor k_kept = kb.reshape({batch * heads * nk, bk * head_dim})
                          .index_select(0, rows)
                          .view({batch, heads, nq, max_kept * bk, head_dim});
  at::Tensor v_kept = vb.reshape({batch * heads * nk, bk * head_dim})
                          .index_select(0, rows)
                          .view({batch, heads, nq, max_kept * bk, head_dim});

  // A key is visible if its slot holds a kept block and it is a real token (not
  // block padding); invisible keys get a -inf bias, added in the same pass as
  // the scores.
  at::Tensor key_pos = block_ids.unsqueeze(-1) * bk + at::arange(bk, counts.options());
  at::Tensor visible = (key_pos < seq_len).logical_and(slot_used.unsqueeze(-1));
  at::Tensor bias =
      at::zeros(visible.sizes(), qb.options())
          .masked_fill_(visible.logical_not(), -std::numeric_limits<float>::infinity())
          .reshape({batch, heads, nq, 1, max_kept * bk});

  at::Tensor scores = at::matmul(qb * (1.0 / std::sqrt(static_cast<double>(head_dim))),
                                 k_kept.transpose(-1, -2));  // [B, H, Nq, BQ, S * BK]
  scores.add_(bias);
  at::Tensor lse = at::logsumexp(scores, -1, /*keepdim=*/true);
  at::Tensor out = at::matmul(scores.sub_(lse).exp_(), v_kept);  // [B, H, Nq, BQ, D]

  AttentionOutput result;
  result.out = out.reshape({batch, heads, nq * bq, head_dim})
                   .narrow(2, 0, seq_len)
                   .permute({0, 2, 1, 3})
                   .to(q.scalar_type())
                   .contiguous();
  result.lse = lse.reshape({batch, heads, nq * bq}).narrow(2, 0, seq_len).contiguous();
  return result;
}

at::Tensor MaskedSdpaAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const BlockSparseMask& mask) {
  CheckTokenMajor(q, k, v);
  const int64_t batch = q.size(0), seq_len = q.size(1), heads = q.size(2);
  TORCH_CHECK(
      mask.seq_len == seq_len && mask.counts.size(0) == batch && mask.counts.size(1) == heads,
      "mask does not match the inputs");
  const int64_t nk = mask.num_k_blocks;
  // Padding slots (-1) scatter into a spare column that is dropped afterwards.
  at::Tensor slots = mask.indices.to(at::kLong);
  slots = at::where(slots < 0, at::full({}, nk, slots.options()), slots);
  at::Tensor blocks = at::zeros({batch, heads, mask.num_q_blocks, nk + 1}, at::kBool)
                          .scatter_(3, slots, true)
                          .narrow(3, 0, nk);
  at::Tensor token_mask = blocks.repeat_interleave(mask.block_q, 2)
                              .narrow(2, 0, seq_len)
                              .repeat_interleave(mask.block_k, 3)
                              .narrow(3, 0, seq_len)
                              .to(q.device());
  return at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          token_mask)
      .transpose(1, 2);
}

at::Tensor DenseAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(),
              "attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "k shape ", k.sizes(), " does not match q shape ", q.sizes());
  return at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
      .transpose(1, 2);
}

void RegisterSparseAttentionBackend(c10::DeviceType device_type, SparseAttentionBackend backend) {
  std::lock_guard<std::mutex> lock(BackendMutex());
  Backends()[device_type] = std::move(backend);
}

void UnregisterSparseAttentionBackend(c10::DeviceType device_type) {
  std::lock_guard<std::mutex> lock(BackendMutex());
  Backends().erase(device_type);
}

std::string CudaKernelMismatch(const std::string& dtype, int64_t block_q, int64_t block_k,
                               int64_t head_dim) {
  std::vector<std::string> off;
  if (dtype != "bfloat16" && dtype != "float16") off.push_back("dtype " + dtype);
  if (block_q != 128) off.push_back("block_q " + std::to_string(block_q));
  if (block_k <= 0 || block_k % 64 != 0) off.push_back("block_k " + std::to_string(block_k));
  if (head_dim > 0 && head_dim != 64 && head_dim != 128) {
    off.push_back("head dim " + std::to_string(head_dim));
  }
  if (off.empty()) return "";
  std::string list;
  for (size_t i = 0; i < off.size(); ++i) list += (i ? ", " : "") + off[i];
  return "the sparge CUDA kernels need dtype bfloat16 or float16, block_q 128, block_k a multiple "
         "of 64 (128 is fastest) and head dim 64 or 128; with " + list +
         " sparse attention runs on the ATen reference path instead (much slower)";
}

std::string SparseAttentionBackendName(c10::DeviceType device_type) {
  SparseAttentionBackend backend;
  if (FindBackend(device_type, &backend)) return backend.name;
  if (device_type == c10::DeviceType::CUDA && FindSpargeOps(device_type).has_value()) {
    return "sparge-ops";
  }
  return "aten-reference";
}

namespace {

thread_local AttentionTimer* current_attention_timer = nullptr;

at::Tensor SelfAttentionUntimed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                absl::Span<const AttentionKnobs> knobs, int64_t block_q,
                                int64_t block_k, at::Tensor* sparsity_out) {
  CheckTokenMajor(q, k, v);
  const int64_t batch = q.size(0);
  TORCH_CHECK(static_cast<int64_t>(knobs.size()) == batch, "need one knob set per batch element (",
              batch, "), got ", knobs.size());
  std::vector<int64_t> dense_ids, sparse_ids;
  std::vector<AttentionKnobs> sparse_knobs;
  for (int64_t b = 0; b < batch; ++b) {
    if (knobs[b].mode == AttentionMode::kDense) {
      dense_ids.push_back(b);
    } else {
      sparse_ids.push_back(b);
      sparse_knobs.push_back(knobs[b]);
    }
  }
  const auto sparsity_options = q.options().dtype(at::kFloat);
  if (sparse_ids.empty()) {
    if (sparsity_out != nullptr) *sparsity_out = at::zeros({batch}, sparsity_options);
    return DenseAttention(q, k, v);
  }

  // Selecting a subset copies; skip that when the whole batch takes one path. Index lists reach
  // the device without a host wait.
  const bool all_sparse = dense_ids.empty();
  at::Tensor sparse_index, dense_index;
  if (!all_sparse) {
    sparse_index = ToDeviceAsync(at::tensor(sparse_ids, at::kLong), q.device());
    dense_index = ToDeviceAsync(at::tensor(dense_ids, at::kLong), q.device());
  }
  auto subset = [&](const at::Tensor& x) {
    return all_sparse ? x : x.index_select(0, sparse_index);
  };
  at::Tensor qs = subset(q), ks = subset(k), vs = subset(v);

  at::Tensor sparse_sparsity;
  at::Tensor sparse_out;
  SparseAttentionBackend backend;
  bool use_backend = FindBackend(q.device().type(), &backend);
  if (!use_backend && q.is_cuda()) {
    backend = SpargeOpsBackend();
    use_backend = true;
  }
  if (use_backend && backend.supports(qs, block_q, block_k)) {
    sparse_out = backend.run(qs, ks, vs, sparse_knobs, block_q, block_k, &sparse_sparsity);
  } else {
    BlockSparseMask mask = PredictBlockMask(qs, ks, sparse_knobs, block_q, block_k);
    const int64_t token_mask_elements = qs.size(0) * qs.size(2) * qs.size(1) * qs.size(1);
    sparse_out = token_mask_elements <= kMaxTokenMaskElements
                     ? MaskedSdpaAttention(qs, ks, vs, mask)
                     : BlockSparseAttentionReference(qs, ks, vs, mask).out;
    sparse_sparsity = MaskSparsityTensor(mask);  // the reference's mask lives on the host
  }
  const int64_t n_sparse = static_cast<int64_t>(sparse_ids.size());
  TORCH_CHECK(sparse_sparsity.defined() && sparse_sparsity.dim() == 1 &&
                  sparse_sparsity.size(0) == n_sparse,
              "sparse backend '", backend.name, "' reported sparsities of shape ",
              sparse_sparsity.defined() ? sparse_sparsity.sizes() : at::IntArrayRef{},
              " for ", n_sparse, " elements");
  if (sparsity_out != nullptr) {
    if (all_sparse) {
      *sparsity_out = sparse_sparsity.to(sparsity_options);
    } else {
      *sparsity_out = at::zeros({batch}, sparsity_options)
                          .index_copy_(0, sparse_index,
                                       sparse_sparsity.to(sparsity_options, /*non_blocking=*/true));
    }
  }
  if (all_sparse) return sparse_out;

  at::Tensor out = at::empty(q.sizes(), q.options());
  out.index_copy_(0, dense_index,
                  DenseAttention(q.index_select(0, dense_index), k.index_select(0, dense_index),
                                 v.index_select(0, dense_index)));
  out.index_copy_(0, sparse_index, sparse_out.to(q.scalar_type()));
  return out;
}

}  // namespace

at::Tensor SelfAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         absl::Span<const AttentionKnobs> knobs, int64_t block_q, int64_t block_k,
                         at::Tensor* sparsity_out) {
  AttentionTimer* timer = AttentionTimer::Current();
  if (timer == nullptr) {
    return SelfAttentionUntimed(q, k, v, knobs, block_q, block_k, sparsity_out);
  }
  if (q.is_cpu()) {
    const auto start = std::chrono::steady_clock::now();
    at::Tensor out = SelfAttentionUntimed(q, k, v, knobs, block_q, block_k, sparsity_out);
    timer->AddHostSeconds(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return out;
  }
  timer->RecordDeviceStart(q.device());
  at::Tensor out = SelfAttentionUntimed(q, k, v, knobs, block_q, block_k, sparsity_out);
  timer->RecordDeviceEnd(q.device());
  return out;
}

AttentionTimer::EventPair::EventPair(c10::DeviceType type)
    : start(type, c10::EventFlag::BACKEND_DEFAULT), end(type, c10::EventFlag::BACKEND_DEFAULT) {}

AttentionTimer::~AttentionTimer() {
  if (active_ && current_attention_timer == this) current_attention_timer = previous_;
}

AttentionTimer* AttentionTimer::Current() { return current_attention_timer; }

void AttentionTimer::Start() {
  if (!active_) {
    previous_ = current_attention_timer;
    current_attention_timer = this;
    active_ = true;
  }
  host_seconds_ = 0.0;
  events_used_ = 0;
}

void AttentionTimer::Stop() {
  if (active_) {
    if (current_attention_timer == this) current_attention_timer = previous_;
    active_ = false;
  }
}

double AttentionTimer::Finish() {
  Stop();
  double seconds = host_seconds_;
  if (events_used_ == 0) return seconds;
  // Events on one stream complete in order: waiting for the last one covers all.
  events_[events_used_ - 1]->end.synchronize();
  for (size_t i = 0; i < events_used_; ++i) {
    seconds += events_[i]->start.elapsedTime(events_[i]->end) / 1000.0;  // ms -> s
  }
  return seconds;
}

void AttentionTimer::RecordDeviceStart(c10::Device device) {
  if (device != event_device_) {
    // Events are bound to the device they were first recorded on.
    events_.clear();
    events_used_ = 0;
    event_device_ = device;
  }
  if (events_used_ == events_.size()) {
    events_.push_back(std::make_unique<EventPair>(device.type()));
  }
  c10::impl::VirtualGuardImpl guard(device.type());
  events_[events_used_]->start.record(guard.getStream(device));
  ++events_used_;
}

void AttentionTimer::RecordDeviceEnd(c10::Device device) {
  c10::impl::VirtualGuardImpl guard(device.type());
  events_[events_used_ - 1]->end.record(guard.getStream(device));
}

}  // namespace sparge::engine
