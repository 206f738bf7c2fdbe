#!/usr/bin/env bash
# One command on the GPU machine: build sparge-server and sparge-load (CUDA, no FFmpeg: the GPU
# machine has no package registry, so PNG frames are written uncompressed and MP4 is off), then run
# run_load.sh with the built-in "wan1.3b-random" model (Wan2.1 1.3B DiT with seeded random bf16
# weights, real VAE shape, tiny text encoder) to compare max_running_jobs=1 with batching.
# Carry .gpudeps (bash ../shared/tools/device-deps pack .gpudeps). Results go to $OUT.
#   OUT=/tmp/o bash bench/serving/device_batching.sh [run_load.sh options...]
set -uo pipefail
OUT=${OUT:-/tmp/sparge-out}
mkdir -p "$OUT"
repo=$(pwd)
source "$repo/bench/gpu_build.sh"
gpu_build sparge-server sparge-load
bash "$repo/bench/serving/run_load.sh" --server-bin "$repo/build-gpu/server/sparge-server" \
  --load-bin "$repo/build-gpu/bench/serving/sparge-load" --model wan1.3b-random --device cuda \
  --dtype bfloat16 --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/run_load.log" | tail -60
log "done"
