#include "engine/models/wan_dit.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/dropout.h>

#include <cmath>

#include "engine/models/activation_checkpoint.h"
#include "engine/models/dit_fused.h"
#include "engine/models/deferred_init.h"

namespace sparge::engine {
namespace {

using torch::nn::Linear;
using torch::nn::LinearOptions;

at::Tensor GeluTanh(const at::Tensor& x) { return at::gelu(x, "tanh"); }

// at::linear, not Linear::forward: the C++ frontend's forward adds the bias in a separate pass for
// 3-D inputs, at::linear folds it into the GEMM epilogue (as PyTorch's F.linear does).
at::Tensor Lin(const torch::nn::LinearImpl& linear, const at::Tensor& x) {
  return at::linear(x, linear.weight, linear.bias);
}
at::Tensor Lin(const torch::nn::Linear& linear, const at::Tensor& x) { return Lin(*linear, x); }

// Runs a linear layer in its weight's dtype (fp32-kept modules receive fp32,
// others the model dtype), mirroring diffusers' per-module dtypes.
at::Tensor LinearIn(torch::nn::Linear& linear, const at::Tensor& x) {
  return Lin(linear, x.to(linear->weight.scalar_type()));
}

}  // namespace

std::array<int64_t, 3> RopeAxisDims(int64_t head_dim) {
  const int64_t hw = 2 * (head_dim / 6);
  return {head_dim - 2 * hw, hw, hw};
}

std::pair<at::Tensor, at::Tensor> RopeTables(int64_t head_dim, int64_t frames, int64_t height,
                                             int64_t width, int64_t max_positions) {
  TORCH_CHECK(frames <= max_positions && height <= max_positions && width <= max_positions,
              "token grid ", frames, "x", height, "x", width, " exceeds rope_max_seq_len ",
              max_positions);
  const std::array<int64_t, 3> dims = RopeAxisDims(head_dim);
  const std::array<int64_t, 3> extent = {frames, height, width};
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  std::vector<at::Tensor> angles;  // per axis: [L, d_a / 2], broadcast over the other two axes
  for (int axis = 0; axis < 3; ++axis) {
    // The exponent is normalized by the axis sub-dimension, not the head
    // dimension.
    at::Tensor j = at::arange(0, dims[axis], 2, f64);
    at::Tensor omega = 1.0 / at::pow(10000.0, j / static_cast<double>(dims[axis]));
    at::Tensor phi = at::outer(at::arange(extent[axis], f64), omega);  // [n_a, d_a/2]
    std::vector<int64_t> view = {1, 1, 1, phi.size(1)};
    view[axis] = extent[axis];
    angles.push_back(phi.view(view).expand({frames, height, width, phi.size(1)}));
  }
  at::Tensor phi = at::cat(angles, -1).reshape({frames * height * width, head_dim / 2});
  return {at::cos(phi).to(at::kFloat), at::sin(phi).to(at::kFloat)};
}

at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor pairs = xf.unflatten(-1, {-1, 2});  // [B, L, H, D/2, 2]
  at::Tensor x1 = pairs.select(-1, 0), x2 = pairs.select(-1, 1);
  at::Tensor c = cos.unsqueeze(1),
             s = sin.unsqueeze(1);  // [L, 1, D/2] over heads
  at::Tensor y1 = x1 * c - x2 * s;
  at::Tensor y2 = x1 * s + x2 * c;
  return at::stack({y1, y2}, -1).flatten(-2).to(x.scalar_type());
}

at::Tensor TimestepSinusoid(const at::Tensor& timesteps, int64_t dim) {
  const int64_t half = dim / 2;
  // Same float32 op order as diffusers
  // get_timestep_embedding(flip_sin_to_cos=True, shift 0).
  at::Tensor exponent =
      at::arange(0, half, at::TensorOptions().dtype(at::kFloat).device(timesteps.device())) *
      (-std::log(10000.0)) / static_cast<double>(half);
  at::Tensor freqs = at::exp(exponent);
  at::Tensor args = timesteps.to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
  return at::cat({at::cos(args), at::sin(args)}, -1);
}

RmsNormImpl::RmsNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

at::Tensor RmsNormImpl::forward(const at::Tensor& x) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  return (normed * weight.to(at::kFloat)).to(x.scalar_type());
}

