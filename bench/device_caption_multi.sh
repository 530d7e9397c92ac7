#!/usr/bin/env bash
# caption.py on 1 GPU and under torchrun on 2: images/s of the captioning itself (caption.py's summary
# line; process start and model load excluded) on N photo-sized JPEGs with a ViT-B-16 + RWKV-7
# L12-D768 checkpoint of random weights (saved bf16), greedy, exactly 20 tokens. Output: $OUT/multi_caption.txt
# Usage (repo root, 2-GPU machine): [N=20000] bash bench/device_caption_multi.sh
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
S=$OUT/multi_caption.txt; N=${N:-20000}; D=${DIR:-/tmp/jpegs_multi}; M=${MODEL:-/tmp/vitb16_l12}
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$S"
python3 - "$N" "$D" "$M" <<'PY' 2>&1 | tee -a "$S"
import os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "bench")
from caption_throughput import build_model, make_jpegs
from vision_rwkv.model import save_caption_model
n, folder, model = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
t = time.perf_counter()
make_jpegs(folder, n, processes=os.cpu_count() or 1)
print(f"{n} JPEGs in {time.perf_counter() - t:.0f} s")
if not (model / "config.yaml").exists():
    save_caption_model(build_model("cpu"), model, dtype=torch.bfloat16)
PY
python3 -c "from vision_rwkv.ops.wkv7.cuda import build; r = build(); print('kernel:', r or 'ok')" | tee -a "$S"
C="$D checkpoint=$M batch_size=${B:-256} sampling.max_new_tokens=20 sampling.min_new_tokens=20 progress=false"
python3 caption.py $C out=/tmp/m1.jsonl num_workers=${W:-14} 2> "$OUT/m1.err"; tail -1 "$OUT/m1.err" | sed 's/^/1 GPU: /' | tee -a "$S"
torchrun --standalone --nproc_per_node=2 caption.py $C out=/tmp/m2.jsonl num_workers=${W2:-7} 2> "$OUT/m2.err"
grep "captioned" "$OUT/m2.err" | tail -1 | sed 's/^/2 GPUs: /' | tee -a "$S"
python3 - <<'PY' | tee -a "$S"
import json
a = [json.loads(x) for x in open("/tmp/m1.jsonl")]
b = [json.loads(x) for x in open("/tmp/m2.jsonl")]
pa, pb = [r["path"] for r in a], [r["path"] for r in b]
same = sum(x["caption"] == y["caption"] for x, y in zip(a, b))
print(f"rows: {len(a)} and {len(b)}; distinct paths {len(set(pa))} and {len(set(pb))}; same order {pa == pb}; "
      f"same caption {same} of {len(a)}")
PY
