#!/usr/bin/env bash
# Multi-GPU measurements (issue 6) on a machine with 2 GPUs: DDP training and sharded captioning against
# one GPU, in one go. Results in $OUT: multi.txt (summary), train_*.jsonl (metrics), logs.
# Usage (repo root): [STEPS=400] bash bench/device_multi.sh
# (a CPU smoke run: STEPS=4 TRAIN_N=64 TEST_N=40 TRAIN_EXTRA="trainer.device=cpu data.batch_size=8 ...")
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
STEPS=${STEPS:-400}; HALF=$((STEPS / 2))
S=$OUT/multi.txt
stage() { local name=$1; shift; local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$S"; return $rc; }
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$S"
nvidia-smi topo -m 2>/dev/null | head -4 >> "$S"
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$S"
stage shapes python3 data_prep/make_shapes.py --out data/shapes --train ${TRAIN_N:-20000} --val 200 --test ${TEST_N:-10000} --size 64 --seed 0
stage kernel python3 -c "from vision_rwkv.ops.wkv7.cuda import build; r = build(); print(r or 'ok'); assert not r"
TRAIN="experiment=shapes_demo trainer.max_steps=$STEPS trainer.eval_every=$HALF trainer.save_every=$HALF
  trainer.cider_eval=false trainer.progress=false trainer.log_every=10 hydra.output_subdir=null ${TRAIN_EXTRA:-}"
# the feature cache is built once, by the first run (its time is left out of samples/s: steps 21+)
stage train_1gpu_b256 python3 train_caption.py $TRAIN data.batch_size=${B:-256} trainer.out_dir=runs/g1 hydra.run.dir=runs/g1/h
stage train_2gpu_b128_to_half torchrun --standalone --nproc_per_node=2 train_caption.py $TRAIN \
  data.batch_size=$((${B:-256} / 2)) trainer.out_dir=runs/g2 trainer.stop_after=$HALF hydra.run.dir=runs/g2/h
stage train_2gpu_b128_resumed torchrun --standalone --nproc_per_node=2 train_caption.py $TRAIN \
  data.batch_size=$((${B:-256} / 2)) trainer.out_dir=runs/g2 trainer.resume=true hydra.run.dir=runs/g2/h
stage train_2gpu_b256 torchrun --standalone --nproc_per_node=2 train_caption.py $TRAIN \
  data.batch_size=${B:-256} trainer.out_dir=runs/g2w hydra.run.dir=runs/g2w/h
for r in g1 g2 g2w; do cp runs/$r/metrics.jsonl "$OUT/train_$r.jsonl"; done
python3 - "$S" <<'EOF' | tee -a "$S"
import json, statistics, sys
def load(r):
    rows = [json.loads(x) for x in open(f"runs/{r}/metrics.jsonl")]
    return {x["step"]: x for x in rows if "loss" in x}, [x for x in rows if "val_loss" in x]
g1, v1 = load("g1"); g2, v2 = load("g2"); g2w, _ = load("g2w")
skip = 20 if max(g1) > 40 else 0  # the first steps (allocator, autotuning) are left out
rate = lambda g: statistics.median(x["samples_per_s"] for s, x in g.items() if s > skip)
r1, r2, r2w = rate(g1), rate(g2), rate(g2w)
print(f"samples/s (median of logged steps > {skip}): 1 GPU x 256: {r1:.0f}; 2 GPUs x 128 (same global batch): "
      f"{r2:.0f} ({r2 / r1:.2f}x, efficiency {r2 / (2 * r1):.0%}); 2 GPUs x 256: {r2w:.0f} "
      f"({r2w / r1:.2f}x, efficiency {r2w / (2 * r1):.0%})")
common = sorted(set(g1) & set(g2))
rel = [abs(g2[s]["loss"] - g1[s]["loss"]) / g1[s]["loss"] for s in common]
print(f"loss, 1 GPU x 256 vs 2 GPUs x 128 (stopped at half and resumed): {len(common)} logged steps, "
      f"max relative difference {max(rel):.4f}, mean {statistics.mean(rel):.4f}; final "
      f"{g1[common[-1]]['loss']:.4f} vs {g2[common[-1]]['loss']:.4f}")
print("val_loss 1 GPU:", [round(x["val_loss"], 4) for x in v1], " 2 GPUs:", [round(x["val_loss"], 4) for x in v2])
EOF
# Sharded captioning: the 10,000 test images with the demo model, 1 process vs 2 (one per GPU)
CAP="data/shapes/images/test batch_size=256 progress=false ${CAP_EXTRA:-}"
t0=$(date +%s.%N); stage caption_1 python3 caption.py $CAP out=/tmp/c1.jsonl; t1=$(date +%s.%N)
stage caption_2 torchrun --standalone --nproc_per_node=2 caption.py $CAP out=/tmp/c2.jsonl; t2=$(date +%s.%N)
stage caption_start python3 caption.py data/shapes/images/test/20000000.png out=/tmp/c0.jsonl ${CAP_EXTRA:-}
python3 - "$t0" "$t1" "$t2" <<'EOF' | tee -a "$S"
import json, sys
t0, t1, t2 = map(float, sys.argv[1:])
rows = {k: [json.loads(x) for x in open(f"/tmp/{k}.jsonl")] for k in ("c1", "c2")}
for k, secs in (("c1", t1 - t0), ("c2", t2 - t1)):
    paths = [r["path"] for r in rows[k]]
    print(f"{k}: {len(paths)} rows, {len(set(paths))} distinct paths, {sum(r['error'] is not None for r in rows[k])}"
          f" errors, {secs:.1f} s wall (process start and model load included): {len(paths) / secs:.0f} images/s")
a = {r["path"]: r["caption"] for r in rows["c1"]}
b = {r["path"]: r["caption"] for r in rows["c2"]}
print(f"same caption from 1 and 2 processes: {sum(a[p] == b.get(p) for p in a)} of {len(a)}")
EOF
tail -2 "$OUT/caption_2.log" >> "$S"
tar -C "$OUT" -czf /tmp/multi_logs.tgz --exclude multi.txt . && mv /tmp/multi_logs.tgz "$OUT/logs.tgz"