WanAttentionImpl::WanAttentionImpl(int64_t dim, int64_t num_heads, double eps)
    : num_heads_(num_heads) {
  to_q = register_module("to_q", Linear(LinearOptions(dim, dim)));
  to_k = register_module("to_k", Linear(LinearOptions(dim, dim)));
  to_v = register_module("to_v", Linear(LinearOptions(dim, dim)));
  to_out = register_module("to_out", torch::nn::ModuleList(Linear(LinearOptions(dim, dim))));
  norm_q = register_module("norm_q", RmsNorm(dim, eps));
  norm_k = register_module("norm_k", RmsNorm(dim, eps));
}

at::Tensor WanAttentionImpl::SelfAttend(const at::Tensor& x, const at::Tensor& rope_cos,
                                        const at::Tensor& rope_sin,
                                        absl::Span<const AttentionKnobs> knobs, int64_t block_q,
                                        int64_t block_k, at::Tensor* sparsity) {
  at::Tensor q, k;
  if (UseFusedDiTOps(x)) {
    const int64_t head_dim = x.size(-1) / num_heads_;
    q = FusedRmsNormRope(Lin(to_q, x), norm_q->weight, rope_cos, rope_sin, head_dim,
                         norm_q->eps())
            .unflatten(2, {num_heads_, -1});
    k = FusedRmsNormRope(Lin(to_k, x), norm_k->weight, rope_cos, rope_sin, head_dim,
                         norm_k->eps())
            .unflatten(2, {num_heads_, -1});
  } else {
    q = ApplyRope(norm_q->forward(Lin(to_q, x)).unflatten(2, {num_heads_, -1}), rope_cos,
                  rope_sin);
    k = ApplyRope(norm_k->forward(Lin(to_k, x)).unflatten(2, {num_heads_, -1}), rope_cos,
                  rope_sin);
  }
  at::Tensor v = Lin(to_v, x).unflatten(2, {num_heads_, -1});
  at::Tensor out = SelfAttention(q, k, v, knobs, block_q, block_k, sparsity);
  return Lin(*to_out[0]->as<torch::nn::Linear>(), out.flatten(2).to(x.scalar_type()));
}

at::Tensor WanAttentionImpl::CrossAttend(const at::Tensor& x, const at::Tensor& context) {
  at::Tensor q, k;
  if (UseFusedDiTOps(x)) {
    const int64_t head_dim = x.size(-1) / num_heads_;
    q = FusedRmsNormRope(Lin(to_q, x), norm_q->weight, std::nullopt, std::nullopt, head_dim,
                         norm_q->eps());
    k = FusedRmsNormRope(Lin(to_k, context), norm_k->weight, std::nullopt, std::nullopt,
                         head_dim, norm_k->eps());
  } else {
    q = norm_q->forward(Lin(to_q, x));
    k = norm_k->forward(Lin(to_k, context));
  }
  q = q.unflatten(2, {num_heads_, -1});
  k = k.unflatten(2, {num_heads_, -1});
  at::Tensor v = Lin(to_v, context).unflatten(2, {num_heads_, -1});
  at::Tensor out = DenseAttention(q, k, v);
  return Lin(*to_out[0]->as<torch::nn::Linear>(), out.flatten(2));
}

WanFeedForwardImpl::WanFeedForwardImpl(int64_t dim, int64_t ffn_dim) {
  // diffusers: net = [GELU(proj), Dropout, Linear]; the wrapper module only
  // owns "proj".
  auto gelu = std::make_shared<torch::nn::Module>("GELU");
  proj_ = gelu->register_module("proj", Linear(LinearOptions(dim, ffn_dim)));
  out_ = Linear(LinearOptions(ffn_dim, dim));
  net = register_module("net", torch::nn::ModuleList());
  net->push_back(gelu);
  net->push_back(torch::nn::Dropout(0.0));
  net->push_back(out_);
}

at::Tensor WanFeedForwardImpl::forward(const at::Tensor& x) {
  if (UseGemmGelu(x)) {
    // GELU in the GEMM epilogue (cuBLASLt, tanh approximation): one pass less over the widest
    // activation of the block.
    at::Tensor h = at::_addmm_activation(proj_->bias, x.reshape({-1, x.size(-1)}),
                                         proj_->weight.t(), 1, 1, /*use_gelu=*/true);
    return Lin(out_, h.view({x.size(0), x.size(1), -1}));
  }
  return Lin(out_, GeluTanh(Lin(proj_, x)));
}

