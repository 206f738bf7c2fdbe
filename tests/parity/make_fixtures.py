"""Writes the Wan2.1 parity fixtures: tiny random models in several configurations, saved as
diffusers-layout model directories (and the DiT again in the original Wan layout), plus inputs and
reference outputs computed with the pinned diffusers / transformers (scripts/requirements.txt):
the DiT forward, the umT5 encoder, the VAE decode, and whole CFG sampler runs (UniPC and Euler)
followed by a decode.

Run by ctest before the parity tests (FIXTURES_SETUP); nothing it writes is committed.
Usage: make_fixtures.py --out DIR --tokenizer SPIECE_MODEL
Per configuration NAME: DIR/NAME/ (transformer/, text_encoder/, tokenizer/, vae/, scheduler/,
model_index.json), DIR/NAME_original/transformer/ (WanModel config and keys), and
DIR/NAME/reference.safetensors (inputs and outputs, float32).
"""
import argparse
import copy
import json
import os
import shutil

import torch
from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                       WanTransformer3DModel)
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

VOCAB = 512  # the embedded tiny tokenizer's size

# Head counts, head dims (12, 64, 128: RoPE splits 4/4/4, 24/20/20, 44/42/42), layers, latent
# frames, sizes (square and not), text lengths, VAE widths and the original-layout variants.
CONFIGS = {
    "cfg_a": dict(heads=2, head_dim=12, layers=2, ffn=32, t5_dim=32, t5_heads=4, t5_kv=8,
                  t5_ff=48, t5_layers=2, text_len=16, frames=9, height=32, width=32,
                  vae_base=4, vae_mult=[1, 2, 2, 2], vae_res=1, vae_tdown=[False, True, True],
                  shift=3.0, shard=False, prefix=False),
    "cfg_b": dict(heads=1, head_dim=128, layers=1, ffn=64, t5_dim=48, t5_heads=2, t5_kv=16,
                  t5_ff=64, t5_layers=1, text_len=24, frames=5, height=48, width=32,
                  vae_base=6, vae_mult=[1, 1, 1, 1], vae_res=2, vae_tdown=[False, True, True],
                  shift=5.0, shard=True, prefix=True),
    "cfg_c": dict(heads=3, head_dim=64, layers=3, ffn=96, t5_dim=64, t5_heads=4, t5_kv=16,
                  t5_ff=96, t5_layers=3, text_len=32, frames=13, height=32, width=48,
                  vae_base=8, vae_mult=[1, 2, 2, 2], vae_res=1, vae_tdown=[True, True, False],
                  shift=7.0, shard=False, prefix=False),
}

