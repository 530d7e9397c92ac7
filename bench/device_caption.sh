#!/usr/bin/env bash
# Captioning throughput on the device machine (bench/caption_throughput.py), with the packages the
# machine lacks installed from .whl/. Results: $OUT/caption_throughput.{json,log}.
# Usage (repo root): bash bench/device_caption.sh [caption_throughput.py args]
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/caption_throughput.log"
python3 -c "from vision_rwkv.ops.wkv7.cuda import build; r = build(); print('kernel:', r or 'ok')" \
  2>&1 | tail -1 | tee -a "$OUT/caption_throughput.log"
python3 bench/caption_throughput.py --folder /tmp/jpegs --out "$OUT/caption_throughput.json" "$@" 2>&1 \
  | grep --line-buffered -v "UserWarning\|y, wkv_state = wkv7" | tee -a "$OUT/caption_throughput.log"
