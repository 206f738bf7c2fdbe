#!/usr/bin/env bash
# Configures (once) and builds SpargeServe into build/ with Ninja, ccache and every core.
# Usage: scripts/build.sh [extra cmake -D options...]   e.g. -DSPARGE_WITH_CUDA=OFF
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-8G}
if [ ! -f build/build.ninja ] || [ $# -gt 0 ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
fi
start=$(date +%s)
cmake --build build -j "$(nproc)"
echo "[build] done in $(( $(date +%s) - start )) s" >&2
