#!/usr/bin/env bash
# sparge-train end to end on the CPU with the tiny model: --help, bad configurations exit 2 with
# the field named, a 3-step distillation run writes its log and a checkpoint, a second invocation
# resumes from it, and sparge-server serves the fine-tuned transformer (model.transformer).
# Usage: sparge_train_cli_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1; src=$2
train=$build/trainer/sparge-train; server=$build/server/sparge-server; cli=$build/server/sparge-cli
work=$(mktemp -d); pid=
trap '[ -n "$pid" ] && { kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; }; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$train" --help > "$work/help.txt" || fail "--help exited non-zero"
grep -q -- "--nproc-per-node" "$work/help.txt" || fail "--help does not list --nproc-per-node"

# Bad configurations: exit 2, message names the field.
printf 'data:\n  prompts: p.txt\nsparsity:\n  topk: 2\n' > "$work/bad.yaml"
set +e; "$train" --config "$work/bad.yaml" 2> "$work/bad.err"; rc=$?; set -e
[ $rc = 2 ] || fail "bad topk: exit $rc, want 2"
grep -q "sparsity.topk: must be in (0, 1], got 2" "$work/bad.err" || { cat "$work/bad.err"; fail "topk error"; }
set +e; "$train" --config "$work/missing.yaml" 2> "$work/missing.err"; rc=$?; set -e
[ $rc = 2 ] || fail "missing config: exit $rc, want 2"

printf 'a red fox running through snow\nwaves breaking on a rocky beach\n' > "$work/prompts.txt"
sed -e "s|prompts: \"\"|prompts: $work/prompts.txt|" \
    -e 's|width: 832|width: 64|' -e 's|height: 480|height: 64|' -e 's|num_frames: 81|num_frames: 5|' \
    -e 's|teacher_steps: 30|teacher_steps: 2|' -e 's|block_q: 128|block_q: 16|' \
    -e 's|block_k: 128|block_k: 16|' -e 's|topk: 0.05|topk: 0.5|' \
    -e 's|  mode: hybrid|  mode: topk|' -e 's|lr: 1.0e-5|lr: 1.0e-4|' \
    -e 's|warmup_steps: 50|warmup_steps: 0|' \
    -e 's|every_steps: 200|every_steps: 2|' "$src/config/trainer.yaml" > "$work/train.yaml"
# (64x64x5 is 32 DiT tokens, two 16-token blocks: top-k 0.5 keeps one, a 50%-sparse student.)
"$train" --config "$work/train.yaml" --output-dir "$work/out" --max-steps 3 2> "$work/run1.log" \
  || { cat "$work/run1.log"; fail "training run"; }
grep -q "step 3/3 loss" "$work/run1.log" || { cat "$work/run1.log"; fail "no step log line"; }
[ -f "$work/out/step-0000003/transformer/diffusion_pytorch_model.safetensors" ] || fail "no checkpoint"
[ -f "$work/out/step-0000002/trainer_state/optimizer.pt" ] || fail "no step-2 checkpoint"
[ "$(wc -l < "$work/out/train_log.jsonl")" -ge 1 ] || fail "empty train_log.jsonl"

# Resume: continues from step 3 to 4.
"$train" --config "$work/train.yaml" --output-dir "$work/out" --max-steps 4 2> "$work/run2.log" \
  || { cat "$work/run2.log"; fail "resumed run"; }
grep -q "resumed from .*step-0000003 at step 3" "$work/run2.log" || { cat "$work/run2.log"; fail "did not resume"; }
[ -d "$work/out/step-0000004" ] || fail "no step-4 checkpoint"

