#!/usr/bin/env bash
# One command on the GPU machine: build the standalone DiT benchmark (and, niced in the background,
# the kernels-only sparge_ops for the sparse path), time diffusers' WanTransformer3DModel and the
# engine's WanDiT (dense, then TOPK if the ops built in time) at Wan2.1 1.3B 480x832x81, and write
# bench/results/dit_forward_<card>_<date>.json into $OUT. Carry .whl (diffusers wheel) and
# .benchdeps (Abseil headers + libs) and .devdeps (GTest debs for the kernels-only configure).
#   OUT=/tmp/o bash bench/engine/run_device.sh [sparse_deadline_s]
set -uo pipefail
OUT=${OUT:-/tmp/sparge-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
root=$(pwd)
sparse_deadline=${1:-300}
t_start=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - t_start ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# Kernels-only ops build (sparse path), in the background and niced.
gt=$root/.devdeps/gtest/root
if [ ! -d "$gt" ]; then mkdir -p "$gt"; for d in "$root"/.devdeps/gtest/*.deb; do dpkg -x "$d" "$gt"; done; fi
( nice -n 19 cmake -S "$root" -B "$root/build-ops" -G Ninja -DSPARGE_KERNELS_ONLY=ON \
    -DSPARGE_PYTHON=python3 -DCMAKE_PREFIX_PATH="$gt/usr" > "$OUT/ops_configure.log" 2>&1 &&
  nice -n 19 ninja -C "$root/build-ops" -j8 sparge_ops > "$OUT/ops_build.log" 2>&1
  echo $? > "$OUT/ops_rc" ) &

log "bench build"
( cmake -S bench/engine -B "$root/build-bench" -G Ninja -DSPARGE_PYTHON=python3 \
    -DABSL_ROOT="$root/.benchdeps/absl" > "$OUT/bench_configure.log" 2>&1 &&
  nice -n 5 ninja -C "$root/build-bench" -j6 > "$OUT/bench_build.log" 2>&1
  echo $? > "$OUT/bench_rc" ) &
bench_pid=$!

log "diffusers install + run (concurrent with the builds)"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers*.whl > "$OUT/pip.log" 2>&1
python3 -c 'import PIL' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pillow*.whl >> "$OUT/pip.log" 2>&1
python3 -c 'import importlib_metadata' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/importlib_metadata*.whl .whl/zipp*.whl >> "$OUT/pip.log" 2>&1
PYTHONPATH=/tmp/site timeout 150 python3 bench/engine/diffusers_dit_bench.py > "$OUT/diffusers.json" 2> "$OUT/diffusers.err"
log "diffusers rc=$? $(cat "$OUT/diffusers.json")"; tail -3 "$OUT/diffusers.err"

wait $bench_pid
log "bench build rc=$(cat "$OUT/bench_rc" 2>/dev/null)"
if [ "$(cat "$OUT/bench_rc" 2>/dev/null)" != 0 ]; then grep -A12 -m3 error "$OUT/bench_build.log" | head -60; fi
timeout 150 "$root/build-bench/dit_forward_bench" --mode dense > "$OUT/ours_dense.json" 2> "$OUT/ours_dense.err"
log "ours dense rc=$? $(cat "$OUT/ours_dense.json")"; tail -3 "$OUT/ours_dense.err"

# Re-run diffusers now that the CPUs are quieter (the first run overlapped the compiles).
PYTHONPATH=/tmp/site timeout 120 python3 bench/engine/diffusers_dit_bench.py > "$OUT/diffusers2.json" 2> "$OUT/diffusers2.err"
log "diffusers (quiet) rc=$? $(cat "$OUT/diffusers2.json")"

while [ ! -f "$OUT/ops_rc" ] && [ $(( $(date +%s) - t_start )) -lt "$sparse_deadline" ]; do sleep 5; done
log "ops rc=$(cat "$OUT/ops_rc" 2>/dev/null || echo still-building)"
ops=$(find "$root/build-ops" -name 'libsparge_ops.so' 2>/dev/null | head -1)
if [ "$(cat "$OUT/ops_rc" 2>/dev/null)" = 0 ] && [ -n "$ops" ]; then
  timeout 120 "$root/build-bench/dit_forward_bench" --mode topk --topk 0.05 --ops_lib "$ops" \
    > "$OUT/ours_topk.json" 2> "$OUT/ours_topk.err"
  log "ours topk rc=$? $(cat "$OUT/ours_topk.json")"; tail -3 "$OUT/ours_topk.err"
else
  tail -5 "$OUT/ops_build.log" 2>/dev/null
fi

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
try:
    commit = subprocess.check_output(["git", "-C", root, "rev-parse", "HEAD"], text=True).strip()
except Exception:
    commit = os.environ.get("BENCH_COMMIT", "unknown")
res = {"benchmark": "one Wan2.1-1.3B DiT forward, random bf16 weights, batch 1",
       "card": card, "commit": commit,
       "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
       "shape": {"latent": [1, 16, 21, 60, 104], "tokens": 32760, "text_context": [1, 512, 4096],
                 "video": "480x832, 81 frames"},
       "diffusers_concurrent_with_build": load("diffusers.json"),
       "diffusers": load("diffusers2.json"), "ours_dense": load("ours_dense.json"),
       "ours_topk_0.05": load("ours_topk.json")}
d = res["diffusers"] if "median_ms" in res["diffusers"] else res["diffusers_concurrent_with_build"]
ratios = {}
for k in ("ours_dense", "ours_topk_0.05"):
    o = res[k]
    if "median_ms" in o and "median_ms" in d:
        ratios[k] = {"time_ours_over_diffusers": o["median_ms"] / d["median_ms"],
                     "peak_mem_ours_over_diffusers": o["peak_alloc_bytes"] / d["peak_alloc_bytes"]}
res["ratios"] = ratios
name = "dit_forward_" + card.split(",")[0].replace(" ", "_") + "_" + res["date"][:10] + ".json"
with open(os.path.join(out, name), "w") as f:
    json.dump(res, f, indent=2)
print(json.dumps(res, indent=1))
PY
log "done"
