#!/usr/bin/env bash
# One command on the GPU machine: build the kernels-only sparge_ops (sparse attention and the fused
# DiT block ops) with its GPU tests, and the standalone DiT benchmark; run the fused-op tests; time
# diffusers' WanTransformer3DModel and the engine's WanDiT (dense fused and unfused in one process,
# then TOPK 0.05) at Wan2.1 1.3B 480x832x81; profile one forward of each (kernel-time breakdown);
# write bench/results/dit_forward_<card>_<date>.json into $OUT. Carry .whl, .benchdeps, .devdeps:
#   .whl:  pip download --no-deps -d .whl diffusers==0.35.1 importlib_metadata zipp, and pillow
#          for cp312 (--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64)
#   .benchdeps/absl: include/ and lib/ (the .so files) of Debian's libabsl-dev + libabsl20220623
#          (apt-get download, dpkg -x)
#   .devdeps/gtest: apt-get download libgtest-dev libgmock-dev googletest
#   OUT=/tmp/o bash bench/engine/run_device.sh
set -uo pipefail
OUT=${OUT:-/tmp/sparge-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
root=$(pwd)
t_start=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - t_start ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

gt=$root/.devdeps/gtest/root
if [ ! -d "$gt" ]; then mkdir -p "$gt"; for d in "$root"/.devdeps/gtest/*.deb; do dpkg -x "$d" "$gt"; done; fi
( cmake -S "$root" -B "$root/build-ops" -G Ninja -DSPARGE_KERNELS_ONLY=ON \
    -DSPARGE_PYTHON=python3 -DCMAKE_PREFIX_PATH="$gt/usr" > "$OUT/ops_configure.log" 2>&1 &&
  ninja -C "$root/build-ops" -j10 sparge_ops dit_fused_gpu_test > "$OUT/ops_build.log" 2>&1
  echo $? > "$OUT/ops_rc" ) &
ops_pid=$!
( cmake -S bench/engine -B "$root/build-bench" -G Ninja -DSPARGE_PYTHON=python3 \
    -DABSL_ROOT="$root/.benchdeps/absl" > "$OUT/bench_configure.log" 2>&1 &&
  ninja -C "$root/build-bench" -j5 > "$OUT/bench_build.log" 2>&1
  echo $? > "$OUT/bench_rc" ) &
bench_pid=$!

log "diffusers install + profile run (concurrent with the builds)"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers*.whl > "$OUT/pip.log" 2>&1
python3 -c 'import PIL' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pillow*.whl >> "$OUT/pip.log" 2>&1
python3 -c 'import importlib_metadata' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/importlib_metadata*.whl .whl/zipp*.whl >> "$OUT/pip.log" 2>&1
PYTHONPATH=/tmp/site timeout 200 python3 bench/engine/diffusers_dit_bench.py --profile "$OUT/trace_diffusers.json" > "$OUT/diffusers.json" 2> "$OUT/diffusers.err"
log "diffusers rc=$? $(cat "$OUT/diffusers.json")"; tail -3 "$OUT/diffusers.err"

wait $ops_pid; wait $bench_pid
log "ops rc=$(cat "$OUT/ops_rc" 2>/dev/null) bench rc=$(cat "$OUT/bench_rc" 2>/dev/null)"
for f in ops_build bench_build; do grep -A12 -m3 "error" "$OUT/$f.log" | head -40; done
ops=$(find "$root/build-ops" -name 'libsparge_ops.so' 2>/dev/null | head -1)
if [ -x "$root/build-ops/tests/kernels/dit_fused_gpu_test" ]; then
  "$root/build-ops/tests/kernels/dit_fused_gpu_test" > "$OUT/dit_fused_gpu_test.log" 2>&1
  log "dit_fused_gpu_test rc=$?"; grep -E "^\[  (PASSED|FAILED)|Failure|max err" "$OUT/dit_fused_gpu_test.log" | head -20
fi

timeout 200 "$root/build-bench/dit_forward_bench" --mode dense --fused both --ops_lib "$ops" \
  --profile "$OUT/trace_ours_dense" > "$OUT/ours_dense.json" 2> "$OUT/ours_dense.err"
log "ours dense rc=$?"; cat "$OUT/ours_dense.err" | tail -4

# Diffusers again with the CPUs quiet (the first run overlapped the compiles).
PYTHONPATH=/tmp/site timeout 120 python3 bench/engine/diffusers_dit_bench.py > "$OUT/diffusers2.json" 2> "$OUT/diffusers2.err"
log "diffusers (quiet) rc=$? $(cat "$OUT/diffusers2.json")"

timeout 150 "$root/build-bench/dit_forward_bench" --mode topk --topk 0.05 --fused on --ops_lib "$ops" \
  --profile "$OUT/trace_ours_topk" > "$OUT/ours_topk.json" 2> "$OUT/ours_topk.err"
log "ours topk rc=$?"; tail -2 "$OUT/ours_topk.err"

python3 bench/engine/summarize_trace.py "$OUT/kernel_breakdown.json" \
  diffusers="$OUT/trace_diffusers.json" ours_fused="$OUT/trace_ours_dense_fused.json" \
  ours_unfused="$OUT/trace_ours_dense_unfused.json" ours_topk="$OUT/trace_ours_topk_fused.json" \
  > "$OUT/kernel_breakdown.txt" 2>&1
cat "$OUT/kernel_breakdown.txt" | head -80
rm -f "$OUT"/trace_*.json

python3 - "$OUT" "$root" <<'PY'
import json, os, subprocess, sys, datetime
out, root = sys.argv[1], sys.argv[2]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except Exception as e:
        return {"error": f"{name}: {e}"}
card = open(os.path.join(out, "gpu.txt")).read().strip()
commit = os.environ.get("BENCH_COMMIT", "")
if not commit:
    try:
        commit = subprocess.check_output(["git", "-C", root, "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
dense = load("ours_dense.json")
topk = load("ours_topk.json")
res = {"benchmark": "one Wan2.1-1.3B DiT forward, random bf16 weights, batch 1",
       "card": card, "commit": commit,
       "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
       "shape": {"latent": [1, 16, 21, 60, 104], "tokens": 32760, "text_context": [1, 512, 4096],
                 "video": "480x832, 81 frames"},
       "diffusers_concurrent_with_build": load("diffusers.json"),
       "diffusers": load("diffusers2.json"),
       "ours_dense_fused": dense.get("fused", dense), "ours_dense_unfused": dense.get("unfused", {}),
       "ours_topk_0.05": topk.get("fused", topk)}
d = res["diffusers"] if "median_ms" in res["diffusers"] else res["diffusers_concurrent_with_build"]
ratios = {}
for k in ("ours_dense_fused", "ours_dense_unfused", "ours_topk_0.05"):
    o = res[k]
    if "median_ms" in o and "median_ms" in d:
        ratios[k] = {"time_ours_over_diffusers": o["median_ms"] / d["median_ms"],
                     "peak_mem_ours_over_diffusers": o["peak_alloc_bytes"] / d["peak_alloc_bytes"]}
res["ratios"] = ratios
try:
    kb = json.load(open(os.path.join(out, "kernel_breakdown.json")))
    res["kernel_breakdown_ms"] = {k: v.get("by_category_ms") for k, v in kb.items()}
    # GPU idle inside the profiled forward (host waits, launch gaps) and device<->host copies.
    res["gpu_idle_ms"] = {k: {"span": v.get("gpu_span_ms"), "idle": v.get("gpu_idle_ms"),
                              "copies_ms": v.get("copies_ms")} for k, v in kb.items()}
except Exception as e:
    res["kernel_breakdown_ms"] = {"error": str(e)}
name = "dit_forward_" + card.split(",")[0].replace(" ", "_") + "_" + res["date"][:10] + ".json"
with open(os.path.join(out, name), "w") as f:
    json.dump(res, f, indent=2)
print(json.dumps(res["ratios"], indent=1))
PY
log "done"
