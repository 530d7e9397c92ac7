#!/usr/bin/env bash
# Train the shipped demo model on the device machine with the repository's own pipeline, score it on
# the held-out shapes, and export it (bf16) to $OUT/demo. Usage (repo root): bash bench/device_demo.sh
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 VISION_RWKV_CACHE=/tmp/vrcache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 data_prep/make_shapes.py --out data/shapes --train ${TRAIN:-20000} --val ${VAL:-500} --test ${TEST:-1000} --size 64 --seed 0
time python3 train_caption.py experiment=shapes_demo trainer.cider_eval=false trainer.progress=false \
  trainer.log_every=100 ${TRAIN_ARGS:-} 2>&1 | tail -5
tail -3 runs/shapes_demo/metrics.jsonl
python3 data_prep/export_model.py --checkpoint runs/shapes_demo/checkpoints/latest --out "$OUT/demo" --dtype bf16
python3 data_prep/shapes_accuracy.py --checkpoint "$OUT/demo" --data data/shapes --split test --device cuda \
  --out "$OUT/accuracy.json"
cp runs/shapes_demo/metrics.jsonl "$OUT/metrics.jsonl"