WanBlockImpl::WanBlockImpl(const WanDiTConfig& config) : eps_(config.eps) {
  attn1 = register_module("attn1", WanAttention(config.dim, config.num_heads, config.eps));
  attn2 = register_module("attn2", WanAttention(config.dim, config.num_heads, config.eps));
  norm2 = register_module(
      "norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.dim}).eps(config.eps)));
  ffn = register_module("ffn", WanFeedForward(config.dim, config.ffn_dim));
  scale_shift_table = register_parameter("scale_shift_table", torch::zeros({1, 6, config.dim}));
}

at::Tensor WanBlockImpl::forward(const at::Tensor& x_in, const at::Tensor& context,
                                 const at::Tensor& temb6, const at::Tensor& rope_cos,
                                 const at::Tensor& rope_sin, absl::Span<const AttentionKnobs> knobs,
                                 int64_t block_q, int64_t block_k, at::Tensor* sparsity) {
  if (UseFusedDiTOps(x_in)) {
    return ForwardFused(x_in, context, temb6, rope_cos, rope_sin, knobs, block_q, block_k,
                        sparsity);
  }
  const auto dtype = x_in.scalar_type();
  const int64_t dim = x_in.size(-1);
  // Modulation in fp32: (shift, scale, gate) for self-attention, then for the
  // FFN.
  std::vector<at::Tensor> mod =
      (scale_shift_table.to(at::kFloat) + temb6.to(at::kFloat)).chunk(6, 1);
  auto layer_norm = [&](const at::Tensor& t) {
    return at::layer_norm(t.to(at::kFloat), {dim}, {}, {}, eps_);
  };
  at::Tensor x = x_in;
  at::Tensor a = (layer_norm(x) * (1 + mod[1]) + mod[0]).to(dtype);
  at::Tensor attn = attn1->SelfAttend(a, rope_cos, rope_sin, knobs, block_q, block_k, sparsity);
  x = (x.to(at::kFloat) + attn * mod[2]).to(dtype);

  at::Tensor c = norm2->forward(x.to(at::kFloat)).to(dtype);
  x = x + attn2->CrossAttend(c, context);

  at::Tensor f = (layer_norm(x) * (1 + mod[4]) + mod[3]).to(dtype);
  x = (x.to(at::kFloat) + ffn->forward(f).to(at::kFloat) * mod[5]).to(dtype);
  return x;
}

at::Tensor WanBlockImpl::ForwardFused(const at::Tensor& x_in, const at::Tensor& context,
                                      const at::Tensor& temb6, const at::Tensor& rope_cos,
                                      const at::Tensor& rope_sin,
                                      absl::Span<const AttentionKnobs> knobs, int64_t block_q,
                                      int64_t block_k, at::Tensor* sparsity) {
  // [B, 6, D] fp32 -> six [B, D] rows: (shift, scale, gate) for self-attention, then the FFN.
  const at::Tensor mod = scale_shift_table.to(at::kFloat) + temb6.to(at::kFloat);
  auto row = [&](int64_t i) { return mod.select(1, i); };
  at::Tensor a = FusedLayerNormModulate(x_in, 1 + row(1), row(0), eps_);
  at::Tensor x = FusedGatedResidual(
      x_in, attn1->SelfAttend(a, rope_cos, rope_sin, knobs, block_q, block_k, sparsity), row(2));
  at::Tensor c = FusedLayerNormModulate(x, norm2->weight, norm2->bias, eps_);
  x = FusedGatedResidual(x, attn2->CrossAttend(c, context), std::nullopt);
  at::Tensor f = FusedLayerNormModulate(x, 1 + row(4), row(3), eps_);
  return FusedGatedResidual(x, ffn->forward(f), row(5));
}

WanDiTImpl::WanDiTImpl(const WanDiTConfig& config, int64_t block_q, int64_t block_k)
    : config_(config), block_q_(block_q), block_k_(block_k) {
  const int64_t dim = config.dim;
  const auto& p = config.patch_size;
  patch_embedding = register_module(
      "patch_embedding",
      torch::nn::Conv3d(torch::nn::Conv3dOptions(config.in_channels, dim, {p[0], p[1], p[2]})
                            .stride({p[0], p[1], p[2]})));
  condition_embedder = register_module("condition_embedder",
                                       std::make_shared<torch::nn::Module>("WanTimeTextEmbedding"));
  auto time_embedder = condition_embedder->register_module(
      "time_embedder", std::make_shared<torch::nn::Module>("TimestepEmbedding"));
  time_linear_1 =
      time_embedder->register_module("linear_1", Linear(LinearOptions(config.freq_dim, dim)));
  time_linear_2 = time_embedder->register_module("linear_2", Linear(LinearOptions(dim, dim)));
  time_proj = condition_embedder->register_module("time_proj", Linear(LinearOptions(dim, 6 * dim)));
  auto text_embedder = condition_embedder->register_module(
      "text_embedder", std::make_shared<torch::nn::Module>("PixArtAlphaTextProjection"));
  text_linear_1 =
      text_embedder->register_module("linear_1", Linear(LinearOptions(config.text_dim, dim)));
  text_linear_2 = text_embedder->register_module("linear_2", Linear(LinearOptions(dim, dim)));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int i = 0; i < config.num_layers; ++i) {
    blocks->push_back(WanBlock(config));
    // Under deferred init (a checkpoint load) each block's default-initialized storage is freed
    // before the next one is built, so building never holds the whole model.
    ReleaseParametersForLoading(*blocks->ptr(i));
  }
  scale_shift_table = register_parameter("scale_shift_table", torch::zeros({1, 2, dim}));
  const int64_t patch_volume = static_cast<int64_t>(p[0]) * p[1] * p[2];
  proj_out =
      register_module("proj_out", Linear(LinearOptions(dim, patch_volume * config.out_channels)));
  ReleaseParametersForLoading(*this);
}