# SIGTERM (to the process, or to the launcher of 2 workers, which forwards it and whose workers
# agree on the step to stop at): rank 0 saves a checkpoint at that step, everybody exits 143.
sigterm_run() {  # name nproc
  local name=$1 nproc=$2 tpid rc saved
  "$train" --config "$work/train.yaml" --output-dir "$work/$name" --max-steps 100000 \
    --nproc-per-node "$nproc" 2> "$work/$name.log" &
  tpid=$!
  for _ in $(seq 1 300); do grep -q "step 10/" "$work/$name.log" 2>/dev/null && break; sleep 0.1; done
  kill -TERM $tpid
  set +e; wait $tpid; rc=$?; set -e
  [ $rc = 143 ] || { cat "$work/$name.log"; fail "$nproc worker(s), SIGTERM: exit $rc, want 143"; }
  saved=$(ls -d "$work/$name"/step-* 2>/dev/null | tail -1)
  [ -n "$saved" ] && [ -f "$saved/trainer_state/state.json" ] \
    || { cat "$work/$name.log"; fail "$nproc worker(s): no checkpoint after SIGTERM"; }
  grep -q "stop requested at step" "$work/$name.log" || fail "$nproc worker(s): no stop message"
}
sigterm_run term 1
sigterm_run term2 2

# Data parallelism: 2 worker processes with 1 sample each train exactly what 1 process with 2
# samples trains (same samples by global number, mean gradient), up to float summation order
# (measured 4.5e-6 against 4e-4 between batch sizes 1 and 2).
sed -e 's|batch_size: 1|batch_size: 2|' "$work/train.yaml" > "$work/b2.yaml"
"$train" --config "$work/b2.yaml" --output-dir "$work/single" --max-steps 2 2> "$work/single.log" \
  || { cat "$work/single.log"; fail "single-process run"; }
"$train" --config "$work/train.yaml" --output-dir "$work/ddp" --max-steps 2 --nproc-per-node 2 \
  2> "$work/ddp.log" || { cat "$work/ddp.log"; fail "2-process run"; }
grep -q "on cpu x2" "$work/ddp.log" || { cat "$work/ddp.log"; fail "2-process run did not report 2 ranks"; }
cat > "$work/compare.py" <<'PY'
import array, json, struct, sys
def read(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info["dtype"]
        a, b = info["data_offsets"]
        out[name] = array.array("f", data[8 + n + a:8 + n + b])
    return out
single, ddp = read(sys.argv[1]), read(sys.argv[2])
assert single.keys() == ddp.keys()
worst = max(max(abs(x - y) for x, y in zip(single[k], ddp[k])) for k in single)
print(f"max |a - b| = {worst:.3g}")
sys.exit(0 if (worst < 5e-5) == (sys.argv[3] == "same") else 1)
PY
python3 "$work/compare.py" "$work/single/step-0000002/transformer/diffusion_pytorch_model.safetensors" \
  "$work/ddp/step-0000002/transformer/diffusion_pytorch_model.safetensors" same \
  || fail "1 process x 2 samples and 2 processes x 1 sample trained different weights"
# The comparison has teeth: the batch-1 run of the same 2 steps trained different weights.
python3 "$work/compare.py" "$work/single/step-0000002/transformer/diffusion_pytorch_model.safetensors" \
  "$work/out/step-0000002/transformer/diffusion_pytorch_model.safetensors" different \
  || fail "batch 1 and batch 2 trained the same weights"

# Serve the fine-tuned transformer.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$server" --model tiny --transformer "$work/out/step-0000004/transformer" --port "$port" \
  --metrics-port 0 --device cpu --output-dir "$work/jobs" > "$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
  "$cli" health --server "127.0.0.1:$port" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat "$work/server.log"; fail "server exited"; }
  sleep 0.25
done
"$cli" generate --server "127.0.0.1:$port" --prompt "a red fox" --width 64 --height 64 \
  --frames 5 --steps 2 --format png --out "$work/v.tar" 2> "$work/gen.err" \
  || { cat "$work/gen.err" "$work/server.log"; fail "generate with the fine-tuned model"; }
[ "$(tar -tf "$work/v.tar" | grep -c '\.png$')" = 5 ] || fail "want 5 frames"
grep -q "step-0000004/transformer" "$work/server.log" || { cat "$work/server.log"; fail "server log does not name the transformer"; }
echo PASS
