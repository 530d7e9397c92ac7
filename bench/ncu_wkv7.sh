#!/usr/bin/env bash
# Nsight Compute profile of the WKV-7 kernels at the benchmark shapes (one forward+backward each, bf16).
# Usage on the device machine (repo root): [SHAPES=...] [LAYOUT=0|1|2|3] bash bench/ncu_wkv7.sh   -> $OUT/ncu_<shape>.txt
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache
python3 -c "from vision_rwkv.ops.wkv7.cuda import build; assert build() is None"
for shape in ${SHAPES:-8,1024,12 64,64,12 4,4096,32}; do
  ncu --clock-control none --kernel-name regex:'(forward|backward)_kernel' \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section InstructionStats \
      python3 - "$shape" "${LAYOUT:-auto}" > "$OUT/ncu_${shape//,/_}.txt" 2>&1 <<'PY'
import sys, torch
from vision_rwkv.ops.wkv7.cuda import wkv7_cuda, pick_layout
B, T, H = map(int, sys.argv[1].split(","))
xs = [torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
layout = pick_layout(B, H, 64, dtype=torch.bfloat16) if sys.argv[2] == "auto" else int(sys.argv[2])
print("layout", layout)
y, s = wkv7_cuda(*xs, layout=layout)
y.backward(torch.randn_like(y))
torch.cuda.synchronize()
PY
  echo "== $shape"; grep -E "layout|Duration|Executed Instructions  |Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Block Limit|One or More" "$OUT/ncu_${shape//,/_}.txt" | head -40
done
