#!/usr/bin/env python3
"""Backward-pass measurements at the Wan shapes (bf16, B=1, D=128, 128x128 blocks, hybrid masks
from the benchmark's structured Q/K, top-p 0.3 with top-k calibrated to the target sparsity).

  ncu_bwd.py LIB [1.3B|14B] [--sparsity 0.95] [--impl fused|split]
      one backward after a warm-up, for Nsight Compute, e.g.
      ncu -k regex:BwdFused --launch-skip 1 --launch-count 1 python3 ncu_bwd.py LIB 1.3B
  ncu_bwd.py LIB [1.3B|14B] --fwd
      two forwards (mask prediction + attention, the inference mask) instead, e.g.
      ncu -k regex:FwdSm90Ws --launch-skip 1 --launch-count 1 python3 ncu_bwd.py LIB 1.3B --fwd
      (the skipped launch is the setup's forward, which makes O and LSE for the backward)
  ncu_bwd.py LIB [1.3B|14B] --time
      per-kernel CUDA times (torch profiler) of the fused and the split backward
"""
import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparge import MODE_HYBRID, calibrate, predict, structured_qk  # noqa: E402
from ncu_mask import SHAPES, kernel_times_us  # noqa: E402


def backward_case(shape, sparsity):
    """The benchmark's backward inputs at a Wan shape (bf16, B=1, D=128, 128x128 blocks, hybrid
    mask with top-p 0.3 and top-k calibrated to `sparsity`, O and LSE from our forward), with
    `fwd()` (mask prediction + attention, inference mask) and `bwd()` closures. Also used by
    trace_bwd.py."""
    _, H, L = SHAPES[shape]
    B, D, bq, bk, topp = 1, 128, 128, 128, 0.3
    q, k = structured_qk(B, L, H, D, seed=L)
    gen = torch.Generator(device="cuda").manual_seed(1)
    v = torch.randn(B, L, H, D, generator=gen, device="cuda").bfloat16()
    g = torch.randn(B, L, H, D, generator=gen, device="cuda").bfloat16()
    scale = D ** -0.5
    topk, sp = calibrate(q, k, sparsity, topp, bq, bk)
    c, i, tc, ti = predict(q, k, MODE_HYBRID, topk, topp, bq, bk)
    o, lse = torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c, i, bq, bk, scale)

    def fwd():
        c_, i_, _, _ = predict(q, k, MODE_HYBRID, topk, topp, bq, bk, False)
        return torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c_, i_, bq, bk, scale)

    def bwd():
        return torch.ops.sparge.block_sparse_attention_bwd(g, q, k, v, o, lse, c, i, tc, ti, bq, bk, scale)

    return types.SimpleNamespace(sparsity=sp, fwd=fwd, bwd=bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("shape", nargs="?", default="1.3B", choices=sorted(SHAPES))
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--impl", default="fused", choices=["fused", "split"])
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--fwd", action="store_true", help="run two forwards instead of two backwards")
    args = ap.parse_args()
    torch.ops.load_library(args.lib)
    case = backward_case(args.shape, args.sparsity)
    sp, bwd = case.sparsity, case.bwd

    if args.fwd:
        case.fwd()
        case.fwd()
        torch.cuda.synchronize()
        return
    if not args.time:
        os.environ["SPARGE_BWD_IMPL"] = args.impl
        bwd()
        bwd()
        torch.cuda.synchronize()
        return
    for impl in ("fused", "split"):
        os.environ["SPARGE_BWD_IMPL"] = impl
        times = kernel_times_us(bwd)
        total = sum(times.values())
        print(f"{args.shape} sparsity {sp:.4f} {impl}: {total:.1f} us of kernels: "
              + ", ".join(f"{n[:48]} {t:.1f}" for n, t in sorted(times.items(), key=lambda x: -x[1])), flush=True)


if __name__ == "__main__":
    main()
