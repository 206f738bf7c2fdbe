"""Summarizes Kineto/chrome traces of one DiT forward (dit_forward_bench --profile,
diffusers_dit_bench.py --profile): GPU kernel time grouped by kernel name and by category
(attention, GEMM, normalization, elementwise, ...), side by side. Prints a table and writes JSON.
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
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "Kernel"):
            continue
        name = e.get("name", "?")
        by_name[name] += e.get("dur", 0) / 1000.0
        count[name] += 1
    by_cat = collections.Counter()
    for name, ms in by_name.items():
        by_cat[categorize(name)] += ms
    return {"total_kernel_ms": sum(by_name.values()),
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
    for n in names:
        print("\n== %s top kernels" % n)
        for k in result[n].get("top_kernels", [])[:15]:
            print("%9.2f ms %5d  %-18s %s" % (k["ms"], k["calls"], k["category"], k["name"][:110]))


if __name__ == "__main__":
    main()
