#!/usr/bin/env python3
"""Mask-predictor measurements at the Wan shapes (bf16, B=1, D=128, 128x128 blocks, hybrid masks
from the benchmark's structured Q/K, top-p 0.3 with top-k calibrated to the target sparsity).

  ncu_mask.py LIB [1.3B|14B]   one mask prediction, for Nsight Compute:
                               ncu -k regex:"ScoreKernel|SelectKernel" python3 ncu_mask.py LIB 1.3B
  ncu_mask.py LIB --time [--sparsity 0.95] [--out DIR] [--tag T]
                               in one process per shape: mask time, its per-kernel CUDA times, our
                               attention forward alone and with the mask, cuDNN dense forward; JSON
                               to DIR (the mask-only counterpart of bench_sparge.py, seconds of GPU)
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparge import MODE_HYBRID, calibrate, predict, structured_qk, timed  # noqa: E402

SHAPES = {"1.3B": ("wan1.3B-480p", 12, 32760), "14B": ("wan14B-720p", 40, 75600)}


def kernel_times_us(fn, iters=10):
    """Mean CUDA time per call of each kernel that fn launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0:
            name = e.key.replace("(anonymous namespace)::", "").replace("sparge::kernels::", "")
            name = name.replace("void ", "").split("(")[0][:60]
            out[name] = round(out.get(name, 0.0) + t / iters, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def time_shapes(args):
    card = torch.cuda.get_device_name()
    cases = []
    for key in ("1.3B", "14B"):
        name, H, L = SHAPES[key]
        B, D, bq, bk = 1, 128, 128, 128
        q, k = structured_qk(B, L, H, D, seed=L)
        v = torch.randn(B, L, H, D, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda").bfloat16()
        topk, sp = calibrate(q, k, args.sparsity, args.topp, bq, bk)
        c, i, _, _ = predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk)
        scale = 1.0 / math.sqrt(D)
        mask_ms = timed(lambda: predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk))
        kernels = kernel_times_us(lambda: predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk))
        attn_ms = timed(lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c, i, bq, bk, scale))

        def ours_fwd():
            c_, i_, _, _ = predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk)
            return torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c_, i_, bq, bk, scale)

        fwd_ms = timed(ours_fwd)
        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn_ms = timed(lambda: F.scaled_dot_product_attention(qh, kh, vh))
        row = dict(name=name, sparsity=round(sp, 4), topk=topk, topp=args.topp, H=H, L=L, block_q=bq,
                   block_k=bk, mask_ms=mask_ms, mask_kernels_us=kernels, ours_attn_fwd_ms=attn_ms,
                   ours_fwd_ms=fwd_ms, cudnn_fwd_ms=cudnn_ms, speedup_fwd_vs_cudnn=cudnn_ms / fwd_ms,
                   mask_pct_of_cudnn_fwd=100.0 * mask_ms / cudnn_ms, card=card,
                   commit=os.environ.get("SPARGE_COMMIT", "unknown"))
        print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}), flush=True)
        cases.append(row)
        del q, k, v, qh, kh, vh, c, i
        torch.cuda.empty_cache()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mask-{card.replace(' ', '-')}-{stamp}{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"card": card, "date": stamp, "torch": torch.__version__, "cases": cases}, f, indent=1)
    print("wrote", path, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("shape", nargs="?", default="1.3B", choices=sorted(SHAPES))
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--topp", type=float, default=0.3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.ops.load_library(args.lib)
    if args.time:
        time_shapes(args)
        return 0
    _, H, L = SHAPES[args.shape]
    q, k = structured_qk(1, L, H, 128, seed=L)
    knobs = [torch.tensor([MODE_HYBRID], dtype=torch.int32, device="cuda"), torch.tensor([0.03], device="cuda"),
             torch.tensor([0.3], device="cuda")]
    for _ in range(2):
        torch.ops.sparge.predict_block_mask(q, k, *knobs, 128, 128)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
