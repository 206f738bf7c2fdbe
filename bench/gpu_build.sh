# Sourced by the bench/*/device_*.sh scripts on the GPU machine: unpack the carried Debian C++
# dependencies (.gpudeps, made with ../shared/tools/device-deps pack .gpudeps), record the card,
# configure build-gpu (CUDA, Release, no FFmpeg, LibTorch from python3's torch) and build the
# given targets. Needs $OUT and $repo; defines log(). Exits the script on a configure or build
# error after printing the relevant log lines.
#   source "$repo/bench/gpu_build.sh"; gpu_build target [target...]
t0=${t0:-$(date +%s)}
log() { echo "[$(date +%T) +$(( $(date +%s) - t0 ))s] $*"; }

gpu_build() {
  # (device-deps sets its own $root when sourced: these scripts say $repo)
  source "$repo/.gpudeps/device-deps" unpack > /dev/null
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  local torch_prefix
  torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  log "configure"
  cmake -S "$repo" -B "$repo/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DSPARGE_REQUIRE_FFMPEG=OFF -DSPARGE_PYTHON=python3 \
    -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH;$torch_prefix" > "$OUT/configure.log" 2>&1 \
    || { tail -40 "$OUT/configure.log"; exit 1; }
  log "build $*"
  ninja -C "$repo/build-gpu" -j16 "$@" > "$OUT/build.log" 2>&1 \
    || { grep -B2 -A12 -m3 "error" "$OUT/build.log" | head -60; exit 1; }
  log "built"
}
