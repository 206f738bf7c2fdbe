#!/usr/bin/env bash
# One command on the GPU machine: build sparge-train and trainer_test (CUDA, no FFmpeg), run the
# trainer tests (the GPU one checks sparse self-attention gradients through the CUDA kernels
# against the fp32 reference), then time distillation steps of the Wan2.1-1.3B DiT
# ("wan1.3b-random": real 1.3B DiT shapes, seeded weights, tiny text encoder) in bf16 with
# activation checkpointing at 480x832x81 (32760 tokens): a SpargeAttention2 student (top-k 0.05,
# i.e. 95% sparse, blocks 128x64; SPARSE_MODE=hybrid for the config's hybrid default) against a
# dense student as the baseline, same run. The seeded random weights attend almost uniformly, so
# hybrid's top-p 0.9 keeps ~88% of the blocks there (measured: 12% sparsity); real Wan weights
# are peaked, which is why the benchmark's default is top-k alone.
# Writes bench/results-style JSON to $OUT. Carry .gpudeps (../shared/tools/device-deps).
#   OUT=/tmp/o BENCH_COMMIT=<sha> bash bench/trainer/device_train.sh [steps]
set -uo pipefail
OUT=${OUT:-/tmp/sparge-out}
mkdir -p "$OUT"
repo=$(pwd)
steps=${1:-8}
source "$repo/bench/gpu_build.sh"
targets="sparge-train trainer_test trainer_distributed_test"
[ -n "${SKIP_TESTS:-}" ] && targets=sparge-train  # timing only
gpu_build $targets
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
if [ -z "${SKIP_TESTS:-}" ]; then
  SPARGE_SOURCE_DIR=$repo "$repo/build-gpu/tests/trainer/trainer_test" > "$OUT/trainer_test.log" 2>&1
  echo "trainer_test rc=$?"
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|max abs" "$OUT/trainer_test.log" | head -30
fi
if [ -z "${SKIP_TESTS:-}" ] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  "$repo/build-gpu/tests/trainer/trainer_distributed_test" > "$OUT/dist_test.log" 2>&1
  echo "trainer_distributed_test rc=$?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure" "$OUT/dist_test.log" | head
fi

work=$repo/train-bench; rm -rf "$work"; mkdir -p "$work"
printf 'a red fox running through fresh snow\nwaves breaking on a rocky beach at sunset\n' > "$work/prompts.txt"
run() {  # name mode [extra sed]
  local name=$1 mode=$2
  sed -e "s|prompts: \"\"|prompts: $work/prompts.txt|" -e "s|^model: tiny|model: wan1.3b-random|" \
      -e "s|^device: cpu|device: cuda|" -e "s|^dtype: float32|dtype: bfloat16|" \
      -e "s|teacher_steps: 30|teacher_steps: 2|" -e "s|  mode: hybrid|  mode: $mode|" \
      -e "s|every_steps: 200|every_steps: 0|" -e "s|  every_steps: 10|  every_steps: 1|" \
      -e "s|eval_every_steps: 100|eval_every_steps: 0|" \
      "$repo/config/trainer.yaml" > "$work/$name.yaml"
  log "train $name"
  "$repo/build-gpu/trainer/sparge-train" --config "$work/$name.yaml" --output-dir "$work/$name" \
    --max-steps "$steps" > "$OUT/train_$name.log" 2>&1
  echo "$name rc=$?"; grep -E "step [0-9]+/|error|Error" "$OUT/train_$name.log" | tail -4
}
run sparse "${SPARSE_MODE:-topk}"
# The dense run reuses the sparse run's teacher latents.
mkdir -p "$work/dense"; cp -r "$work/sparse/cache" "$work/dense/"
run dense dense
python3 - "$work" "$OUT" "$card" "${BENCH_COMMIT:-unknown}" "$steps" "${SPARSE_MODE:-topk}" <<'PY'
import json, sys, datetime, statistics
work, out, card, commit, steps = sys.argv[1:6]
res = {"card": card, "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
       "model": "wan1.3b-random (Wan2.1-1.3B DiT shapes)", "dtype": "bfloat16",
       "video": "480x832x81 (32760 tokens)", "batch": 1, "activation_checkpointing": True,
       "sparsity_knobs": sys.argv[6] + " topk 0.05 topp 0.9, blocks 128x64", "runs": {}}
for name in ("sparse", "dense"):
    try:
        rows = [json.loads(l) for l in open(f"{work}/{name}/train_log.jsonl")]
    except OSError:
        continue
    timed = rows[2:] if len(rows) > 3 else rows  # first steps warm up (cuDNN/cuBLAS plans)
    res["runs"][name] = {
        "steps": len(rows), "seconds_per_step_median": statistics.median(r["seconds_per_step"] for r in timed),
        "peak_memory_gb": max(r["peak_memory_bytes"] for r in rows) / 1e9,
        "loss": [r["loss"] for r in rows], "sparsity": statistics.mean(r["sparsity"] for r in rows)}
if "sparse" in res["runs"] and "dense" in res["runs"]:
    res["speedup_step_sparse_vs_dense"] = (res["runs"]["dense"]["seconds_per_step_median"] /
                                          res["runs"]["sparse"]["seconds_per_step_median"])
name = f"{out}/train_step_{card.replace(' ', '_')}_{datetime.date.today()}.json"
json.dump(res, open(name, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
for k, v in res["runs"].items():
    print(k, {kk: vv for kk, vv in v.items() if kk != "loss"})
PY
log "done"
