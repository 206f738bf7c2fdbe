#!/usr/bin/env python3
"""SpargeAttention2 kernel benchmark: ours (mask + block-sparse fwd, bwd) vs torch SDPA cuDNN and
FlashAttention dense, and compiled FlexAttention with the identical block mask, all in one process
on one card, bf16, Wan2.1 shapes, hybrid masks from structured ("real-looking") Q/K calibrated to
90/95/97% sparsity. Writes bench/results/<card>-<date>.json and a speedup plot (PNG).

Usage (GPU machine): python3 bench/kernels/bench_sparge.py --lib build/engine/ops/libsparge_ops.so
"""
import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MODE_DENSE, MODE_TOPK, MODE_TOPP, MODE_HYBRID = 1, 2, 3, 4


SYNC_TIMING = False  # --timing sync: the pre-v10e method (synchronise after every call)


def timed(fn, min_iters=3, max_iters=50, budget_s=1.0, warmup=2):
    """Median of per-call CUDA-event timings (ms), calls enqueued back to back (the events of
    call i bracket its kernels on the stream; one synchronisation at the end), like
    triton.testing.do_bench: the host runs ahead, so a call's time is its GPU time plus any gap
    the host could not cover, not the Python/launch latency of an idle GPU. Every contender
    (ours, cuDNN, FlashAttention, Flex) is timed by this same function. Until v10d the bench
    synchronised after every call instead (bench/results JSON before 2026-11-28T15:00)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    n = int(min(max_iters, max(min_iters, budget_s * 1e3 / max(a.elapsed_time(b), 1e-3))))
    if SYNC_TIMING:
        times = []
        for _ in range(n):
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        return times[len(times) // 2]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in events)
    return times[len(times) // 2]


def parse_ab(spec):
    """--fwd-ab / --bwd-ab text -> [(name, [(ENV, VALUE), ...]), ...]."""
    out = []
    for item in filter(None, spec.split(",")):
        ab_name, sep, envs = item.partition(":")
        pairs = [tuple(e.split("=", 1)) for e in envs.split("+")] if sep else []
        if not ab_name or not pairs or any(len(p_) != 2 or not p_[0] for p_ in pairs):
            raise SystemExit(f"bad A/B variant {item!r}: expected NAME:ENV=VALUE[+ENV=VALUE]")
        out.append((ab_name, pairs))
    return out


def set_env(pairs, on):
    for k_, v_ in pairs:
        if on:
            os.environ[k_] = v_
        else:
            os.environ.pop(k_, None)


def turns(contenders, budget_s=1.5, per_visit=2, warm=0, min_rounds=8, max_rounds=60):
    """Timing that a power-capped card cannot bias between contenders. On the H200 and the H100
    the benchmark runs at the 700 W cap and the SM clock hunts between ~1350 and ~1980 MHz within
    a fraction of a second (gpu-clocks.csv from device_run.sh, clock event reason 0x4), and one
    contender timed alone, a few seconds after another, came out up to 15% apart from itself
    (2026-12-05T223517Z, H100: the 1.3B backward 2.577 ms alone, 2.248 ms in turns). Here the
    contenders ([(name, fn, env pairs)]) take turns: `warm` untimed calls then `per_visit` calls
    each bracketed by its own CUDA events, all enqueued back to back (launchers read their
    environment knobs per call), the order rotated each round. Returns {name: (median, p25,
    p75, calls)} in ms."""
    t_round = 0.0
    for _, fn, pairs in contenders:
        set_env(pairs, True)
        t_round += timed(fn, min_iters=2, max_iters=3, budget_s=0.01, warmup=1) * (per_visit + warm)
        set_env(pairs, False)
    rounds = int(min(max_rounds, max(min_rounds, budget_s * 1e3 / max(t_round, 1e-3))))
    ev = {name: [] for name, _, _ in contenders}
    n = len(contenders)
    for r in range(rounds):
        for j in range(n):
            name, fn, pairs = contenders[(j + r) % n]
            set_env(pairs, True)
            for _ in range(warm):
                fn()
            for _ in range(per_visit):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                ev[name].append((a, b))
            set_env(pairs, False)
    torch.cuda.synchronize()
    out = {}
    for name, pairs_ in ev.items():
        t = sorted(a.elapsed_time(b) for a, b in pairs_)
        m = len(t)
        out[name] = (t[m // 2], t[m // 4], t[(3 * m) // 4], m)
    return out


def add_speedups(row):
    """Ours against cuDNN and Flex, forward and backward, into a case row: `speedup_<kind>_vs_<base>`
    from the headline numbers, and `speedup_<kind>_vs_<base>_solo` from each contender timed alone
    (`*_solo_ms`, present when the headline is in turns). Both are kept because turns are not
    neutral between contenders of very different lengths: a short call inherits the clock a long
    one left at the power cap (kernels/NOTES.md, "Eleventh session")."""
    for kind in ("fwd", "bwd"):
        for base in ("cudnn", "flex"):
            if f"{base}_{kind}_ms" in row:
                row[f"speedup_{kind}_vs_{base}"] = row[f"{base}_{kind}_ms"] / row[f"ours_{kind}_ms"]
            if f"{base}_{kind}_solo_ms" in row and f"ours_{kind}_solo_ms" in row:
                row[f"speedup_{kind}_vs_{base}_solo"] = row[f"{base}_{kind}_solo_ms"] / row[f"ours_{kind}_solo_ms"]
    return row


def alternating(fn, variants, budget_s=1.5):
    """A/B of environment variants of one call ([(name, env pairs)], default first) in turns
    (see turns()): every two calls the next variant."""
    return turns([(name, fn, pairs) for name, pairs in variants], budget_s)


def fmt_q(q):
    return f"{q[0]:.3f} ms (IQR {q[1]:.3f}-{q[2]:.3f}, {q[3]} calls)"


class Nvml:
    """Energy and SM clock through NVML (libnvidia-ml from the driver, by ctypes: no Python
    package needed). Under a power cap a kernel's time follows its energy, so --energy records
    joules per call and the mean SM clock for ours and cuDNN."""

    def __init__(self):
        import ctypes
        self.c = ctypes
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit failed")
        self.h = ctypes.c_void_p()
        bus = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "pci_bus_id", None)
        ok = False
        if bus is not None:
            ok = self.lib.nvmlDeviceGetHandleByPciBusId_v2(str(bus).encode(), ctypes.byref(self.h)) == 0
        if not ok and self.lib.nvmlDeviceGetHandleByIndex_v2(torch.cuda.current_device(), ctypes.byref(self.h)) != 0:
            raise RuntimeError("no NVML handle")

    def energy_mj(self):
        v = self.c.c_ulonglong()
        self.lib.nvmlDeviceGetTotalEnergyConsumption(self.h, self.c.byref(v))
        return v.value

    def sm_mhz(self):
        v = self.c.c_uint()
        self.lib.nvmlDeviceGetClockInfo(self.h, 1, self.c.byref(v))  # NVML_CLOCK_SM
        return v.value

    def measure(self, fn, seconds=1.0):
        """Calls enqueued back to back for ~seconds: joules per call, mean watts, ms per call, mean
        SM clock (sampled every 5 ms by a thread)."""
        import threading
        import time
        t1 = timed(fn, min_iters=3, max_iters=5, budget_s=0.05)
        n = max(5, int(seconds * 1e3 / max(t1, 1e-3)))
        clocks, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                clocks.append(self.sm_mhz())
                time.sleep(0.005)
        torch.cuda.synchronize()
        th = threading.Thread(target=sample)
        th.start()
        e0, w0 = self.energy_mj(), time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        e1, w1 = self.energy_mj(), time.perf_counter()
        stop.set()
        th.join()
        j = (e1 - e0) / 1e3
        return {"j_per_call": j / n, "watts": j / (w1 - w0), "ms_per_call": (w1 - w0) * 1e3 / n, "calls": n,
                "sm_mhz": statistics.mean(clocks) if clocks else None}


def structured_qk(B, L, H, D, seed, dev="cuda"):
    """Block-smooth Q/K with a shared sink direction plus noise (peaked and flat rows)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    coarse = 192
    nc = (L + coarse - 1) // coarse
    cq = torch.randn(B, nc, H, D, generator=g, device=dev).repeat_interleave(coarse, 1)[:, :L]
    ck = torch.randn(B, nc, H, D, generator=g, device=dev).repeat_interleave(coarse, 1)[:, :L]
    sink = torch.randn(1, 1, H, D, generator=g, device=dev)
    q = cq + 0.7 * ck + 0.6 * torch.randn(B, L, H, D, generator=g, device=dev) + 0.5 * sink
    k = ck + 0.6 * torch.randn(B, L, H, D, generator=g, device=dev)
    k[:, :32] += 2.0 * sink
    return q.bfloat16().contiguous(), k.bfloat16().contiguous()


