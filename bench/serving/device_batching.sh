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
t0=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - t0 ))s] $*"; }
# (device-deps sets its own $root when sourced: this script says $repo)
source "$repo/.gpudeps/device-deps" unpack > /dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
log "configure"
cmake -S "$repo" -B "$repo/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DSPARGE_REQUIRE_FFMPEG=OFF -DSPARGE_PYTHON=python3 \
  -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH;$torch_prefix" > "$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
log "build"
ninja -C "$repo/build-gpu" -j16 sparge-server sparge-load > "$OUT/build.log" 2>&1 \
  || { grep -B2 -A12 -m3 "error" "$OUT/build.log" | head -60; exit 1; }
log "built"
bash "$repo/bench/serving/run_load.sh" --server-bin "$repo/build-gpu/server/sparge-server" \
  --load-bin "$repo/build-gpu/bench/serving/sparge-load" --model wan1.3b-random --device cuda \
  --dtype bfloat16 --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/run_load.log" | tail -60
log "done"
