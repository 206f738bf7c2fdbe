#!/usr/bin/env bash
# README command 2: sets everything up, builds, and runs the whole test suite (ctest).
# GPU-only kernel tests skip themselves on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup.sh
t1=$(date +%s)
bash scripts/build.sh
t2=$(date +%s)
ctest --test-dir build --output-on-failure --timeout 600 -j "$(nproc)"
t3=$(date +%s)
echo "[test] setup $((t1 - t0)) s, build $((t2 - t1)) s, tests $((t3 - t2)) s"
