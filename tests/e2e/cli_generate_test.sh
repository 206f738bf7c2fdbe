#!/usr/bin/env bash
# End-to-end: sparge-server (tiny model, CPU) + sparge-cli on loopback. Generates a 256x256,
# 17-frame MP4 and checks it with ffprobe; generates PNG frames and checks the archive; checks
# that a bad request is rejected with the field named while the server keeps serving.
# Usage: cli_generate_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1; src=$2
work=$(mktemp -d); trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
server=$build/server/sparge-server; cli=$build/server/sparge-cli

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$server" --config "$src/config/server.yaml" --port "$port" --metrics-port 0 --device cpu \
  > "$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
  "$cli" health --server "127.0.0.1:$port" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat "$work/server.log"; echo "FAIL: server exited"; exit 1; }
  sleep 0.25
done
"$cli" health --server "127.0.0.1:$port" || { cat "$work/server.log"; echo "FAIL: not SERVING"; exit 1; }

fail() { echo "FAIL: $*"; cat "$work/server.log"; exit 1; }

# 1. MP4 with the README's default request size.
"$cli" generate --server "127.0.0.1:$port" --prompt "a lighthouse on a cliff at dusk" \
  --width 256 --height 256 --frames 17 --steps 4 --seed 7 --out "$work/a.mp4" 2> "$work/cli.err" \
  || { cat "$work/cli.err"; fail "generate mp4"; }
read -r w h n codec < <(ffprobe -v error -count_frames -select_streams v:0 \
  -show_entries stream=width,height,nb_read_frames,codec_name -of csv=p=0 "$work/a.mp4" \
  | awk -F, '{print $2, $3, $4, $1}')
[ "$w" = 256 ] && [ "$h" = 256 ] && [ "$n" = 17 ] && [ "$codec" = h264 ] \
  || fail "ffprobe: got ${w}x${h}, $n frames, codec $codec; want 256x256, 17, h264"

# 2. Same seed, same file: generation is deterministic.
"$cli" generate --server "127.0.0.1:$port" --prompt "a lighthouse on a cliff at dusk" \
  --width 256 --height 256 --frames 17 --steps 4 --seed 7 --out "$work/b.mp4" 2>/dev/null \
  || fail "generate second mp4"
cmp -s "$work/a.mp4" "$work/b.mp4" || fail "same seed gave a different file"

# 3. Sparse attention and PNG frames.
"$cli" generate --server "127.0.0.1:$port" --prompt "waves" --width 128 --height 96 --frames 5 \
  --steps 2 --format png --mode hybrid --topk 0.2 --topp 0.5 --out "$work/f.tar" 2>/dev/null \
  || fail "generate png"
count=$(tar -tf "$work/f.tar" | grep -c '\.png$')
[ "$count" = 5 ] || fail "png archive has $count frames, want 5"

# 4. A bad request names the field; the server keeps serving.
if "$cli" generate --server "127.0.0.1:$port" --prompt "x" --width 17 --out "$work/bad.mp4" \
     2> "$work/bad.err"; then fail "width 17 accepted"; fi
grep -q "width" "$work/bad.err" || { cat "$work/bad.err"; fail "error does not name width"; }
"$cli" health --server "127.0.0.1:$port" >/dev/null || fail "not SERVING after a bad request"
echo "PASS"
