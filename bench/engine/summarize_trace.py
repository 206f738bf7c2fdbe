"""Summarizes Kineto/chrome traces of one DiT forward (dit_forward_bench --profile,
diffusers_dit_bench.py --profile): GPU kernel time grouped by kernel name and by category
(attention, GEMM, normalization, elementwise, ...), side by side, plus memory copies and how long
the GPU sat idle inside the forward (span of its activity minus the time covered by kernels,
copies and memsets: host waits and launch gaps show up there). Prints a table and writes JSON.
  python3 summarize_trace.py out.json name=trace.json [name=trace.json ...]"""
import collections
import json
import re
import sys

CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(sdpa|attn)|block_sparse|BlockSparse"),
    ("mask", r"Mask|mask_"),
    ("gemm", r"gemm|sm90_xmma|cutlass|cublas|nvjet|Gemm"),
    ("layernorm_modulate", r"LayerNormModulate"),
    ("rmsnorm_rope", r"RmsNormRope"),
    ("gated_residual", r"GatedResidual"),
    ("norm", r"layer_norm|LayerNorm|rms_norm|RmsNorm|welford"),
    ("reduce", r"reduce_kernel"),
    ("copy_cast", r"copy|Copy|cast|to_copy|CatArray|cat_"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise"),
]


def categorize(name):
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


def summarize(path):
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_name = collections.Counter()
    count = collections.Counter()
    copies = collections.Counter()
    copy_count = collections.Counter()
    intervals = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if cat in ("gpu_memcpy", "gpu_memset", "Memcpy", "Memset"):
            copies[e.get("name", cat)] += e.get("dur", 0) / 1000.0
            copy_count[e.get("name", cat)] += 1
            intervals.append((e.get("ts", 0), e.get("ts", 0) + e.get("dur", 0)))
            continue
        if cat not in ("kernel", "Kernel"):
            continue
        intervals.append((e.get("ts", 0), e.get("ts", 0) + e.get("dur", 0)))
        name = e.get("name", "?")
        by_name[name] += e.get("dur", 0) / 1000.0
        count[name] += 1
    by_cat = collections.Counter()
    for name, ms in by_name.items():
        by_cat[categorize(name)] += ms
    busy = 0.0
    span = 0.0
    if intervals:
        intervals.sort()
        span = max(end for _, end in intervals) - intervals[0][0]
        cur_s, cur_e = intervals[0]
        for s0, e0 in intervals[1:]:
            if s0 > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = s0, e0
            else:
                cur_e = max(cur_e, e0)
        busy += cur_e - cur_s
    return {"total_kernel_ms": sum(by_name.values()),
            "gpu_span_ms": span / 1000.0,
            "gpu_idle_ms": (span - busy) / 1000.0,
            "copies_ms": {n: round(ms, 3) for n, ms in copies.most_common()},
            "copies_calls": dict(copy_count),
            "by_category_ms": dict(by_cat.most_common()),
            "top_kernels": [{"name": n[:160], "ms": round(ms, 3), "calls": count[n],
                             "category": categorize(n)} for n, ms in by_name.most_common(25)]}


def main():
    out = sys.argv[1]
    result = {}
    for arg in sys.argv[2:]:
        name, path = arg.split("=", 1)
        try:
            result[name] = summarize(path)
        except Exception as e:  # keep the other traces' summaries
            result[name] = {"error": str(e)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    cats = sorted({c for r in result.values() for c in r.get("by_category_ms", {})})
    names = list(result)
    print("%-20s" % "category" + "".join("%14s" % n[:13] for n in names))
    for c in cats + ["TOTAL"]:
        row = []
        for n in names:
            r = result[n]
            v = r.get("total_kernel_ms") if c == "TOTAL" else r.get("by_category_ms", {}).get(c, 0)
            row.append("%14.1f" % (v or 0))
        print("%-20s" % c + "".join(row))
    for label, key in (("GPU span", "gpu_span_ms"), ("GPU idle", "gpu_idle_ms")):
        print("%-20s" % label + "".join("%14.1f" % (result[n].get(key) or 0) for n in names))
    for n in names:
        if result[n].get("copies_ms"):
            print("%s copies: %s (calls %s)" % (n, result[n]["copies_ms"], result[n]["copies_calls"]))
    for n in names:
        print("\n== %s top kernels" % n)
        for k in result[n].get("top_kernels", [])[:15]:
            print("%9.2f ms %5d  %-18s %s" % (k["ms"], k["calls"], k["category"], k["name"][:110]))


if __name__ == "__main__":
    main()
