#!/usr/bin/env bash
# README command 1: sets everything up, builds, starts sparge-server with the embedded tiny model,
# sends one prompt with sparge-cli and writes the video (default out/demo.mp4).
# Usage: scripts/demo.sh ["prompt"] [output file] [extra sparge-cli flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-"a red fox running through fresh snow at sunrise, cinematic"}
OUTFILE=${2:-out/demo.mp4}
shift $(( $# > 2 ? 2 : $# ))

bash scripts/setup.sh
bash scripts/build.sh

mkdir -p "$(dirname "$OUTFILE")" out
PORT=${SPARGE_DEMO_PORT:-50051}
METRICS_PORT=${SPARGE_DEMO_METRICS_PORT:-9090}
./build/server/sparge-server --config config/server.yaml --port "$PORT" \
  --metrics-port "$METRICS_PORT" --device cpu > out/demo-server.log 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT

echo "[demo] waiting for the server (log: out/demo-server.log)" >&2
for _ in $(seq 1 120); do
  if ./build/server/sparge-cli health --server "localhost:$PORT" >/dev/null 2>&1; then break; fi
  if ! kill -0 $SERVER_PID 2>/dev/null; then
    echo "[demo] the server exited:" >&2; cat out/demo-server.log >&2; exit 1
  fi
  sleep 0.5
done

start=$(date +%s%N)
./build/server/sparge-cli generate --server "localhost:$PORT" --prompt "$PROMPT" --out "$OUTFILE" "$@"
end=$(date +%s%N)
echo "[demo] generation took $(( (end - start) / 1000000 )) ms" >&2
if command -v ffprobe >/dev/null; then
  ffprobe -v error -count_frames -select_streams v:0 \
    -show_entries stream=codec_name,width,height,nb_read_frames,avg_frame_rate \
    -of default=noprint_wrappers=1 "$OUTFILE" >&2 || true
fi
echo "[demo] wrote $OUTFILE" >&2
