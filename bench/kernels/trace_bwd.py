#!/usr/bin/env python3
"""Where the backward's time goes between its kernels: a torch-profiler trace of N back-to-back
default backward calls at a Wan shape (bf16, 95% hybrid masks as in bench_sparge.py), reduced to
the GPU timeline (each kernel, memset and copy with the idle gap before it), the span of each call
on the GPU, the host time per call, and the CUDA runtime calls the host made per call.

  trace_bwd.py LIB [1.3B|14B] [--calls 5] [--sparsity 0.95] [--json OUT.json] [--fwd]

--fwd traces the forward (mask prediction and attention) instead. The host runs ahead of the GPU
exactly as in the benchmark's timing (one synchronisation at the end), so a gap is GPU idle time
the host did not cover, or a kernel's launch latency behind its predecessor.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_bwd import backward_case  # noqa: E402
from ncu_mask import SHAPES  # noqa: E402


def short(name):
    name = name.replace("(anonymous namespace)::", "").replace("sparge::kernels::", "").replace("detail::", "")
    return name.replace("void ", "").split("(")[0][:48]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lib")
    ap.add_argument("shape", nargs="?", default="1.3B", choices=sorted(SHAPES))
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--fwd", action="store_true", help="trace the forward (mask + attention) instead")
    ap.add_argument("--json", default="", help="write the reduced timeline here")
    args = ap.parse_args()
    torch.ops.load_library(args.lib)
    case = backward_case(args.shape, args.sparsity)
    sp = case.sparsity
    call = case.fwd if args.fwd else case.bwd

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    # Host time per call with the GPU busy (no synchronisation inside the loop).
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    host_us = (time.perf_counter() - t0) * 1e6 / args.calls
    torch.cuda.synchronize()

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e),
                 key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e]
    # Every call launches the same sequence, so the timeline splits into equal runs.
    per_call = len(gpu) // args.calls if args.calls > 0 else 0
    if per_call == 0 or len(gpu) % args.calls != 0:
        print(f"warning: {len(gpu)} GPU activities for {args.calls} calls: not an equal split", flush=True)
        per_call = max(per_call, 1)
    calls = [gpu[n:n + per_call] for n in range(0, len(gpu), per_call)]
    rows = []
    for n, evs in enumerate(calls):
        span = evs[-1]["ts"] + evs[-1]["dur"] - evs[0]["ts"]
        busy = sum(e["dur"] for e in evs)
        items = []
        prev_end = evs[0]["ts"]
        for e in evs:
            items.append({"name": short(e["name"]), "gap_us": round(e["ts"] - prev_end, 1), "us": round(e["dur"], 1)})
            prev_end = e["ts"] + e["dur"]
        gap_before = 0.0 if n == 0 else evs[0]["ts"] - (calls[n - 1][-1]["ts"] + calls[n - 1][-1]["dur"])
        rows.append({"span_us": round(span, 1), "busy_us": round(busy, 1), "gap_before_call_us": round(gap_before, 1),
                     "timeline": items})
        print(f"call {n}: span {span:.1f} us, kernels {busy:.1f} us, idle inside {span - busy:.1f} us, "
              f"idle before {gap_before:.1f} us", flush=True)
        print("   " + " | ".join(f"+{it['gap_us']} {it['name']} {it['us']}" for it in items), flush=True)
    api = {}
    for e in runtime:
        a = api.setdefault(e["name"], [0, 0.0])
        a[0] += 1
        a[1] += e["dur"]
    api_rows = sorted(((n, c_ / args.calls, t / args.calls) for n, (c_, t) in api.items()), key=lambda r: -r[2])
    print(f"{args.shape} sparsity {sp:.4f}: host {host_us:.1f} us per call (GPU busy); runtime calls per call: "
          + ", ".join(f"{n} x{c_:.1f} {t:.1f} us" for n, c_, t in api_rows[:12]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "shape": args.shape, "sparsity": sp,
                       "what": "forward" if args.fwd else "backward", "host_us_per_call": round(host_us, 1),
                       "runtime_calls_per_call": [{"name": n, "count": c_, "us": round(t, 1)} for n, c_, t in api_rows],
                       "calls": rows}, f, indent=1)


if __name__ == "__main__":
    main()
