"""Times one forward of diffusers' WanTransformer3DModel (Wan2.1 1.3B config by default) on CUDA
with random bf16 weights, the reference for dit_forward_bench (run_device.sh runs both).
Prints one JSON line. Modules that diffusers' from_pretrained keeps in fp32 for Wan
(_keep_in_fp32_modules) stay fp32 here too, as in the engine's ToInference."""
import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--text_len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)  # fewer only for smoke tests
    ap.add_argument("--device", default="cuda")  # cpu only for smoke tests
    ap.add_argument("--profile", default="")  # write a chrome trace of one forward here
    args = ap.parse_args()

    import diffusers
    from diffusers import WanTransformer3DModel

    t0 = time.time()
    with torch.device(args.device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=args.layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
            added_kv_proj_dim=None, rope_max_seq_len=1024)
    model = model.to(torch.bfloat16).eval()
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.to(torch.float32)
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    init_s = time.time() - t0
    params = sum(p.numel() for p in model.parameters())

    g = torch.Generator(device=args.device).manual_seed(0)
    latents = torch.randn(1, 16, args.frames, args.height, args.width, device=args.device,
                          generator=g).to(torch.bfloat16)
    timestep = torch.full((1,), 500.0, device=args.device)
    context = torch.randn(1, args.text_len, 4096, device=args.device, generator=g).to(torch.bfloat16)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    with torch.inference_mode():
        for _ in range(args.warmup):
            out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                        return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
        ms = []
        for _ in range(args.iters):
            if not cuda:
                t1 = time.time()
                out = model(hidden_states=latents, timestep=timestep,
                            encoder_hidden_states=context, return_dict=False)[0]
                ms.append((time.time() - t1) * 1e3)
                continue
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                        return_dict=False)[0]
            stop.record()
            stop.synchronize()
            ms.append(start.elapsed_time(stop))
    if args.profile and cuda:
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode(), profile(
                activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                  return_dict=False)
            torch.cuda.synchronize()
        prof.export_chrome_trace(args.profile)
    print(json.dumps({
        "impl": "diffusers", "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__, "keep_in_fp32_modules": keep,
        "tokens": args.frames * (args.height // 2) * (args.width // 2), "params": params,
        "median_ms": statistics.median(ms), "step_ms": ms,
        "peak_alloc_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "resident_before_forward_bytes": resident,
        "output_finite": bool(torch.isfinite(out).all().item()), "init_s": round(init_s, 2),
    }))


if __name__ == "__main__":
    main()
