"""L2 traffic model of the fused backward's work order (CPU only; no GPU needed).

The fused backward (kernels/block_sparse_bwd_sm90.cu) is partly DRAM-bound on the H100: the CTAs
working on one head touch its Q, dO and fp32 dQ accumulator, more than the L2 keeps (NOTES.md,
"H100 runs of 2026-12-05"). This script replays a work order against an L2 model to compare
orders and item splits before spending GPU time on them:

* masks: the benchmark's structured Q/K (bench_sparge.structured_qk, drawn on the CPU) and the
  CPU mask predictor of libsparge_ops.so, calibrated to the target sparsity like the benchmark;
* timing: persistent CTAs (one per SM) take items from the list in order (the kernel's atomic
  counter); an item costs `item_overhead` plus one unit per 64-row query tile;
* accesses per (item, query tile): Q and dO tiles (16 KB each, bf16, D = 128), LSE/delta (512 B),
  and a read-modify-write of the 64 x 128 fp32 accumulator tile (32 KB); per item K and V
  (32 KB each) and the dK/dV stores (64 KB, write-allocate);
* L2: LRU over whole tiles with `--l2-mb` of capacity; a missed load reads DRAM, a missed
  reduction reads the line and leaves it dirty, a dirty eviction writes DRAM. Optional
  evict-first (Q/dO) / evict-last (accumulator) classes approximate the v11b hints.

The model is calibrated by the ncu measurements of the v10 kernel on the H100 (DRAM read / write
3.40 / 1.82 GB at 1.3B, 72.3 / 37.4 GB at 14B, 95%): `--calibrate` prints the model's numbers
for a range of capacities next to them.

Usage: .venv/bin/python bench/kernels/l2_model.py --lib build/engine/ops/libsparge_ops.so
           [--shapes wan1.3B-480p] [--orders current,head,split2] [--l2-mb 50] [--out file.json]
"""
import argparse
import collections
import heapq
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

MODE_HYBRID = 2
TILE_Q = 64
SHAPES = {"wan1.3B-480p": (12, 32760), "wan14B-720p": (40, 75600)}
# ncu on the H100 (GB DRAM read, write) by SPARGE_BWD_L2HINT level: v10 (0) and v11b (1, 2).
MEASURED_H100_V10 = {"wan1.3B-480p": {0: (3.40, 1.82), 1: (3.40, 1.78), 2: (3.52, 1.43)},
                     "wan14B-720p": {0: (72.3, 37.4)}}

# Tile sizes in bytes (bf16, D = 128).
QB = 64 * 128 * 2
ACCB = 64 * 128 * 4
LDB = 512
KVB = 128 * 128 * 2


def structured_qk(B, L, H, D, seed):
    """bench_sparge.structured_qk drawn on the CPU (same construction, other random numbers)."""
    g = torch.Generator().manual_seed(seed)
    coarse = 192
    nc = (L + coarse - 1) // coarse
    cq = torch.randn(B, nc, H, D, generator=g).repeat_interleave(coarse, 1)[:, :L]
    ck = torch.randn(B, nc, H, D, generator=g).repeat_interleave(coarse, 1)[:, :L]
    sink = torch.randn(1, 1, H, D, generator=g)
    q = cq + 0.7 * ck + 0.6 * torch.randn(B, L, H, D, generator=g) + 0.5 * sink
    k = ck + 0.6 * torch.randn(B, L, H, D, generator=g)
    k[:, :32] += 2.0 * sink
    return q.bfloat16().contiguous(), k.bfloat16().contiguous()


def hybrid_mask(q, k, target, topp, bq, bk):
    """Transposed LUT (per key block, the query blocks keeping it) of the calibrated hybrid mask."""
    L = q.shape[1]

    def predict(topk):
        return torch.ops.sparge.predict_block_mask(
            q, k, torch.tensor([MODE_HYBRID], dtype=torch.int32), torch.tensor([topk]),
            torch.tensor([topp]), bq, bk, True)

    def sparsity(c, i):
        nq, nk = i.shape[-2], i.shape[-1]
        kc = torch.clamp(L - torch.arange(nk) * bk, max=bk).double()
        qr = torch.clamp(L - torch.arange(nq) * bq, max=bq).double()
        idx = i.long()
        cols = torch.where(idx >= 0, kc[idx.clamp(min=0)], torch.zeros((), dtype=torch.double)).sum(-1)
        return 1.0 - ((cols * qr).sum(-1) / (L * L)).mean().item()

    lo, hi, best = 0.0, 1.0 - target, None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        c, i, tc, ti = predict(mid)
        s = sparsity(c, i)
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (mid, s)
        lo, hi = (mid, hi) if s > target else (lo, mid)
    c, i, tc, ti = predict(best[0])
    return tc[0].numpy(), ti[0].numpy(), best[1]


