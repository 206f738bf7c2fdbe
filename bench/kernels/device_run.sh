#!/usr/bin/env bash
# One command on the GPU machine: build the kernels-only configuration, run the kernel tests,
# compute-sanitizer (memcheck + racecheck) on a small case, and the benchmark. Logs go to $OUT.
#   bash bench/kernels/device_run.sh [build] [test] [sanitize] [ncu] [profile] [bench] [trace] [bench-args...]
# GTest travels as Debian packages in .devdeps/gtest (carry it): apt-get download libgtest-dev
# libgmock-dev googletest. Each stage runs under a timeout (TEST_TIMEOUT, BENCH_TIMEOUT seconds) so
# that a hung kernel cannot eat a whole device call. At the end the logs go into
# $OUT/logs.tar.gz (KEEP_LOGS=1 leaves them loose). The device tool's copy of the tree may carry
# stale git metadata: put SPARGE_COMMIT=<hash of the tree that runs> in front of the command so
# that the JSON records the right commit.
set -u
OUT=${OUT:-/tmp/sparge-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
root=$(pwd)
bdir=$root/build-dev
stages=" $* "
failed=""
log() { echo "[$(date +%T)] $*"; }
if [[ $stages == *" build "* ]]; then
  gt=$root/.devdeps/gtest/root
  if [ ! -d "$gt" ]; then mkdir -p "$gt"; for d in "$root"/.devdeps/gtest/*.deb; do dpkg -x "$d" "$gt"; done; fi
  log "configure"
  cmake -S "$root" -B "$bdir" -G Ninja -DSPARGE_KERNELS_ONLY=ON -DSPARGE_PYTHON=python3 \
    -DCMAKE_PREFIX_PATH="$gt/usr" -DSPARGE_KERNELS_RESOURCE_USAGE=ON > "$OUT/configure.log" 2>&1 \
    || { tail -30 "$OUT/configure.log"; exit 1; }
  log "build"
  ninja -C "$bdir" -j16 sparge_ops sparge_ops_cpu_test sparge_kernels_gpu_test > "$OUT/build.log" 2>&1 \
    || { grep -B2 -A12 -m3 "error" "$OUT/build.log" | head -80; exit 1; }
  grep -E "Function properties|registers|spill" "$OUT/build.log" | grep -B1 -E "spill stores [1-9]|registers" | tail -40 > "$OUT/ptxas.txt"
  log "built"
fi
if [[ $stages == *" test "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  log "cpu test"
  "$bdir/tests/kernels/sparge_ops_cpu_test" > "$OUT/cpu_test.log" 2>&1
  cpu_rc=$?
  echo "cpu_test rc=$cpu_rc"
  [ $cpu_rc = 0 ] || failed="$failed cpu_test"
  grep -E "^\[  (PASSED|FAILED) |FAILED|Failure" "$OUT/cpu_test.log" | head -20
  log "gpu test"
  timeout "${TEST_TIMEOUT:-240}" "$bdir/tests/kernels/sparge_kernels_gpu_test" \
    ${GPU_TEST_FILTER:+--gtest_filter=$GPU_TEST_FILTER} > "$OUT/gpu_test.log" 2>&1
  gpu_rc=$?
  [ $gpu_rc = 0 ] || failed="$failed gpu_test"
  echo "gpu_test rc=$gpu_rc (124 = timed out)"
  grep -E "^\[  (PASSED|FAILED) |^\[       OK|FAILED|Failure|Expected|Which is|vs SDPA|sparsity" "$OUT/gpu_test.log" | head -60
fi
if [[ ${gpu_rc:-0} == 124 && $stages == *" sanitize "* ]]; then
  log "sanitize skipped: the GPU tests timed out"  # a hang would hang every sanitizer run too
  stages=${stages/ sanitize / }
fi
if [[ $stages == *" sanitize "* ]]; then
  for tool in memcheck racecheck; do
    log "compute-sanitizer $tool"
    timeout "${TEST_TIMEOUT:-240}" compute-sanitizer --tool $tool --error-exitcode 9 "$bdir/tests/kernels/sparge_kernels_gpu_test" \
      --gtest_filter="SpargeKernelsGpu.SanitizerCase*" > "$OUT/sanitizer_$tool.log" 2>&1
    san_rc=$?
    [ $san_rc = 0 ] || failed="$failed $tool"
    echo "$tool rc=$san_rc"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|Hazard" "$OUT/sanitizer_$tool.log" | head -8
  done
fi
if [[ $stages == *" ncu "* ]]; then
  # DRAM bytes, L2 hit rate and duration of the fused backward kernel (the model's quantities,
  # bench/kernels/l2_model.py) for the default and each NCU_VARIANTS entry
  # ("name:ENV=VALUE[+ENV=VALUE],..."), at NCU_SHAPES (default 1.3B).
  for shape in ${NCU_SHAPES:-1.3B}; do
    for spec in default ${NCU_VARIANTS//,/ }; do
      name=${spec%%:*}; envs=""; [[ $spec == *:* ]] && envs=${spec#*:}
      log "ncu $name $shape"
      ( for kv in ${envs//+/ }; do export "$kv"; done
        timeout "${TEST_TIMEOUT:-240}" ncu -k regex:BwdFusedV10 --launch-skip 1 --launch-count 1 \
          --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum \
          python3 "$root/bench/kernels/ncu_bwd.py" "$bdir/engine/ops/libsparge_ops.so" "$shape" \
          > "$OUT/ncu-bwd-$name-$shape.txt" 2>&1 )
      grep -E "dram__bytes|hit_rate|gpu__time" "$OUT/ncu-bwd-$name-$shape.txt" | sed "s/^/  $name $shape /"
    done
  done
fi
if [[ $stages == *" profile "* ]]; then
  # Nsight Compute profiles (speed of light, memory and compute workload, warp states, scheduler,
  # occupancy, launch) of the fused backward kernel and the forward's attention kernel at 1.3B,
  # 95%, with the environment the command was given: the profile a missed target's note cites.
  lib="$bdir/engine/ops/libsparge_ops.so"
  secs="--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
  for what in bwd fwd; do
    if [ $what = bwd ]; then kre=regex:BwdFusedV10; extra=""; else kre=regex:FwdSm90Ws; extra="--fwd"; fi
    log "ncu profile $what 1.3B"
    timeout "${TEST_TIMEOUT:-240}" ncu $secs -k "$kre" --launch-skip 1 --launch-count 1 \
      python3 "$root/bench/kernels/ncu_bwd.py" "$lib" 1.3B $extra > "$OUT/ncu-profile-$what-1.3B.txt" 2>&1
    echo "ncu $what rc=$?"
    grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit Rate|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible" \
      "$OUT/ncu-profile-$what-1.3B.txt" | head -14 | sed "s/^/  $what /"
  done
fi
if [[ $stages == *" bench "* && ${gpu_rc:-0} == 124 ]]; then
  # A test that hangs (a kernel waiting forever) would hang the benchmark too: skip it and the
  # traces, and keep the device time.
  log "bench and trace skipped: the GPU tests timed out"
  stages=${stages/ bench / }
  stages=${stages/ trace / }
fi
if [[ $stages == *" bench "* ]]; then
  log "bench"
  shift_args=()
  for a in "$@"; do case $a in build|test|sanitize|ncu|profile|bench|trace) ;; *) shift_args+=("$a");; esac; done
  # GPU clocks, power and temperature every 200 ms beside the benchmark (gpu-clocks.csv), and
  # each benchmark line with the time it was printed, so a slow measurement can be matched with
  # the card's state (power capping after the dense baselines, for one).
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 200 > "$OUT/gpu-clocks.csv" 2>/dev/null &
  smi=$!
  timeout "${BENCH_TIMEOUT:-420}" python3 "$root/bench/kernels/bench_sparge.py" --lib "$bdir/engine/ops/libsparge_ops.so" \
    --out "$OUT" "${shift_args[@]}" 2>&1 | while IFS= read -r line; do printf '[%s] %s\n' "$(date +%T.%2N)" "$line"; done \
    | tee "$OUT/bench.log" | grep -v "^\[[0-9:.]*\] {"
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  [ -s "$OUT/gpu-clocks.csv" ] || rm -f "$OUT/gpu-clocks.csv"
fi
if [[ $stages == *" trace "* ]]; then
  # GPU timelines of back-to-back calls (kernels and the idle gaps between them, host time per
  # call): the backward and the forward at 1.3B, the backward at 14B, with the environment the
  # command was given (TRACE_ENV="A=1 B=1" adds a second backward trace at 1.3B with it).
  lib="$bdir/engine/ops/libsparge_ops.so"
  log "trace"
  timeout 120 python3 "$root/bench/kernels/trace_bwd.py" "$lib" 1.3B --json "$OUT/trace-bwd-1.3B.json" 2>&1 | tail -8
  if [ -n "${TRACE_ENV:-}" ]; then
    ( for kv in $TRACE_ENV; do export "$kv"; done
      timeout 120 python3 "$root/bench/kernels/trace_bwd.py" "$lib" 1.3B --json "$OUT/trace-bwd-1.3B-env.json" 2>&1 | tail -8 )
  fi
  timeout 120 python3 "$root/bench/kernels/trace_bwd.py" "$lib" 1.3B --fwd --json "$OUT/trace-fwd-1.3B.json" 2>&1 | tail -8
  timeout 180 python3 "$root/bench/kernels/trace_bwd.py" "$lib" 14B --calls 3 --json "$OUT/trace-bwd-14B.json" 2>&1 | tail -6
fi
# The device tool brings back at most eight files from $OUT: the logs go into one archive so
# that the results (JSON, PNG, traces) come back. KEEP_LOGS=1 leaves them as they are.
if [ "${KEEP_LOGS:-0}" != 1 ]; then
  ( cd "$OUT" && logs=$(ls *.log *.txt 2>/dev/null) && [ -n "$logs" ] && tar czf logs.tar.gz $logs && rm -f $logs )
fi
log "end"
# A failed test or sanitizer run fails the command (the benchmark still ran, and its logs came
# back): rc 0 means every test stage that ran passed.
if [ -n "$failed" ]; then
  echo "FAILED:$failed"
  exit 1
fi
