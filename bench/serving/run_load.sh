#!/usr/bin/env bash
# Batching benchmark: starts sparge-server with max_running_jobs=1, runs a load with sparge-load,
# restarts it with max_running_jobs=B and runs the same load (same requests, same seeds), then
# writes the comparison JSON (batched / batch-size-1 throughput). Optionally measures client
# cancel latency on the batched server. Needs no network beyond loopback. See README.md here.
#
# Usage: bench/serving/run_load.sh [options]
#   --server-bin PATH     sparge-server binary (default: build/server/sparge-server)
#   --load-bin PATH       sparge-load binary (default: next to --server-bin, ../bench/serving/)
#   --model NAME|DIR      model.name: tiny (default) or a Wan2.1 diffusers directory
#   --device DEV          cpu (default), cuda or cuda:N
#   --dtype T             float32 (default), bfloat16 or float16
#   --threads N           CPU intra-op threads (model.threads, default 0 = LibTorch's choice)
#   --block-q N --block-k N  sparse-attention blocks (model.block_q/k, default 64; the CUDA kernels
#                         need block_q 128 and block_k a multiple of 64, else the ATen path runs)
#   --format F            mp4 (default) or png (builds without FFmpeg can only write png)
#   --batch B             max_running_jobs of the batched run (default 4)
#   --max-batch-tokens N  scheduler.max_batch_tokens of the batched run (default 0 = no cap)
#   --clients N           concurrent clients (default 8)
#   --requests N          requests per run (default 32)
#   --mix SPEC            sparge-load --mix (default: 128x128, 5 frames, 4 steps, no CFG, topk 0.5)
#   --repeat N            run the b1 / bB pair N times, interleaved (default 1); the comparison
#                         pools them (a shared or throttled machine drifts between runs)
#   --cancel-requests N   then N cancelled requests on the batched server (default 8; 0: skip)
#   --config-name NAME    name part of the result files (default: the model's name)
#   --out-dir DIR         where the JSONs go (default: bench/results)
#   --ready-seconds S     wait this long for each server to load (default 600)
#   --commit SHA          commit the binaries were built from (default: git rev-parse HEAD)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
server_bin=$repo/build/server/sparge-server
load_bin=
model=tiny
device=cpu
dtype=float32
threads=0
block_q=64
block_k=64
format=mp4
batch=4
max_batch_tokens=0
clients=8
requests=32
mix="width=128,height=128,frames=5,steps=4,guidance=1,mode=topk,topk=0.5"
cancel_requests=8
repeat=1
config_name=
out_dir=$repo/bench/results
ready_seconds=600
commit=

while [ $# -gt 0 ]; do
  case $1 in
    --server-bin) server_bin=$2; shift 2 ;;
    --load-bin) load_bin=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --block-q) block_q=$2; shift 2 ;;
    --block-k) block_k=$2; shift 2 ;;
    --format) format=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --max-batch-tokens) max_batch_tokens=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --mix) mix=$2; shift 2 ;;
    --cancel-requests) cancel_requests=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --config-name) config_name=$2; shift 2 ;;
    --out-dir) out_dir=$2; shift 2 ;;
    --ready-seconds) ready_seconds=$2; shift 2 ;;
    --commit) commit=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_load.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$load_bin" ] || load_bin=$(dirname "$server_bin")/../bench/serving/sparge-load
[ -x "$server_bin" ] || { echo "run_load.sh: no sparge-server at $server_bin (--server-bin)" >&2; exit 2; }
[ -x "$load_bin" ] || { echo "run_load.sh: no sparge-load at $load_bin (--load-bin)" >&2; exit 2; }
[ -n "$config_name" ] || config_name=$(basename "$model")
[ -n "$commit" ] || commit=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
mkdir -p "$out_dir"
work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' \
    2>/dev/null || echo $((20000 + RANDOM % 20000))
}

# start_server B: writes the config for max_running_jobs=B and starts the server in the background.
start_server() {
  local b=$1
  config=$work/server-b$b.yaml
  cat > "$config" <<EOF
listen_address: 127.0.0.1
metrics_address: 127.0.0.1
device: $device
warmup: true
shutdown_grace_seconds: 5
model:
  name: "$model"
  dtype: $dtype
  threads: $threads
  block_q: $block_q
  block_k: $block_k
jobs:
  output_dir: $work/jobs-b$b
scheduler:
  max_queue_length: $((clients + 8))
  max_running_jobs: $b
  max_batch_tokens: $max_batch_tokens
EOF
  port=$(free_port)
  metrics_port=$(free_port)
  "$server_bin" --config "$config" --port "$port" --metrics-port "$metrics_port" \
    > "$work/server-b$b.log" 2>&1 &
  pid=$!
  echo "sparge-server (max_running_jobs=$b) pid $pid on 127.0.0.1:$port, metrics :$metrics_port"
}

stop_server() {
  kill -TERM "$pid"
  wait "$pid" || { echo "run_load.sh: server exited non-zero; log:" >&2; cat "$work/server-b$1.log" >&2; }
  pid=
}

# run_load B NAME [extra sparge-load flags...]: prints the report path.
run_load() {
  local b=$1 name=$2; shift 2
  "$load_bin" --target "127.0.0.1:$port" --metrics-url "http://127.0.0.1:$metrics_port/metrics" \
    --wait-ready-seconds "$ready_seconds" --server-config "$config" \
    --commit "$commit" \
    --clients "$clients" --mix "$mix" --format "$format" --seed 1000 --out-dir "$out_dir" \
    --config-name "$name" \
    "$@" | tee "$work/load.out" >&2
  sed -n 's/^wrote //p' "$work/load.out" | tail -1
}

baselines=
batcheds=
for rep in $(seq 1 "$repeat"); do
  start_server 1
  baselines=$baselines${baselines:+,}$(run_load 1 "$config_name-b1" --requests "$requests")
  stop_server 1

  start_server "$batch"
  batcheds=$batcheds${batcheds:+,}$(run_load "$batch" "$config_name-b$batch" --requests "$requests")
  if [ "$rep" = "$repeat" ] && [ "$cancel_requests" -gt 0 ]; then
    # Mid-denoise cancellations, measured one at a time against the server's counter.
    run_load "$batch" "$config_name-b$batch-cancel" --requests "$cancel_requests" \
      --cancel-fraction 1 --cancel-after-steps 2 > /dev/null
  fi
  stop_server "$batch"
done

last=${batcheds##*,}
compare=${last/-b$batch-/-compare-b1-vs-b$batch-}
"$load_bin" --compare-baseline "$baselines" --compare-batched "$batcheds" --out "$compare"