class Item:
    __slots__ = ("h", "kt", "tiles", "first", "last", "chunked")

    def __init__(self, h, kt, tiles, first=True, last=True, chunked=False):
        self.h, self.kt, self.tiles = h, kt, tiles
        self.first, self.last = first, last  # first / last part of its key tile (dK/dV partials)
        self.chunked = chunked  # one of several chunks reducing dK/dV into an fp32 workspace


def make_items(tc, ti, L, bq):
    """One item per (head, 128-key tile) with its 64-row query tiles, in item order."""
    H, nk = tc.shape
    nqt = math.ceil(L / TILE_Q)
    per = bq // TILE_Q
    items = []
    for h in range(H):
        for kt in range(nk):
            qbs = ti[h, kt, :tc[h, kt]]
            tiles = [qb * per + j for qb in qbs for j in range(per) if qb * per + j < nqt]
            items.append(Item(h, kt, tiles))
    return items


def order_current(items, sms, heavy_first=True, tail=True):
    """FusedScheduleKernel: heavy items (count > 2 * mean + 4) first by descending count, the
    others in item order, the last 2 * min(items, SMs) light ones longest-first."""
    counts = [len(it.tiles) for it in items]
    mean_blocks = sum(counts) / len(items) / 2  # the kernel compares query-block counts
    heavy_above = 2 * int(mean_blocks) + 4
    heavy = [it for it, c in zip(items, counts) if heavy_first and c / 2 > heavy_above]
    light = [it for it, c in zip(items, counts) if not (heavy_first and c / 2 > heavy_above)]
    heavy.sort(key=lambda it: -len(it.tiles))
    n_tail = min(len(light), 2 * min(len(items), sms)) if tail else 0
    body, tl = light[:len(light) - n_tail], light[len(light) - n_tail:]
    tl.sort(key=lambda it: -len(it.tiles))
    return heavy + body + tl


