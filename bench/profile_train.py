"""Where a training step's time goes: data loading vs. the step, and the top ops of the step.

    python bench/profile_train.py experiment=shapes_demo [overrides...]

Builds the trainer exactly as train_caption.py does, then times `--steps` batches from the loader and
`--steps` full optimizer steps (synchronised on CUDA), and prints torch.profiler's top ops for a few steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vision_rwkv.cli.train import compose, to_caption_config  # noqa: E402
from vision_rwkv.train.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = to_caption_config(compose(["trainer.progress=false", "trainer.out_dir=/tmp/profile_train", *args.overrides]))
    tr = Trainer(cfg)
    tr._set_stage("all")
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    batches = tr._batches()
    for _ in range(3):  # warm up (kernel build, allocator, autotuning)
        tr._train_step(batches)
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    load = (time.perf_counter() - t) / args.steps
    t = time.perf_counter()
    for _ in range(args.steps):
        tr._train_step(batches)
    sync()
    step = (time.perf_counter() - t) / args.steps
    print(f"device {tr.device}, batch {cfg.data.batch_size}: loading {load * 1e3:.1f} ms/batch, "
          f"full step (loading included) {step * 1e3:.1f} ms")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if tr.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            tr._train_step(batches)
        sync()
    key = "cuda_time_total" if tr.device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
