#!/usr/bin/env bash
# One command on the GPU machine: build the engine and trainer tests against CUDA (no FFmpeg) and
# run their GPU cases: the self-attention dispatch through the sparge ops under Torch's sync debug
# mode (SparseAttentionTest.CudaDispatchNeverWaitsOnTheDevice: no host wait inside a layer) and
# the sparse self-attention gradients through the CUDA kernels (TrainerGpuTest). Logs go to $OUT.
# Carry .gpudeps (bash ../shared/tools/device-deps pack .gpudeps).
#   OUT=/tmp/o bash bench/engine/device_tests.sh
set -uo pipefail
OUT=${OUT:-/tmp/sparge-out}
mkdir -p "$OUT"
repo=$(pwd)
t0=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - t0 ))s] $*"; }
source "$repo/.gpudeps/device-deps" unpack > /dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
log "configure"
cmake -S "$repo" -B "$repo/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DSPARGE_REQUIRE_FFMPEG=OFF -DSPARGE_PYTHON=python3 \
  -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH;$torch_prefix" > "$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
log "build"
ninja -C "$repo/build-gpu" -j16 engine_test trainer_test sparge_ops > "$OUT/build.log" 2>&1 \
  || { grep -B2 -A12 -m3 "error" "$OUT/build.log" | head -60; exit 1; }
log "built"
"$repo/build-gpu/tests/engine/engine_test" --gtest_filter='SparseAttentionTest.*' \
  > "$OUT/engine_test.log" 2>&1
echo "engine_test (SparseAttentionTest.*) rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK|FAILED|Failure|Expected|Which is" "$OUT/engine_test.log" | head -30
SPARGE_SOURCE_DIR=$repo "$repo/build-gpu/tests/trainer/trainer_test" --gtest_filter='TrainerGpuTest.*' \
  > "$OUT/trainer_test.log" 2>&1
echo "trainer_test (TrainerGpuTest.*) rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|max abs" "$OUT/trainer_test.log" | head -20
log "end"