def split_items(items, parts, heavy_only_above=None):
    """Items split by query range into `parts` (by tile index: part j holds the tiles in
    [j * nqt / parts, (j + 1) * nqt / parts)); a head's part-0 items come before its part-1 ones.
    heavy_only_above: split only items with more tiles than that (the others stay whole, in the
    head's part of their first tile)."""
    nqt = 1 + max((t for it in items for t in it.tiles), default=0)
    by_head = collections.defaultdict(lambda: [[] for _ in range(parts)])
    for it in items:
        if heavy_only_above is not None and len(it.tiles) <= heavy_only_above:
            p = (it.tiles[0] * parts // nqt) if it.tiles else 0
            by_head[it.h][p].append(it)
            continue
        chunks = [[t for t in it.tiles if t * parts // nqt == j] for j in range(parts)]
        nz = [j for j in range(parts) if chunks[j]] or [0]
        for j in range(parts):
            if chunks[j] or (j == nz[0]):
                by_head[it.h][j].append(Item(it.h, it.kt, chunks[j], j == nz[0], j == nz[-1]))
    out = []
    for h in sorted(by_head):
        for j in range(parts):
            out.extend(by_head[h][j])
    return out


class L2:
    """LRU over whole tiles in three priority classes, evicted in this order: evict-first lines
    (Q, dO, LSE/delta at hint level 2), normal lines, evict-last lines (the accumulator from hint
    level 1), each class least recently used first."""

    def __init__(self, cap, hints=0):
        self.cap, self.hints = cap, hints  # SPARGE_BWD_L2HINT: 1 accumulator evict-last, 2 also Q/dO evict-first
        self.first = collections.OrderedDict()  # key -> (size, dirty)
        self.lru = collections.OrderedDict()
        self.keep = collections.OrderedDict()
        self.used = 0
        self.rd = self.wr = 0
        self.hit = self.miss = 0

    def _evict(self):
        while self.used > self.cap:
            src = self.first if self.first else self.lru if self.lru else self.keep
            _, (size, dirty) = src.popitem(last=False)
            self.used -= size
            if dirty:
                self.wr += size

    def _cls(self, cls):
        if self.hints >= 1 and cls == "last":
            return self.keep
        if self.hints >= 2 and cls == "first":
            return self.first
        return self.lru

    def access(self, key, size, write=False, rmw=False, cls=None):
        d = self._cls(cls)
        if key in d:
            s, dirty = d.pop(key)
            d[key] = (s, dirty or write or rmw)
            self.hit += 1
            return
        self.miss += 1
        if rmw or not write:
            self.rd += size
        d[key] = (size, write or rmw)
        self.used += size
        self._evict()

    def demote(self, key, dirty):
        """A line that is present moves to the evict-first class (hint level 2), e.g. the zeros
        the per-head dQ conversion (`--dq-heads`) stores back over a converted accumulator tile."""
        for d in (self.first, self.lru, self.keep):
            if key in d:
                size, was = d.pop(key)
                self._cls("first")[key] = (size, was or dirty)
                return

    def flush(self):
        for d in (self.first, self.lru, self.keep):
            for size, dirty in d.values():
                if dirty:
                    self.wr += size


def simulate(order, sms, cap, item_overhead=2.0, hints=0, partial_bytes=0, dq_heads=False, nqt=0):
    """Replays `order` on `sms` persistent CTAs; returns DRAM GB read / written and the hit rate.
    partial_bytes: fp32 dK/dV partial per split item that is not its key tile's last part
    (written) or not its first (read back).
    dq_heads (the per-head dQ conversion, SPARGE_BWD_FUSED_DQ=1 of the twelfth session, measured
    +4-7% and removed in the thirteenth; kernels/NOTES.md): once a head's last item has ended, its nqt accumulator tiles
    are converted inside the kernel, spread over one mean item length after it (the CTAs take
    the slices at their next item boundaries): each tile is read (a miss reads DRAM), the zeros
    stored back leave it dirty and evict-first, and its bf16 dQ rows are written (evict-first).
    Without it the model covers the fused kernel alone: the accumulator's zeroing before it and the
    dQ convert after it add their bytes outside (see main)."""
    events = []  # (time, seq, kind, payload)
    heap = [(0.0, c) for c in range(sms)]
    heapq.heapify(heap)
    seq = 0
    for it in order:
        t, c = heapq.heappop(heap)
        events.append((t, seq, 0, it)); seq += 1  # item start: K, V (+ partial read)
        for j, qt in enumerate(it.tiles):
            events.append((t + item_overhead / 2 + j, seq, 1, (it.h, qt))); seq += 1
        end = t + item_overhead + len(it.tiles)
        events.append((end - 0.5, seq, 2, it)); seq += 1  # dK/dV stores (+ partial write)
        heapq.heappush(heap, (end, c))
    makespan = max(t for t, _ in heap)
    if dq_heads:
        done = collections.defaultdict(float)
        for t, _, kind, x in events:
            if kind == 2:
                done[x.h] = max(done[x.h], t + 0.5)
        spread = item_overhead + sum(len(it.tiles) for it in order) / max(1, len(order))
        for h, t_end in done.items():
            for qt in range(nqt):
                events.append((t_end + 1.0 + spread * qt / nqt, seq, 3, (h, qt))); seq += 1
    events.sort(key=lambda e: (e[0], e[1]))
    l2 = L2(cap, hints)
    for _, _, kind, x in events:
        if kind == 1:
            h, qt = x
            l2.access(("q", h, qt), QB, cls="first")
            l2.access(("o", h, qt), QB, cls="first")
            l2.access(("l", h, qt), LDB, cls="first")
            l2.access(("a", h, qt), ACCB, rmw=True, cls="last")
        elif kind == 3:
            h, qt = x
            l2.access(("a", h, qt), ACCB, cls="last")
            l2.demote(("a", h, qt), dirty=True)
            l2.access(("dq", h, qt), QB, write=True, cls="first")
        elif kind == 0:
            l2.access(("k", x.h, x.kt), KVB)
            l2.access(("v", x.h, x.kt), KVB)
            if partial_bytes and not x.first:
                l2.access(("p", x.h, x.kt), partial_bytes)
        else:
            if x.chunked:
                l2.access(("p", x.h, x.kt), 2 * 128 * 128 * 4, rmw=True, cls="last")
            elif partial_bytes and not x.last:
                l2.access(("p", x.h, x.kt), partial_bytes, write=True)
            else:
                l2.access(("dk", x.h, x.kt), KVB, write=True)
                l2.access(("dv", x.h, x.kt), KVB, write=True)
    l2.flush()
    return dict(read_gb=l2.rd / 1e9, write_gb=l2.wr / 1e9,
                hit_rate=l2.hit / max(1, l2.hit + l2.miss), makespan=makespan)


def chunk_items(items, max_tiles):
    """Items with more than max_tiles query tiles become ceil(n / max_tiles) near-equal chunks
    (consecutive runs of their query tiles), kept in place: they run side by side on different
    CTAs at their head's turn and add fp32 dK/dV partials into a workspace."""
    out = []
    for it in items:
        n = len(it.tiles)
        if n <= max_tiles:
            out.append(it)
            continue
        parts = -(-n // max_tiles)
        for j in range(parts):
            out.append(Item(it.h, it.kt, it.tiles[j * n // parts:(j + 1) * n // parts], chunked=True))
    return out


def order_kernel_chunk(items, sms, chunk_blocks, max_slots, sort_median=False):
    """FusedChunkScheduleKernel (SPARGE_BWD_CHUNK=chunk_blocks): key tiles kept by more than
    split_above = max(2 * mean + 4, chunk_blocks) query blocks take slots in item order while
    max_slots and the list's room (3 x items extra entries) last and become ceil(count /
    chunk_blocks) near-equal chunks in place; candidates
    without a slot go first, longest first; the last 2 * min(items, SMs) entries longest-first.
    sort_median: each head's body entries (not the tail) ordered by their median query tile, so
    that concurrently running entries share query tiles (FusedSortScheduleKernel)."""
    per = 2  # 64-row tiles per 128-row query block
    blocks = [-(-len(it.tiles) // per) for it in items]
    split_above = max(2 * (sum(blocks) // len(items)) + 4, chunk_blocks)
    heavy, body, slot, xb, extra = [], [], 0, 0, 3 * len(items)
    for it, c in zip(items, blocks):
        n = -(-c // chunk_blocks)
        if c <= split_above:
            body.append(it)
        elif slot < max_slots and xb + n - 1 <= extra:  # a slot and list room for its chunks
            slot += 1
            xb += n - 1
            for j in range(n):
                lo, hi = j * c // n, (j + 1) * c // n
                body.append(Item(it.h, it.kt, it.tiles[lo * per:hi * per], chunked=True))
        else:
            slot += 1
            xb += n - 1
            heavy.append(it)
    heavy.sort(key=lambda it: -len(it.tiles))
    n_tail = min(len(body), 2 * min(len(items), sms))
    head, tl = body[:len(body) - n_tail], body[len(body) - n_tail:]
    tl.sort(key=lambda it: -len(it.tiles))
    if sort_median:
        head.sort(key=lambda it: (it.h, it.tiles[len(it.tiles) // 2] if it.tiles else 0))
    return heavy + head + tl


ORDERS = {
    "current": lambda items, sms: (order_current(items, sms), 0),
    "no_heavy_first": lambda items, sms: (order_current(items, sms, heavy_first=False), 0),
    "head_only": lambda items, sms: (order_current(items, sms, heavy_first=False, tail=False), 0),
    "split2": lambda items, sms: (order_current(split_items(items, 2), sms, heavy_first=False), 2 * 128 * 128 * 4),
    "split4": lambda items, sms: (order_current(split_items(items, 4), sms, heavy_first=False), 2 * 128 * 128 * 4),
}


def heavy_split(items, sms, parts):
    """Only heavy items (more tiles than 2 * (2 * mean blocks + 4)) split into `parts` query
    ranges; each part runs inside its head in head order (no heavy-first phase)."""
    counts = [len(it.tiles) for it in items]
    heavy_tiles = 2 * (2 * int(sum(counts) / len(items) / 2) + 4)
    return order_current(split_items(items, parts, heavy_only_above=heavy_tiles), sms, heavy_first=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", required=True, help="libsparge_ops.so (CPU mask predictor)")
    ap.add_argument("--shapes", default="wan1.3B-480p")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--topp", type=float, default=0.3)
    ap.add_argument("--sms", type=int, default=132, help="CTAs (SMs): 132 on the H100 SXM and the H200")
    ap.add_argument("--l2-mb", default="50", help="L2 capacities to model, comma separated (MB)")
    ap.add_argument("--orders", default="current,kchunk32,kchunk16,chunk64,no_heavy_first,split2")
    ap.add_argument("--hints", default="0,1,2", help="SPARGE_BWD_L2HINT levels to model (2: v11b default)")
    ap.add_argument("--item-overhead", type=float, default=2.0, help="per-item cost in query-tile units")
    ap.add_argument("--dq-heads", action="store_true",
                    help="also model the removed per-head dQ conversion (SPARGE_BWD_FUSED_DQ=1 of the twelfth "
                         "session: dQ converted per head inside the kernel) and "
                         "compare the whole backward's DRAM bytes with the default's zeroing + kernel + convert")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.ops.load_library(args.lib)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for name in args.shapes.split(","):
        H, L = SHAPES[name]
        t0 = time.time()
        q, k = structured_qk(1, L, H, 128, seed=L)
        tc, ti, sp = hybrid_mask(q, k, args.sparsity, args.topp, 128, 128)
        del q, k
        items = make_items(tc, ti, L, 128)
        tiles = sum(len(it.tiles) for it in items)
        print(f"{name}: sparsity {sp:.4f}, {len(items)} items, {tiles} tile pairs, "
              f"mask {time.time() - t0:.1f} s", flush=True)
        for oname in args.orders.split(","):
            if oname.startswith("kchunk"):  # the kernel's rule, items / 8 + B * H slots; "m": median-sorted
                med = oname.endswith("m")
                order = order_kernel_chunk(items, args.sms, int(oname[6:].rstrip("m")), len(items) // 8 + H, med)
                pbytes = 0
            elif oname.startswith("chunk"):
                order, pbytes = order_current(chunk_items(items, int(oname[5:])), args.sms, heavy_first=False), 0
            elif oname.startswith("heavy_split"):
                order, pbytes = heavy_split(items, args.sms, int(oname[len("heavy_split"):])), 2 * 128 * 128 * 4
            else:
                order, pbytes = ORDERS[oname](items, args.sms)
            for mb in [float(x) for x in args.l2_mb.split(",")]:
                for hints in [int(x) for x in args.hints.split(",")]:
                    r = simulate(order, args.sms, mb * 1e6, args.item_overhead, hints, pbytes)
                    meas = MEASURED_H100_V10.get(name)
                    row = dict(shape=name, sparsity=round(sp, 4), order=oname, l2_mb=mb, hints=hints,
                               items=len(order), **{k_: round(v_, 4) for k_, v_ in r.items()})
                    rows.append(row)
                    if args.dq_heads:
                        # Default: the prep kernel writes the zeroed accumulator, the convert kernel
                        # reads it and writes dQ (bf16), outside the fused kernel.
                        acc_gb = H * math.ceil(L / TILE_Q) * ACCB / 1e9
                        row["default_total_gb"] = round(r["read_gb"] + r["write_gb"] + 2.5 * acc_gb, 4)
                        r1 = simulate(order, args.sms, mb * 1e6, args.item_overhead, hints, pbytes, True,
                                      math.ceil(L / TILE_Q))
                        row["dq_heads"] = {k_: round(v_, 4) for k_, v_ in r1.items()}
                        row["dq_heads_total_gb"] = round(r1["read_gb"] + r1["write_gb"], 4)
                        print(f"  {oname:15s} L2 {mb:5.0f} MB hints {hints}: whole backward DRAM, default "
                              f"{row['default_total_gb']:.2f} GB (kernel {r['read_gb'] + r['write_gb']:.2f} + "
                              f"zeroing, convert {2.5 * acc_gb:.2f}); per-head dQ conversion "
                              f"{row['dq_heads_total_gb']:.2f} GB (read {r1['read_gb']:.2f}, write {r1['write_gb']:.2f})",
                              flush=True)
                    print(f"  {oname:15s} L2 {mb:5.0f} MB hints {hints}: DRAM read {r['read_gb']:.2f} GB "
                          f"write {r['write_gb']:.2f} GB (sum {r['read_gb'] + r['write_gb']:.2f}), "
                          f"hit {r['hit_rate']:.3f}, makespan {r['makespan']:.0f}"
                          + (f"   [ncu H100: {meas[hints][0]:.2f} / {meas[hints][1]:.2f}]"
                             if meas and oname == "current" and hints in meas else ""),
                          flush=True)
    if args.out:
        with open(args.out, "w") as f:
            try:
                commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                 stderr=subprocess.DEVNULL).strip()
            except Exception:  # noqa: BLE001
                commit = "unknown"
            json.dump(dict(model="bench/kernels/l2_model.py", card="model (CPU), calibrated on H100 ncu",
                           commit=commit, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           sms=args.sms, item_overhead=args.item_overhead, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
