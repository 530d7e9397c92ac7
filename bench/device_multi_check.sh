#!/usr/bin/env bash
# Follow-up to device_multi.sh on a 2-GPU machine: how close 2 GPUs x B track 1 GPU x 2B, against the
# run-to-run noise of one GPU, in bf16 (the default) and in fp32; and samples/s with the shapes
# config's DataLoader workers. Summary in $OUT/check.txt.
# Usage (repo root): [STEPS=200 FP32_STEPS=60] bash bench/device_multi_check.sh
# (CPU smoke run: STEPS=30 FP32_STEPS=3 TRAIN_N=64 EXTRA="trainer.device=cpu encoder=tiny data.batch_size=8 ...")
set -uo pipefail
source bench/device_env.sh  # OUT, wheels, PYTHONPATH, kernel cache, multicast off
STEPS=${STEPS:-200}; FP32_STEPS=${FP32_STEPS:-60}
S=$OUT/check.txt
stage() { local name=$1; shift; local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$S"; return $rc; }
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$S"
stage shapes python3 data_prep/make_shapes.py --out data/shapes --train ${TRAIN_N:-20000} --val 200 --test 10 --size 64 --seed 0
stage kernel python3 -c "from vision_rwkv.ops.wkv7.cuda import build; r = build(); print(r or 'ok'); assert not r"
T="experiment=shapes_demo trainer.eval_every=0 trainer.save_every=0 trainer.cider_eval=false trainer.progress=false
  trainer.log_every=10 hydra.output_subdir=null ${EXTRA:-}"
one() { stage "$1" python3 train_caption.py $T trainer.out_dir=runs/$1 hydra.run.dir=runs/$1/h "${@:2}"; }
two() { stage "$1" torchrun --standalone --nproc_per_node=2 train_caption.py $T trainer.out_dir=runs/$1 \
  hydra.run.dir=runs/$1/h "${@:2}"; }
one bf16_1gpu_a trainer.max_steps=$STEPS   # builds the feature cache first
one bf16_1gpu_b trainer.max_steps=$STEPS
two bf16_2gpu trainer.max_steps=$STEPS data.batch_size=128
two bf16_2gpu_b256 trainer.max_steps=$STEPS
one fp32_1gpu trainer.max_steps=$FP32_STEPS trainer.precision=fp32 trainer.log_every=1
two fp32_2gpu trainer.max_steps=$FP32_STEPS trainer.precision=fp32 trainer.log_every=1 data.batch_size=128
python3 - <<'EOF' | tee -a "$S"
import json, statistics
def load(r):
    return {x["step"]: x for x in map(json.loads, open(f"runs/{r}/metrics.jsonl")) if "loss" in x}
def diff(a, b):
    steps = sorted(set(a) & set(b))
    rel = [abs(a[s]["loss"] - b[s]["loss"]) / a[s]["loss"] for s in steps]
    first = next((s for s, r in zip(steps, rel) if r > 1e-3), None)
    return (f"{len(steps)} logged steps: max rel. diff {max(rel):.2e}, mean {statistics.mean(rel):.2e}, "
            f"first step above 1e-3: {first}; last loss {a[steps[-1]]['loss']:.4f} vs {b[steps[-1]]['loss']:.4f}")
r = {k: load(k) for k in ("bf16_1gpu_a", "bf16_1gpu_b", "bf16_2gpu", "bf16_2gpu_b256", "fp32_1gpu", "fp32_2gpu")}
print("bf16, 1 GPU vs 1 GPU again (run-to-run noise):", diff(r["bf16_1gpu_a"], r["bf16_1gpu_b"]))
print("bf16, 1 GPU x 256 vs 2 GPUs x 128:           ", diff(r["bf16_1gpu_a"], r["bf16_2gpu"]))
print("fp32, 1 GPU x 256 vs 2 GPUs x 128:           ", diff(r["fp32_1gpu"], r["fp32_2gpu"]))
rate = lambda g: statistics.median(x["samples_per_s"] for s, x in g.items() if s > 20)
a, b, c = rate(r["bf16_1gpu_b"]), rate(r["bf16_2gpu"]), rate(r["bf16_2gpu_b256"])
print(f"samples/s with data.num_workers=4 (median, steps > 20): 1 GPU x 256 {a:.0f}; 2 GPUs x 128 {b:.0f} "
      f"({b / a:.2f}x, efficiency {b / (2 * a):.0%}); 2 GPUs x 256 {c:.0f} ({c / a:.2f}x, efficiency {c / (2 * a):.0%})")
EOF
for r in bf16_1gpu_a bf16_1gpu_b bf16_2gpu bf16_2gpu_b256 fp32_1gpu fp32_2gpu; do cp runs/$r/metrics.jsonl "$OUT/m_$r.jsonl"; done
tar -C "$OUT" -czf /tmp/check_logs.tgz . && mv /tmp/check_logs.tgz "$OUT/logs.tgz"
