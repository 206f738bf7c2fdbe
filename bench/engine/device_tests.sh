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
source "$repo/bench/gpu_build.sh"
gpu_build engine_test trainer_test sparge_ops
"$repo/build-gpu/tests/engine/engine_test" --gtest_filter='SparseAttentionTest.*' \
  > "$OUT/engine_test.log" 2>&1
echo "engine_test (SparseAttentionTest.*) rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK|FAILED|Failure|Expected|Which is" "$OUT/engine_test.log" | head -30
SPARGE_SOURCE_DIR=$repo "$repo/build-gpu/tests/trainer/trainer_test" --gtest_filter='TrainerGpuTest.*' \
  > "$OUT/trainer_test.log" 2>&1
echo "trainer_test (TrainerGpuTest.*) rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|max abs" "$OUT/trainer_test.log" | head -20
log "end"