def achieved_sparsity(counts, indices, L, bq, bk):
    nq, nk = indices.shape[-2], indices.shape[-1]
    kc = torch.clamp(L - torch.arange(nk, device=indices.device) * bk, max=bk).double()
    qr = torch.clamp(L - torch.arange(nq, device=indices.device) * bq, max=bq).double()
    idx = indices.long()
    cols = torch.where(idx >= 0, kc[idx.clamp(min=0)], torch.zeros((), dtype=torch.double, device=idx.device)).sum(-1)
    return 1.0 - ((cols * qr).sum(-1) / (L * L)).mean().item()


_knob_cache = {}


def predict(q, k, mode, topk, topp, bq, bk, transposed=True):
    # Knob tensors are made once per setting, as a server does once per request: the timed call
    # is then the op alone, without pageable host-to-device copies. transposed=False: the
    # inference mask (no transposed LUT, which only the backward pass reads).
    key = (mode, topk, topp)
    if key not in _knob_cache:
        dev = q.device
        _knob_cache[key] = (torch.tensor([mode], dtype=torch.int32, device=dev),
                            torch.tensor([topk], dtype=torch.float32, device=dev),
                            torch.tensor([topp], dtype=torch.float32, device=dev))
    m, tk, tp = _knob_cache[key]
    return torch.ops.sparge.predict_block_mask(q, k, m, tk, tp, bq, bk, transposed)


