#!/usr/bin/env bash
# One device call: install carried wheels, build, run the GPU tests and the WKV-7 benchmark.
# Usage on the device machine (repo root):
#   [TESTS="tests/ops/test_wkv7_cuda.py"] [LAYOUTS="auto 2"] [BENCH_ARGS=...] bash bench/device_wkv7.sh
# Layout "auto" also times the PyTorch path; the others skip it. Then the automatic layout and fla again,
# replayed from CUDA graphs (--graph: device time, no host overhead).
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "from vision_rwkv.ops.wkv7.cuda import build; r = build(); print('build:', r or 'ok'); assert r is None" 2>&1 | tail -3
python3 -m pytest -q --tb=line -p no:cacheprovider -m gpu ${TESTS:-tests/ops/test_wkv7_cuda.py} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
for layout in ${LAYOUTS:-auto}; do
  python3 bench/wkv7.py $( [ "$layout" = auto ] || echo --layout $layout --no-torch) ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_layout$layout.txt"
done
# device time only: the same calls replayed from CUDA graphs (automatic layout, no PyTorch path)
python3 bench/wkv7.py --graph --no-torch ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_graph.txt"
