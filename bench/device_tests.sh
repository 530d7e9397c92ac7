#!/usr/bin/env bash
# The GPU test record on the device machine (every change to kernels, ops or CUDA-graph code needs one): the
# gpu-marked tests, then the fused ops' own test files, which are not gpu-marked (most of their tests run on
# the CPU too, and those that need the kernels skip without them). Results: $OUT/gpu_tests.log,
# $OUT/ops_tests.log, each ending with pytest's summary line.
# Usage (repo root): bash bench/device_tests.sh
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu_tests.log"
git log -1 --format="tree of %h (the device copy's HEAD may be stale: name the local commit)" 2>/dev/null \
  | tee -a "$OUT/gpu_tests.log"
python3 -m pytest -m gpu -q -p no:cacheprovider -rs 2>&1 | grep --line-buffered -v "Warn" \
  | tail -30 | tee -a "$OUT/gpu_tests.log"
python3 -m pytest -q -p no:cacheprovider tests/ops/test_rwkv7_step.py tests/ops/test_rwkv7_train.py 2>&1 \
  | tail -8 | tee "$OUT/ops_tests.log"
