#!/usr/bin/env bash
# caption.py's weights on CUDA, fp32 against bf16 (dtype=fp32 | bf16), in one call: the demo model's
# accuracy on 1,000 held-out shapes images, and captioning images/s on N photo-sized JPEGs with a
# ViT-B-16 + RWKV-7 L12-D768 checkpoint of random weights (greedy, exactly 20 tokens). Also runs every
# GPU test first. Output: $OUT/dtype.txt
# Usage (repo root, GPU machine): [N=4000] [BATCHES="32 256"] [CHECKS=0: skip tests and accuracy] bash bench/device_dtype.sh
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache
S=$OUT/dtype.txt; N=${N:-4000}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$S"
if [ "${CHECKS:-1}" != 0 ]; then
python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -3 | tee -a "$S"
python3 data_prep/make_shapes.py --out /tmp/shp --train 1 --val 1 --test 1000 --size 64 --seed 0 > /dev/null
for d in fp32 bf16; do
  echo "demo, $d weights: $(python3 data_prep/shapes_accuracy.py --checkpoint vision_rwkv/assets/demo --data /tmp/shp \
    --device cuda --dtype $d --no-cider | head -1)" | tee -a "$S"
done
fi
python3 - "$N" <<'PY' 2>&1 | tee -a "$S"
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, "bench")
from caption_throughput import build_model, make_jpegs
from vision_rwkv.model import save_caption_model
make_jpegs(Path("/tmp/jpegs_dtype"), int(sys.argv[1]), processes=os.cpu_count() or 1)
save_caption_model(build_model("cpu"), "/tmp/l12_dtype", dtype=torch.bfloat16)
PY
python3 -c "from vision_rwkv.ops.wkv7.cuda import build; print('kernel:', build() or 'ok')" | tee -a "$S"  # not in the timing
for B in ${BATCHES:-32 256}; do for d in fp32 bf16; do
  python3 caption.py /tmp/jpegs_dtype checkpoint=/tmp/l12_dtype batch_size=$B dtype=$d num_workers=14 \
    sampling.max_new_tokens=20 sampling.min_new_tokens=20 progress=false out=/tmp/o_${B}_$d.jsonl 2> /tmp/e.txt
  echo "batch $B, $d weights: $(tail -1 /tmp/e.txt)" | tee -a "$S"
done; done
