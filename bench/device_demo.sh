#!/usr/bin/env bash
# Train the shipped demo model on the device machine with the repository's own pipeline, score it on
# the held-out shapes, and export it (bf16) to $OUT/demo. Every stage is timed and logged to $OUT.
# Usage (repo root): [TRAIN=6000 VAL=200 TEST=1000 TRAIN_ARGS="..."] bash bench/device_demo.sh
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
stage() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"; return $rc; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/stages.txt"
stage shapes 120 python3 data_prep/make_shapes.py --out data/shapes --train "${TRAIN:-20000}" --val "${VAL:-500}" \
  --test "${TEST:-1000}" --size 64 --seed 0 || exit 1
stage kernel 300 python3 -c "from vision_rwkv.ops.wkv7.cuda import build; r = build(); print(r or 'ok'); assert not r" || exit 1
stage train "${TRAIN_LIMIT:-400}" python3 train_caption.py experiment=shapes_demo trainer.cider_eval=false \
  trainer.progress=false trainer.log_every=50 ${TRAIN_ARGS:-}
cp runs/shapes_demo/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
stage export 60 python3 data_prep/export_model.py --checkpoint runs/shapes_demo/checkpoints/latest \
  --out "$OUT/demo" --dtype bf16 || exit 1
stage accuracy 120 python3 data_prep/shapes_accuracy.py --checkpoint "$OUT/demo" --data data/shapes --split test \
  --device cuda --out "$OUT/accuracy.json"
cat "$OUT/accuracy.log"
tar -C "$OUT" -cf "$OUT/demo.tar" demo && rm -r "$OUT/demo"  # one file: the device returns few files
