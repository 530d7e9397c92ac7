#!/usr/bin/env bash
# The captioning server's GPU figures in one device call (issue 21): the worker alone, then the load test on
# the throughput model, once per HTTP_PROCESSES value (0: one process; N: the model in its own process behind
# N HTTP processes). Results: $OUT/serve_worker.log, $OUT/serve_load_<N>.{json,log}; each level's line also
# reaches the log as it ends, so a run cut short keeps what it measured.
# Usage (repo root): [HTTP_PROCESSES="0 4" CLIENTS=1,32,128 RATES=0.5x,2x (empty: none) SECONDS_PER_LEVEL=4
#   WORKER=1 (0: skip serve_worker.py)] bash bench/device_serve.sh [serve_load.py args, which override these]
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/serve_worker.log"
if [ "${WORKER:-1}" = 1 ]; then
  timeout 150 python3 bench/serve_worker.py --rows 1,32,128 --joins 1,16,22,64 2>&1 | grep --line-buffered -v "Warn" \
    | tee -a "$OUT/serve_worker.log"
fi
for n in ${HTTP_PROCESSES-0 4}; do
  timeout 300 python3 bench/serve_load.py --model throughput --device cuda --seconds "${SECONDS_PER_LEVEL:-4}" \
    --max-batch 128 --max-queue 512 --max-new-tokens 20 --client-procs 8 --warmup-seconds 2 \
    --clients "${CLIENTS-1,32,128}" --rates "${RATES-0.5x,2x}" --http-processes "$n" \
    --json "$OUT/serve_load_$n.json" "$@" 2>&1 | grep --line-buffered -v "Warn" | tee "$OUT/serve_load_$n.log"
done
