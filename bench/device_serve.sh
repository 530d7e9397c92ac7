#!/usr/bin/env bash
# The captioning server's GPU figures in one device call (issue 21): the worker alone, then the load test on
# the throughput model. Results: $OUT/serve_worker.log, $OUT/serve_load.{json,log}; each level's line also
# reaches the log as it ends, so a run cut short keeps what it measured.
# Usage (repo root): [CLIENTS=1,32,128 RATES=0.5x,2x (empty: none) SECONDS_PER_LEVEL=4] bash bench/device_serve.sh
#   [serve_load.py args, which override the defaults above]
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/serve_worker.log"
timeout 150 python3 bench/serve_worker.py --rows 1,32,128 --joins 1,16,22,64 2>&1 | grep --line-buffered -v "Warn" \
  | tee -a "$OUT/serve_worker.log"
timeout 300 python3 bench/serve_load.py --model throughput --device cuda --seconds "${SECONDS_PER_LEVEL:-4}" \
  --max-batch 128 --max-queue 512 --max-new-tokens 20 --client-procs 8 --warmup-seconds 2 \
  --clients "${CLIENTS-1,32,128}" --rates "${RATES-0.5x,2x}" --json "$OUT/serve_load.json" "$@" 2>&1 \
  | grep --line-buffered -v "Warn" | tee "$OUT/serve_load.log"