def calibrate(q, k, target, topp, bq, bk):
    """Bisect the hybrid top-k fraction (at a fixed top-p) until the achieved sparsity hits target."""
    L = q.shape[1]
    lo, hi = 0.0, 1.0 - target
    best = None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        c, i, tc, ti = predict(q, k, MODE_HYBRID, mid, topp, bq, bk)
        s = achieved_sparsity(c, i, L, bq, bk)
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (mid, s)
        if s > target:
            lo = mid
        else:
            hi = mid
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--shapes", default="wan1.3B-480p,wan14B-720p")
    ap.add_argument("--sparsities", default="0.90,0.95,0.97")
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--topp", type=float, default=0.3)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--bwd-ab", default="",
                    help="extra backward variants timed in the same process, NAME:ENV=VALUE[+ENV=VALUE],... "
                         "(recorded as ours_bwd_NAME_ms), e.g. red:SPARGE_BWD_DQ=red")
    ap.add_argument("--fwd-ab", default="",
                    help="forward variants (mask prediction + attention) timed in the same process, "
                         "NAME:ENV=VALUE[+ENV=VALUE],...; the default and the variants take turns "
                         "(medians recorded as ours_fwd_NAME_ms, mask_NAME_ms and "
                         "ours_fwd_default_interleaved_ms), e.g. tile64:SPARGE_FWD_TILE=64")
    ap.add_argument("--ab-budget", type=float, default=1.5,
                    help="seconds of GPU time per shape for each --fwd-ab / --bwd-ab comparison: the "
                         "default and the variants take turns every two calls (see alternating())")
    ap.add_argument("--energy", action="store_true",
                    help="also measure joules per call and the mean SM clock (NVML) of ours and cuDNN, "
                         "~1 s of back-to-back calls each (recorded as energy)")
    ap.add_argument("--solo", action="store_true",
                    help="headline numbers from each contender timed alone (the method before "
                         "2026-12-05T23); default: ours, cuDNN and Flex in turns (turns())")
    ap.add_argument("--turns-budget", type=float, default=3.0,
                    help="seconds of GPU time per case for the headline timing in turns")
    ap.add_argument("--timing", choices=["stream", "sync"], default="stream",
                    help="stream: calls enqueued back to back (default); sync: synchronise after each call")
    ap.add_argument("--profile", action="store_true", help="print per-kernel CUDA times at each sparsity")
    ap.add_argument("--no-alt", action="store_true",
                    help="skip the A/B forward kernels (mma.sync, cp.async) and the mma.sync backward")
    args = ap.parse_args()
    global SYNC_TIMING
    SYNC_TIMING = args.timing == "sync"
    torch.ops.load_library(args.lib)
    nvml = None
    if args.energy:
        try:
            nvml = Nvml()
        except Exception as e:  # noqa: BLE001
            print(f"--energy: NVML unavailable ({e}); skipped", flush=True)
    card = torch.cuda.get_device_name()
    # SPARGE_COMMIT first: the GPU machine's copy may carry no .git or a stale one.
    commit = os.environ.get("SPARGE_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except Exception:  # noqa: BLE001
            commit = "unknown"
    # The kernels' environment knobs in force for every call (A/B variants add theirs per call).
    knobs = {k_: v_ for k_, v_ in sorted(os.environ.items()) if k_.startswith(("SPARGE_BWD_", "SPARGE_FWD_", "SPARGE_MASK_"))}
    print(f"torch {torch.__version__} {card} commit {commit}" + (f" knobs {knobs}" if knobs else ""), flush=True)
    shapes = {"wan1.3B-480p": (12, 32760), "wan14B-720p": (40, 75600)}
    B, D, bq, bk = 1, 128, 128, args.block_k
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    cases = []
    for name in args.shapes.split(","):
        H, L = shapes[name]
        q, k = structured_qk(B, L, H, D, seed=L)
        gen = torch.Generator(device="cuda").manual_seed(1)
        v = torch.randn(B, L, H, D, generator=gen, device="cuda").bfloat16()
        g = torch.randn(B, L, H, D, generator=gen, device="cuda").bfloat16()
        scale = 1.0 / math.sqrt(D)
        # Dense references on head-major copies (what SDPA is fastest on).
        qh, kh, vh, gh = (t.transpose(1, 2).contiguous() for t in (q, k, v, g))
        dense = {}
        dense_energy = {}
        for be, bn in [(SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")]:
            try:
                with sdpa_kernel([be]):
                    dense[f"{bn}_fwd_ms"] = timed(lambda: F.scaled_dot_product_attention(qh, kh, vh))
                    qg, kg, vg = (t.detach().requires_grad_() for t in (qh, kh, vh))
                    o = F.scaled_dot_product_attention(qg, kg, vg)
                    dense[f"{bn}_bwd_ms"] = timed(lambda: torch.autograd.grad(o, (qg, kg, vg), gh, retain_graph=True))
                    if nvml is not None and bn == "cudnn":
                        dense_energy = {
                            "cudnn_fwd": nvml.measure(lambda: F.scaled_dot_product_attention(qh, kh, vh)),
                            "cudnn_bwd": nvml.measure(
                                lambda: torch.autograd.grad(o, (qg, kg, vg), gh, retain_graph=True))}
                        print(f"{name} energy: {dense_energy}", flush=True)
                    del o, qg, kg, vg
            except Exception as e:  # noqa: BLE001
                print(f"{name} {bn} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            torch.cuda.empty_cache()
        print(f"{name} dense: " + " ".join(f"{k_}={v_:.2f}" for k_, v_ in dense.items()), flush=True)
        # Our dense mode (all blocks kept) against cuDNN.
        cD, iD, tcD, tiD = predict(q, k, MODE_DENSE, 0.0, 0.0, bq, bk)
        ours_dense_fwd = timed(lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, cD, iD, bq, bk, scale))
        ours_dense_fwd_mma = None
        if not args.no_alt:
            os.environ["SPARGE_FWD_IMPL"] = "mma"
            ours_dense_fwd_mma = timed(lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, cD, iD, bq, bk, scale))
            del os.environ["SPARGE_FWD_IMPL"]
            print(f"{name} ours dense-mode fwd mma.sync {ours_dense_fwd_mma:.2f} ms", flush=True)
        alt_tile = "" if args.no_alt else "1"  # FwdParams::pipelined: the cp.async kernel, for A/B
        ours_dense_fwd_alt = None
        if alt_tile:
            os.environ["SPARGE_FWD_PIPELINED"] = alt_tile
            ours_dense_fwd_alt = timed(lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, cD, iD, bq, bk, scale))
            del os.environ["SPARGE_FWD_PIPELINED"]
            print(f"{name} ours dense-mode fwd cp.async kernel (SPARGE_FWD_PIPELINED=1) {ours_dense_fwd_alt:.2f} ms", flush=True)
        print(f"{name} ours dense-mode fwd {ours_dense_fwd:.2f} ms ({dense.get('cudnn_fwd_ms', float('nan')) / ours_dense_fwd:.2f}x cuDNN)", flush=True)
        # The --fwd-ab variants in dense mode too (a variant must not lose there either).
        dense_ab = {}
        for ab_name, pairs in parse_ab(args.fwd_ab):
            set_env(pairs, True)
            dense_ab[f"ours_dense_mode_fwd_{ab_name}_ms"] = timed(
                lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, cD, iD, bq, bk, scale))
            set_env(pairs, False)
            print(f"{name} ours dense-mode fwd variant {ab_name}: "
                  f"{dense_ab[f'ours_dense_mode_fwd_{ab_name}_ms']:.2f} ms", flush=True)
        del cD, iD, tcD, tiD
        torch.cuda.empty_cache()
        for target in [float(s) for s in args.sparsities.split(",")]:
            topk, sp = calibrate(q, k, target, args.topp, bq, bk)
            c, i, tc, ti = predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk)
            # Forward = inference: the mask without its transposed LUT (the engine's inference
            # path); the training forward (with it) is recorded as ours_fwd_train_ms / mask_train_ms.
            attn_ms = timed(lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c, i, bq, bk, scale))
            attn_mma_ms = bwd_mma_ms = None
            if not args.no_alt:
                os.environ["SPARGE_FWD_IMPL"] = "mma"
                attn_mma_ms = timed(lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c, i, bq, bk, scale))
                del os.environ["SPARGE_FWD_IMPL"]
            attn_alt_ms = None
            if alt_tile:
                os.environ["SPARGE_FWD_PIPELINED"] = alt_tile
                attn_alt_ms = timed(lambda: torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c, i, bq, bk, scale))
                del os.environ["SPARGE_FWD_PIPELINED"]

            def ours_fwd():
                c_, i_, _, _ = predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk, False)
                return torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c_, i_, bq, bk, scale)

            def ours_fwd_train():
                c_, i_, _, _ = predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk)
                return torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c_, i_, bq, bk, scale)

            # Inference and training variants interleaved for three rounds (medians): timed one
            # after the other, the first one measured came out up to 4% slower at 14B.
            rounds = {"mask": [], "mask_train": [], "fwd": [], "fwd_train": []}
            for _ in range(3):
                rounds["mask"].append(timed(lambda: predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk, False)))
                rounds["mask_train"].append(timed(lambda: predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk)))
                rounds["fwd"].append(timed(ours_fwd))
                rounds["fwd_train"].append(timed(ours_fwd_train))
            mask_ms, mask_train_ms, fwd_ms, fwd_train_ms = (
                statistics.median(rounds[key]) for key in ("mask", "mask_train", "fwd", "fwd_train"))
            fwd_ab = {}
            if args.fwd_ab:
                ref_o = ours_fwd()[0]
                variants = [("default", [])] + parse_ab(args.fwd_ab)
                fq = alternating(ours_fwd, variants, args.ab_budget)
                mq = alternating(lambda: predict(q, k, MODE_HYBRID, topk, args.topp, bq, bk, False), variants,
                                 args.ab_budget / 2)
                for ab_name, pairs in variants[1:]:
                    set_env(pairs, True)
                    o_ab = ours_fwd()[0]
                    set_env(pairs, False)
                    fwd_ab[f"ours_fwd_{ab_name}_ms"] = fq[ab_name][0]
                    fwd_ab[f"ours_fwd_{ab_name}_iqr_ms"] = list(fq[ab_name][1:3])
                    fwd_ab[f"mask_{ab_name}_ms"] = mq[ab_name][0]
                    fwd_ab[f"fwd_{ab_name}_vs_default_maxabs"] = (o_ab.float() - ref_o.float()).abs().max().item()
                    print(f"{name} {target:.2f} fwd variant {ab_name}: {fmt_q(fq[ab_name])}, mask {fmt_q(mq[ab_name])}, "
                          f"max |diff| to default {fwd_ab[f'fwd_{ab_name}_vs_default_maxabs']}", flush=True)
                fwd_ab["ours_fwd_default_interleaved_ms"] = fq["default"][0]
                fwd_ab["ours_fwd_default_interleaved_iqr_ms"] = list(fq["default"][1:3])
                fwd_ab["mask_default_interleaved_ms"] = mq["default"][0]
                print(f"{name} {target:.2f} fwd default alternating: {fmt_q(fq['default'])}, mask {fmt_q(mq['default'])}",
                      flush=True)
                del ref_o
            o, lse = torch.ops.sparge.block_sparse_attention_fwd(q, k, v, c, i, bq, bk, scale)
            def ours_bwd():
                return torch.ops.sparge.block_sparse_attention_bwd(g, q, k, v, o, lse, c, i, tc, ti, bq, bk, scale)

            bwd_ms = timed(ours_bwd)  # default: the fused backward (v10) on 128-wide key blocks
            # A/B in the same process: the v9 fused kernel (cp.async loads, lock-step warpgroups).
            os.environ["SPARGE_BWD_IMPL"] = "v9"
            bwd_v9_ms = timed(ours_bwd)
            del os.environ["SPARGE_BWD_IMPL"]
            bwd_ab = {}
            ref_grads = ours_bwd() if args.bwd_ab else None
            if args.bwd_ab:
                variants = [("default", [])] + parse_ab(args.bwd_ab)
                bq_ = alternating(ours_bwd, variants, args.ab_budget)
                for ab_name, pairs in variants[1:]:
                    set_env(pairs, True)
                    grads_ab = ours_bwd()
                    set_env(pairs, False)
                    bwd_ab[f"ours_bwd_{ab_name}_ms"] = bq_[ab_name][0]
                    bwd_ab[f"ours_bwd_{ab_name}_iqr_ms"] = list(bq_[ab_name][1:3])
                    bwd_ab[f"bwd_{ab_name}_vs_default_relerr"] = {
                        n_: ((a_.float() - b_.float()).norm() / b_.float().norm()).item()
                        for n_, a_, b_ in zip(("dq", "dk", "dv"), grads_ab, ref_grads)}
                    del grads_ab
                    print(f"{name} {target:.2f} bwd variant {ab_name}: {fmt_q(bq_[ab_name])}, "
                          f"rel. diff to default {bwd_ab[f'bwd_{ab_name}_vs_default_relerr']}", flush=True)
                bwd_ab["ours_bwd_default_interleaved_ms"] = bq_["default"][0]
                bwd_ab["ours_bwd_default_interleaved_iqr_ms"] = list(bq_["default"][1:3])
                print(f"{name} {target:.2f} bwd default alternating: {fmt_q(bq_['default'])}", flush=True)
            del ref_grads
            # A/B in the same process: the deterministic two-kernel backward (v4..v8 default).
            os.environ["SPARGE_BWD_IMPL"] = "split"
            bwd_split_ms = timed(ours_bwd)
            grads_split = ours_bwd()
            del os.environ["SPARGE_BWD_IMPL"]
            grads = ours_bwd()
            bwd_split_relerr = {n_: ((a_.float() - b_.float()).norm() / b_.float().norm()).item()
                                for n_, a_, b_ in zip(("dq", "dk", "dv"), grads, grads_split)}
            del grads, grads_split
            print(f"{name} {target:.2f} bwd fused {bwd_ms:.3f} ms, v9 {bwd_v9_ms:.3f} ms, split {bwd_split_ms:.3f} ms "
                  f"({bwd_split_ms / bwd_ms:.2f}x); fused vs split rel. diff {bwd_split_relerr}", flush=True)
            if not args.no_alt:
                os.environ["SPARGE_FWD_IMPL"] = "mma"
                bwd_mma_ms = timed(ours_bwd)
                del os.environ["SPARGE_FWD_IMPL"]
            if nvml is not None:
                energy = dict(dense_energy)
                energy["ours_fwd"] = nvml.measure(ours_fwd)
                energy["ours_bwd"] = nvml.measure(ours_bwd)
                for what in ("fwd", "bwd"):
                    if f"cudnn_{what}" in energy:
                        energy[f"energy_ratio_{what}_vs_cudnn"] = (energy[f"cudnn_{what}"]["j_per_call"] /
                                                                   max(energy[f"ours_{what}"]["j_per_call"], 1e-12))
                print(f"{name} {target:.2f} energy: {energy}", flush=True)
            row_trace = {}
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        ours_fwd()
                        torch.ops.sparge.block_sparse_attention_bwd(g, q, k, v, o, lse, c, i, tc, ti, bq, bk, scale)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
                # Where the forward's time goes between kernels: GPU span, kernel time and idle
                # gaps of 5 back-to-back forwards (mask prediction + attention), from a trace.
                import tempfile
                sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))
                from summarize_trace import summarize
                # The same for 5 back-to-back backwards (per-gap timelines: trace_bwd.py).
                for what, fn in (("fwd", ours_fwd), ("bwd", ours_bwd)):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof_one:
                        for _ in range(5):
                            fn()
                        torch.cuda.synchronize()
                    with tempfile.NamedTemporaryFile(suffix=".json") as tf:
                        prof_one.export_chrome_trace(tf.name)
                        st = summarize(tf.name)
                    row_trace[f"{what}_x5_trace_ms"] = {k_: st[k_] for k_ in ("gpu_span_ms", "total_kernel_ms", "gpu_idle_ms")}
                    print(f"{name} {target:.2f} {what} x5 trace: GPU span {st['gpu_span_ms']:.3f} ms, kernels "
                          f"{st['total_kernel_ms']:.3f} ms, idle {st['gpu_idle_ms']:.3f} ms", flush=True)
            row = dict(name=name, sparsity=round(sp, 4), target_sparsity=target, topk=topk, topp=args.topp,
                       timing=args.timing,
                       block_q=bq, block_k=bk, B=B, H=H, L=L, D=D, dtype="bf16",
                       ours_fwd_ms=fwd_ms, ours_fwd_train_ms=fwd_train_ms, mask_train_ms=mask_train_ms,
                       ours_attn_fwd_ms=attn_ms, ours_attn_fwd_mma_ms=attn_mma_ms, ours_attn_fwd_pipelined_ms=attn_alt_ms, ours_bwd_ms=bwd_ms, ours_bwd_split_ms=bwd_split_ms, ours_bwd_v9_ms=bwd_v9_ms, bwd_fused_vs_split_relerr=bwd_split_relerr, ours_bwd_mma_ms=bwd_mma_ms, mask_ms=mask_ms,
                       ours_dense_mode_fwd_ms=ours_dense_fwd, ours_dense_mode_fwd_mma_ms=ours_dense_fwd_mma, ours_dense_mode_fwd_pipelined_ms=ours_dense_fwd_alt, card=card, commit=commit)
            row.update(dense)
            row.update(bwd_ab)
            row.update(fwd_ab)
            row.update(row_trace)
            if nvml is not None:
                row["energy"] = energy
            row.update(dense_ab)
            flex_fns = {}
            if flex is not None:
                try:
                    from torch.nn.attention.flex_attention import BlockMask
                    bm = BlockMask.from_kv_blocks(c, i.clamp(min=0), BLOCK_SIZE=(bq, bk), seq_lengths=(L, L))
                    fo = flex(qh, kh, vh, block_mask=bm, scale=scale)
                    row["flex_vs_ours_relerr"] = ((fo.transpose(1, 2).float() - o.float()).norm() / fo.float().norm()).item()
                    row["flex_fwd_ms"] = timed(lambda: flex(qh, kh, vh, block_mask=bm, scale=scale))
                    qg, kg, vg = (t.detach().requires_grad_() for t in (qh, kh, vh))
                    fo = flex(qg, kg, vg, block_mask=bm, scale=scale)
                    row["flex_bwd_ms"] = timed(lambda: torch.autograd.grad(fo, (qg, kg, vg), gh, retain_graph=True))
                    flex_fns = {"flex_fwd": lambda: flex(qh, kh, vh, block_mask=bm, scale=scale),
                                "flex_bwd": lambda: torch.autograd.grad(fo, (qg, kg, vg), gh, retain_graph=True)}
                except Exception as e:  # noqa: BLE001
                    print(f"{name} flex failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if not args.solo:
                # The headline numbers: every contender in turns (turns()), one untimed call at the
                # start of each visit (the caches are the previous contender's), medians. The
                # numbers each contender got timed alone stay as *_solo_ms.
                contenders = [("ours_fwd", ours_fwd, []), ("ours_bwd", ours_bwd, [])]
                try:
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        qc, kc, vc = (t.detach().requires_grad_() for t in (qh, kh, vh))
                        oc = F.scaled_dot_product_attention(qc, kc, vc)

                    def cudnn_fwd():
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            return F.scaled_dot_product_attention(qh, kh, vh)
                    contenders += [("cudnn_fwd", cudnn_fwd, []),
                                   ("cudnn_bwd", lambda: torch.autograd.grad(oc, (qc, kc, vc), gh, retain_graph=True), [])]
                except Exception as e:  # noqa: BLE001
                    print(f"{name} cuDNN in turns failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                contenders += [(n_, f_, []) for n_, f_ in flex_fns.items()]
                tq = turns(contenders, budget_s=args.turns_budget, per_visit=2, warm=1, min_rounds=6, max_rounds=40)
                for n_, q_ in tq.items():
                    if f"{n_}_ms" in row:
                        row[f"{n_}_solo_ms"] = row[f"{n_}_ms"]
                    row[f"{n_}_ms"] = q_[0]
                    row[f"{n_}_iqr_ms"] = list(q_[1:3])
                row["timing"] = "turns"
                print(f"{name} {target:.2f} in turns: " + ", ".join(f"{n_} {fmt_q(q_)}" for n_, q_ in tq.items()), flush=True)
                del contenders
                qc = kc = vc = oc = None
            flex_fns = {}
            fo = qg = kg = vg = bm = None
            add_speedups(row)
            if "cudnn_bwd_ms" in row:
                row["split_bwd_speedup_vs_cudnn"] = row["cudnn_bwd_ms"] / bwd_split_ms
            if "flex_bwd_ms" in row:
                row["split_bwd_speedup_vs_flex"] = row["flex_bwd_ms"] / bwd_split_ms
            if "flex_fwd_ms" in row:  # attention kernel alone (default) and the A/B kernel
                row["attn_speedup_vs_flex"] = row["flex_fwd_ms"] / attn_ms
                if attn_alt_ms is not None:
                    row["pipelined_attn_speedup_vs_flex"] = row["flex_fwd_ms"] / attn_alt_ms
            if "cudnn_fwd_ms" in row:
                row["mask_pct_of_cudnn_fwd"] = 100.0 * mask_ms / row["cudnn_fwd_ms"]
                row["train_fwd_speedup_vs_cudnn"] = row["cudnn_fwd_ms"] / fwd_train_ms
            cases.append(row)
            print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}), flush=True)
            del c, i, tc, ti, o, lse
            torch.cuda.empty_cache()
        del q, k, v, g, qh, kh, vh, gh
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    slug = card.replace(" ", "-").replace("/", "-")
    base = os.path.join(args.out, f"{slug}-{stamp}{args.tag}")
    with open(base + ".json", "w") as f:
        json.dump({"card": card, "commit": commit, "date": stamp, "torch": torch.__version__, "knobs": knobs,
                   "cases": cases}, f, indent=1)
    print("wrote", base + ".json", flush=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, kind in zip(axes, ("fwd", "bwd")):
            for name in sorted({c_["name"] for c_ in cases}):
                rows = [c_ for c_ in cases if c_["name"] == name]
                xs = [100 * r["sparsity"] for r in rows]
                for ref, style in (("cudnn", "o-"), ("flex", "s--")):
                    key = f"speedup_{kind}_vs_{ref}"
                    if all(key in r for r in rows):
                        ax.plot(xs, [r[key] for r in rows], style, label=f"{name} vs {ref}")
            ax.set_xlabel("attention sparsity (%)")
            ax.set_ylabel("speedup (x)")
            ax.set_title(f"{kind} ({card})")
            ax.grid(True)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=110)
        print("wrote", base + ".png", flush=True)
    except Exception as e:  # noqa: BLE001
        print("plot failed:", e, flush=True)
    print("\nname sparsity ours_fwd mask attn bwd | cudnn_fwd cudnn_bwd flex_fwd flex_bwd | x_fwd_cudnn x_bwd_cudnn x_fwd_flex x_bwd_flex")
    for r in cases:
        print(f"{r['name']} {r['sparsity']:.3f} {r['ours_fwd_ms']:.3f} {r['mask_ms']:.3f} {r['ours_attn_fwd_ms']:.3f} {r['ours_bwd_ms']:.3f} | "
              f"{r.get('cudnn_fwd_ms', float('nan')):.2f} {r.get('cudnn_bwd_ms', float('nan')):.2f} {r.get('flex_fwd_ms', float('nan')):.3f} {r.get('flex_bwd_ms', float('nan')):.3f} | "
              f"{r.get('speedup_fwd_vs_cudnn', float('nan')):.2f} {r.get('speedup_bwd_vs_cudnn', float('nan')):.2f} {r.get('speedup_fwd_vs_flex', float('nan')):.2f} {r.get('speedup_bwd_vs_flex', float('nan')):.2f}")
    if any("speedup_bwd_vs_cudnn_solo" in r for r in cases):
        print("each contender timed alone: name sparsity | x_fwd_cudnn x_bwd_cudnn x_fwd_flex x_bwd_flex")
        for r in cases:
            print(f"{r['name']} {r['sparsity']:.3f} | " + " ".join(
                f"{r.get(f'speedup_{k}_solo', float('nan')):.2f}"
                for k in ("fwd_vs_cudnn", "bwd_vs_cudnn", "fwd_vs_flex", "bwd_vs_flex")))


if __name__ == "__main__":
    sys.exit(main())