bool WanDiTImpl::KeepsFloat32(const std::string& name) {
  auto ends_with = [&](const std::string& suffix) {
    return name.size() >= suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  // diffusers matches _keep_in_fp32_modules against whole name components: the q/k RMS norms
  // (norm_q, norm_k) are not among them and run in the model dtype.
  return name.rfind("condition_embedder.time_embedder.", 0) == 0 ||
         ends_with("scale_shift_table") || name.find(".norm2.") != std::string::npos;
}

void WanDiTImpl::InitializeWeights(uint64_t seed) {
  torch::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const double table_std = 1.0 / std::sqrt(static_cast<double>(config_.dim));
  for (auto& item : named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    at::Tensor& param = item.value();
    at::Tensor value;
    auto randn = [&](double std) {
      return at::randn(param.sizes(), gen, at::TensorOptions().dtype(at::kFloat)) * std;
    };
    const bool is_table =
        name.size() >= 17 && name.compare(name.size() - 17, 17, "scale_shift_table") == 0;
    const bool is_norm = name.find("norm") != std::string::npos;
    if (is_table) {
      value = randn(table_std);
    } else if (is_norm) {
      // q/k RMS weights and the cross-attention LN weight start at 1, the LN
      // bias at 0.
      value = name.find("bias") != std::string::npos ? at::zeros(param.sizes())
                                                     : at::ones(param.sizes());
    } else if (param.dim() >= 2) {
      const int64_t fan_in = param.numel() / param.size(0);
      value = randn(1.0 / std::sqrt(static_cast<double>(fan_in)));
    } else {
      value = randn(0.02);
    }
    param.copy_(value);
  }
}

void WanDiTImpl::ToInference(const torch::Device& device, torch::ScalarType dtype) {
  dtype_ = dtype;
  to(device, dtype);
  // diffusers _keep_in_fp32_modules: time_embedder, scale_shift_table, norms.
  time_linear_1->to(torch::kFloat);
  time_linear_2->to(torch::kFloat);
  torch::NoGradGuard no_grad;
  scale_shift_table.set_data(scale_shift_table.to(torch::kFloat));
  for (const auto& module : *blocks) {
    auto block = module->as<WanBlockImpl>();
    block->scale_shift_table.set_data(block->scale_shift_table.to(torch::kFloat));
    block->norm2->to(torch::kFloat);
  }
}

int64_t WanDiTImpl::num_parameters() const {
  int64_t total = 0;
  for (const auto& p : parameters()) total += p.numel();
  return total;
}

DiTOutput WanDiTImpl::Forward(const at::Tensor& latents, const at::Tensor& timesteps,
                              const at::Tensor& context, absl::Span<const AttentionKnobs> knobs) {
  TORCH_CHECK(latents.dim() == 5 && latents.size(1) == config_.in_channels, "latents must be [B, ",
              config_.in_channels, ", T, H, W], got ", latents.sizes());
  const int64_t batch = latents.size(0);
  const auto& p = config_.patch_size;
  TORCH_CHECK(
      latents.size(2) % p[0] == 0 && latents.size(3) % p[1] == 0 && latents.size(4) % p[2] == 0,
      "latent grid ", latents.sizes(), " is not a multiple of the patch size");
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == batch, "timesteps must be [", batch,
              "]");
  TORCH_CHECK(context.dim() == 3 && context.size(0) == batch && context.size(2) == config_.text_dim,
              "context must be [", batch, ", Lc, ", config_.text_dim, "], got ", context.sizes());
  TORCH_CHECK(static_cast<int64_t>(knobs.size()) == batch, "need ", batch, " knob sets");
  const int64_t frames = latents.size(2) / p[0], height = latents.size(3) / p[1],
                width = latents.size(4) / p[2];

  at::Tensor x = patch_embedding->forward(latents.to(dtype_));  // [B, D, f, h, w]
  x = x.flatten(2).transpose(1, 2).contiguous();                // [B, L, D]

  at::Tensor temb = Lin(time_linear_2,
      at::silu(Lin(time_linear_1, TimestepSinusoid(timesteps, config_.freq_dim))));
  temb = temb.to(dtype_);  // diffusers casts the time embedding to the text dtype
  at::Tensor temb6 = Lin(time_proj, at::silu(temb)).unflatten(1, {6, config_.dim});
  at::Tensor ctx = LinearIn(text_linear_2, GeluTanh(LinearIn(text_linear_1, context.to(dtype_))));

  const std::array<int64_t, 3> grid = {frames, height, width};
  if (grid != rope_grid_ || !rope_cos_.defined() || rope_cos_.device() != x.device()) {
    auto [cos, sin] =
        RopeTables(config_.head_dim(), frames, height, width, config_.rope_max_seq_len);
    rope_cos_ = cos.to(x.device());
    rope_sin_ = sin.to(x.device());
    rope_grid_ = grid;
  }
  const at::Tensor& rope_cos = rope_cos_;
  const at::Tensor& rope_sin = rope_sin_;

  DiTOutput output;
  // Per-layer sparsities stay on the device and are summed there; the host reads the sum once,
  // after the last layer is enqueued (a read per layer would stall the device every layer).
  at::Tensor sparsity_sum;
  at::Tensor layer_sparsity;
  const bool checkpoint = activation_checkpointing_ && at::GradMode::is_enabled() &&
                          (x.requires_grad() || ctx.requires_grad() || temb6.requires_grad());
  for (const auto& module : *blocks) {
    if (!checkpoint) {
      x = module->as<WanBlockImpl>()->forward(x, ctx, temb6, rope_cos, rope_sin, knobs, block_q_,
                                              block_k_, &layer_sparsity);
    } else {
      // Everything the recomputation needs is owned by the closure: it runs again during the
      // backward pass, after this frame is gone.
      auto block = std::dynamic_pointer_cast<WanBlockImpl>(module);
      auto sparsity = std::make_shared<at::Tensor>();
      std::vector<AttentionKnobs> knob_copy(knobs.begin(), knobs.end());
      const int64_t bq = block_q_, bk = block_k_;
      x = CheckpointedCall(
          [block, sparsity, knob_copy, rope_cos, rope_sin, bq, bk](
              const std::vector<at::Tensor>& in) {
            return block->forward(in[0], in[1], in[2], rope_cos, rope_sin, knob_copy, bq, bk,
                                  sparsity.get());
          },
          {x, ctx, temb6});
      layer_sparsity = *sparsity;
    }
    TORCH_CHECK(layer_sparsity.defined() && layer_sparsity.numel() == batch,
                "self-attention reported no sparsity for the batch of ", batch);
    sparsity_sum = sparsity_sum.defined() ? sparsity_sum + layer_sparsity.detach()
                                          : layer_sparsity.detach().clone();
  }
  output.sparsity.assign(batch, 0.0f);
  if (sparsity_sum.defined()) {
    at::Tensor mean = (sparsity_sum / static_cast<double>(config_.num_layers)).to(at::kCPU);
    for (int64_t b = 0; b < batch; ++b) output.sparsity[b] = mean[b].item<float>();
  }

  std::vector<at::Tensor> mod =
      (scale_shift_table.to(at::kFloat) + temb.to(at::kFloat).unsqueeze(1)).chunk(2, 1);
  at::Tensor y;
  if (UseFusedDiTOps(x)) {
    y = FusedLayerNormModulate(x, (1 + mod[1]).squeeze(1), mod[0].squeeze(1), config_.eps);
  } else {
    y = at::layer_norm(x.to(at::kFloat), {config_.dim}, {}, {}, config_.eps);
    y = (y * (1 + mod[1]) + mod[0]).to(dtype_);
  }
  y = Lin(proj_out, y);  // [B, L, p_t * p_h * p_w * C]

  // Unpatchify: feature index ((pt * p_h + ph) * p_w + pw) * C + c.
  y = y.reshape({batch, frames, height, width, p[0], p[1], p[2], config_.out_channels})
          .permute({0, 7, 1, 4, 2, 5, 3, 6})
          .reshape({batch, config_.out_channels, frames * p[0], height * p[1], width * p[2]});
  output.velocity = y.to(at::kFloat);
  return output;
}

}  // namespace sparge::engine
