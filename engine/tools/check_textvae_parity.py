"""Compares the engine's tiny umT5 encoder and Wan VAE decoder with the reference implementations.

Reads the files written by sparge_dump_textvae_parity, loads the same weights into Hugging Face's
UMT5EncoderModel and diffusers' AutoencoderKLWan, and checks names, shapes and outputs. Needs
`transformers` and `diffusers` (not in the project venv; e.g. pip install --target DIR and put DIR
on PYTHONPATH). Exits non-zero on any mismatch.

Usage: python engine/tools/check_textvae_parity.py OUT_DIR
"""
import sys

import torch
from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel

TOLERANCE = 1e-4


def params_of(blob):
    return {k[len("param."):]: v for k, v in blob.items() if k.startswith("param.")}


def check_text(path):
    blob = torch.load(path, weights_only=False)
    ours = params_of(blob)
    config = UMT5Config(vocab_size=512, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    model = UMT5EncoderModel(config).eval()
    theirs = model.state_dict()
    # encoder.embed_tokens.weight is Hugging Face's tied alias of shared.weight.
    missing = [k for k in theirs if k not in ours and k != "encoder.embed_tokens.weight"]
    unknown = [k for k in ours if k not in theirs]
    shapes = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    model.load_state_dict(ours, strict=False)
    model.encoder.embed_tokens.weight = model.shared.weight
    reference = model(input_ids=blob["ids"], attention_mask=blob["mask"]).last_hidden_state
    mask = blob["mask"].unsqueeze(-1).to(reference.dtype)
    error = (reference * mask - blob["out"]).abs().max().item()
    print(f"umT5: missing {missing}, unknown {unknown}, shape mismatches {shapes}, "
          f"max |ours - transformers| {error:.3g} (padding rows zeroed on both sides)")
    return not missing and not unknown and not shapes and error < TOLERANCE


def check_vae(path):
    blob = torch.load(path, weights_only=False)
    ours = params_of(blob)
    mean, std = blob["latents_mean"], blob["latents_std"]
    model = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                             attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
                             latents_mean=mean.tolist(), latents_std=std.tolist()).eval()
    theirs = model.state_dict()
    decoder_keys = [k for k in theirs if k.startswith(("decoder.", "post_quant_conv."))]
    missing = [k for k in decoder_keys if k not in ours]
    unknown = [k for k in ours if k not in theirs]
    shapes = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    model.load_state_dict(ours, strict=False)
    # diffusers' pipeline de-normalizes before decode; the engine's Decode does it itself.
    z = blob["latents"] * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
    reference = model.decode(z).sample
    same_shape = reference.shape == blob["out"].shape
    error = (reference - blob["out"]).abs().max().item() if same_shape else float("inf")
    print(f"VAE: missing {missing}, unknown {unknown}, shape mismatches {shapes}, output "
          f"{tuple(blob['out'].shape)} vs {tuple(reference.shape)}, max |ours - diffusers| "
          f"{error:.3g}")
    return not missing and not unknown and not shapes and error < TOLERANCE


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.set_grad_enabled(False)
    ok = check_text(sys.argv[1] + "/umt5.pt")
    ok = check_vae(sys.argv[1] + "/vae.pt") and ok
    print("parity OK" if ok else "parity FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