# diffusers name -> original Wan name for the DiT (shared/design/WAN21.md 1.5), written out here
# independently of the C++ key map so that a mistake on either side shows up.
TOP = [("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
       ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
       ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
       ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
       ("condition_embedder.time_proj.", "time_projection.1."),
       ("proj_out.", "head.head.")]
BLOCK = [("attn1.to_q.", "self_attn.q."), ("attn1.to_k.", "self_attn.k."),
         ("attn1.to_v.", "self_attn.v."), ("attn1.to_out.0.", "self_attn.o."),
         ("attn1.norm_q.", "self_attn.norm_q."), ("attn1.norm_k.", "self_attn.norm_k."),
         ("attn2.to_q.", "cross_attn.q."), ("attn2.to_k.", "cross_attn.k."),
         ("attn2.to_v.", "cross_attn.v."), ("attn2.to_out.0.", "cross_attn.o."),
         ("attn2.norm_q.", "cross_attn.norm_q."), ("attn2.norm_k.", "cross_attn.norm_k."),
         ("norm2.", "norm3."), ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."),
         ("scale_shift_table", "modulation")]


def to_original(key):
    if key == "scale_shift_table":
        return "head.modulation"
    for d, o in TOP:
        if key.startswith(d):
            return o + key[len(d):]
    if key.startswith("blocks."):
        i, rest = key[len("blocks."):].split(".", 1)
        for d, o in BLOCK:
            if rest.startswith(d):
                return f"blocks.{i}.{o}{rest[len(d):]}"
    return key


def randomize(module, gen):
    """Every parameter random and O(1)-scaled, so that every weight matters for the outputs."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "scale_shift_table" in name:
            value = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
        elif leaf in ("gamma",) or ("norm" in name and leaf == "weight" and p.dim() == 1):
            value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        elif leaf == "bias" or p.dim() == 1:
            value = 0.1 * torch.randn(p.shape, generator=gen)
        elif "relative_attention_bias" in name or name.endswith("shared.weight"):
            value = torch.randn(p.shape, generator=gen)
        else:
            fan_in = p[0].numel()
            value = torch.randn(p.shape, generator=gen) / fan_in ** 0.5
            if "time_embedder.linear_1" in name:
                # Random weights on the high-frequency sinusoid channels make the output chaotic
                # in t (measured: a 1e-7 relative change of t moved a 3-layer DiT's output by
                # 1.5e-5), so that one-ulp differences dominate the comparison. Trained Wan
                # weights are smooth in t; damp these to keep the test about the implementation.
                value = value * 0.1
        with torch.no_grad():
            p.copy_(value)


def denoise(dit, scheduler, noise, cond, uncond, steps, guidance):
    """WanPipeline.__call__'s denoising loop (diffusers 0.35.1, pipeline_wan.py, Wan2.1 branch).

    Written out because that diffusers release cannot import WanPipeline next to transformers 5
    (it imports FLAX_WEIGHTS_NAME, which transformers 5 removed); the loop is the same statements:
    set_timesteps, two forward passes per step, CFG, scheduler.step.
    """
    scheduler.set_timesteps(steps, device="cpu")
    latents = noise.clone()
    for t in scheduler.timesteps:
        timestep = t.expand(latents.shape[0])
        v = dit(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond,
                return_dict=False)[0]
        v_uncond = dit(hidden_states=latents, timestep=timestep, encoder_hidden_states=uncond,
                       return_dict=False)[0]
        v = v_uncond + guidance * (v - v_uncond)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents


def build(name, c, out, tokenizer_model, gen):
    root = os.path.join(out, name)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    dim = c["heads"] * c["head_dim"]
    dit = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=c["heads"], attention_head_dim=c["head_dim"],
        in_channels=16, out_channels=16, text_dim=c["t5_dim"], freq_dim=256, ffn_dim=c["ffn"],
        num_layers=c["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024).eval()
    randomize(dit, gen)
    dit.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True,
                        max_shard_size="40KB" if c["shard"] else "10GB")
    t5 = UMT5EncoderModel(UMT5Config(
        vocab_size=VOCAB, d_model=c["t5_dim"], d_kv=c["t5_kv"], num_heads=c["t5_heads"],
        d_ff=c["t5_ff"], num_layers=c["t5_layers"], relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=1e-6)).eval()
    randomize(t5, gen)
    t5.save_pretrained(os.path.join(root, "text_encoder"), safe_serialization=True)
    os.makedirs(os.path.join(root, "tokenizer"))
    shutil.copy(tokenizer_model, os.path.join(root, "tokenizer", "spiece.model"))
    with open(os.path.join(root, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": c["text_len"], "tokenizer_class": "T5Tokenizer"}, f)
    mean = (0.5 * torch.randn(16, generator=gen)).tolist()
    std = (0.5 + torch.rand(16, generator=gen)).tolist()
    vae = AutoencoderKLWan(base_dim=c["vae_base"], z_dim=16, dim_mult=c["vae_mult"],
                           num_res_blocks=c["vae_res"], attn_scales=[],
                           temperal_downsample=c["vae_tdown"], dropout=0.0,
                           latents_mean=mean, latents_std=std).eval()
    randomize(vae, gen)
    vae.save_pretrained(os.path.join(root, "vae"), safe_serialization=True)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=c["shift"])
    unipc.save_pretrained(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                   "text_encoder": ["transformers", "UMT5EncoderModel"],
                   "tokenizer": ["transformers", "T5TokenizerFast"],
                   "vae": ["diffusers", "AutoencoderKLWan"],
                   "scheduler": ["diffusers", "UniPCMultistepScheduler"]}, f)

    # The same DiT in the original Wan layout (WanModel config; text_dim is not part of Wan's
    # config, so it is written as an extra key that the engine honours for tiny models).
    orig = os.path.join(out, name + "_original", "transformer")
    shutil.rmtree(os.path.dirname(orig), ignore_errors=True)
    os.makedirs(orig)
    prefix = "model.diffusion_model." if c["prefix"] else ""
    save_file({prefix + to_original(k): v.contiguous() for k, v in dit.state_dict().items()},
              os.path.join(orig, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(orig, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", "dim": dim, "eps": 1e-6, "ffn_dim": c["ffn"],
                   "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": c["heads"],
                   "num_layers": c["layers"], "out_dim": 16, "text_len": c["text_len"],
                   "text_dim": c["t5_dim"]}, f)

    ref = {}
    lat_t = (c["frames"] - 1) // 4 + 1
    lat_shape = (16, lat_t, c["height"] // 8, c["width"] // 8)
    # DiT forward: a batch of two with different timesteps and contexts.
    ref["dit.latents"] = torch.randn((2,) + lat_shape, generator=gen)
    ref["dit.timesteps"] = torch.tensor([999.0, 321.5])
    ref["dit.context"] = torch.randn((2, c["text_len"], c["t5_dim"]), generator=gen)
    ref["dit.out"] = dit(hidden_states=ref["dit.latents"], timestep=ref["dit.timesteps"],
                         encoder_hidden_states=ref["dit.context"], return_dict=False)[0]
    # The same forward in bfloat16 the way diffusers runs it: parameters in bf16 except its
    # _keep_in_fp32_modules (time embedder, modulation tables, norms), inputs cast to bf16.
    keep = WanTransformer3DModel._keep_in_fp32_modules
    dit_bf16 = copy.deepcopy(dit)
    for pname, p in dit_bf16.named_parameters():
        if not any(k in pname.split(".") for k in keep):
            p.data = p.data.to(torch.bfloat16)
    ref["dit.out_bf16"] = dit_bf16(
        hidden_states=ref["dit.latents"].to(torch.bfloat16), timestep=ref["dit.timesteps"],
        encoder_hidden_states=ref["dit.context"].to(torch.bfloat16), return_dict=False)[0].float()
    # Text encoder on token ids: one full row, one shorter (EOS, then padding rows zeroed).
    ids = torch.randint(2, VOCAB, (2, c["text_len"]), generator=gen)
    mask = torch.ones_like(ids)
    short = c["text_len"] // 3
    ids[0, -1] = 1
    ids[1, short - 1] = 1
    ids[1, short:] = 0
    mask[1, short:] = 0
    ref["t5.ids"], ref["t5.mask"] = ids, mask
    hidden = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    ref["t5.out"] = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    # The same in bfloat16 as transformers runs it: bf16 parameters except _keep_in_fp32_modules.
    t5_keep = getattr(UMT5EncoderModel, "_keep_in_fp32_modules", None) or []
    t5_bf16 = copy.deepcopy(t5)
    for pname, p in t5_bf16.named_parameters():
        if not any(k in pname.split(".") for k in t5_keep):
            p.data = p.data.to(torch.bfloat16)
    hidden = t5_bf16(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    ref["t5.out_bf16"] = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    # VAE decode of normalized latents, de-normalized as WanPipeline does.
    z = torch.randn((1,) + lat_shape, generator=gen)
    ref["vae.latents"] = z
    mean_t = torch.tensor(mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(std).view(1, 16, 1, 1, 1)
    ref["vae.out"] = vae.decode(z / inv_std + mean_t, return_dict=False)[0]
    # Whole sampler runs with CFG through diffusers' WanPipeline (prompt embeddings given).
    ref["run.noise"] = torch.randn((1,) + lat_shape, generator=gen)
    ref["run.cond"] = torch.randn((1, c["text_len"], c["t5_dim"]), generator=gen)
    ref["run.uncond"] = torch.randn((1, c["text_len"], c["t5_dim"]), generator=gen)
    runs = {"unipc": (unipc, 5, 5.0),
            "euler": (FlowMatchEulerDiscreteScheduler(shift=c["shift"]), 4, 3.5)}
    for run, (scheduler, steps, guidance) in runs.items():
        latents = denoise(dit, scheduler, ref["run.noise"], ref["run.cond"], ref["run.uncond"],
                          steps, guidance)
        ref[f"run.{run}.latents"] = latents
        ref[f"run.{run}.video"] = vae.decode(latents / inv_std + mean_t, return_dict=False)[0]
        ref[f"run.{run}.params"] = torch.tensor([steps, guidance, c["shift"]])
    # The UniPC run with the transformer in bfloat16, as WanPipeline runs it: latents fp32, the
    # DiT input and prompt embeddings cast to bf16, CFG in bf16, the scheduler on fp32 latents.
    latents = denoise(
        lambda hidden_states, encoder_hidden_states, **kw: dit_bf16(
            hidden_states=hidden_states.to(torch.bfloat16),
            encoder_hidden_states=encoder_hidden_states.to(torch.bfloat16), **kw),
        runs["unipc"][0], ref["run.noise"], ref["run.cond"], ref["run.uncond"],
        runs["unipc"][1], runs["unipc"][2])
    ref["run.unipc.latents_bf16"] = latents.float()
    save_file({k: v.detach().contiguous() for k, v in ref.items()},
              os.path.join(root, "reference.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(20260)
    os.makedirs(args.out, exist_ok=True)
    for name, c in CONFIGS.items():
        build(name, c, args.out, args.tokenizer, gen)
        print(f"{name}: written")


if __name__ == "__main__":
    main()
