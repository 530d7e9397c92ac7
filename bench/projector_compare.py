"""Projectors compared on the compositional shapes benchmark: accuracy on seen and held-out compositions.

    python bench/projector_compare.py --data /tmp/shapes_comp --runs /tmp/runs --steps 1000 --parallel 9

Makes the data set (data_prep/make_shapes.py --split compositional) unless it is there, then trains one
`experiment=shapes_demo` run per (projector, seed) with the same encoder, decoder, data and steps (the
random frozen encoder and the decoder's initialisation come from the seed, so every projector of one
seed starts from the same encoder and decoder), several runs at once on one GPU, and scores each final
checkpoint on the test split with data_prep/shapes_accuracy.py (greedy, bf16 on CUDA): exact match on
all test scenes, on those with only seen compositions, on those showing a held-out one, and on 3-shape
scenes, and CIDEr-D. Prints one row per projector, the mean and spread over seeds, and writes every run's
figures to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("linear", "mlp", "clipcap", "resampler", "state", "state_prefix")


def make_data(data: Path, seed: int, counts: list[str]) -> None:
    train, val, test = counts
    subprocess.run([sys.executable, "data_prep/make_shapes.py", "--out", str(data), "--train", train, "--val", val,
                    "--test", test, "--size", "64", "--seed", str(seed), "--split", "compositional"],
                   cwd=ROOT, check=True)


def train_args(kind: str, seed: int, data: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "train_caption.py", "experiment=shapes_demo", f"projector={kind}",
            f"trainer.seed={seed}", f"data.path={data}", f"data.feature_cache={data}/features",
            f"trainer.out_dir={out}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
            f"trainer.save_every={steps}", "trainer.progress=false", "data.num_workers=1", "trainer.cider_eval=false",
            *extra]


def run_all(jobs: list[tuple[str, int]], args) -> dict[tuple[str, int], float]:
    """Train and then score every (kind, seed), args.parallel jobs at a time (scoring runs inside each job,
    so the GPU stays shared to the end); returns each job's wall time in seconds."""
    pending, running, walls = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            kind, seed = pending.pop(0)
            out = args.runs / f"{kind}-{seed}"
            train = train_args(kind, seed, args.data, out, args.steps, args.train_arg)
            score_cmd = [sys.executable, __file__, "--score-one", f"{kind},{seed}", "--data", str(args.data),
                         "--runs", str(args.runs), "--steps", str(args.steps)]
            log = open(args.runs / f"{kind}-{seed}.log", "w")
            script = " ".join(map(shlex.quote, train)) + " && " + " ".join(map(shlex.quote, score_cmd))
            running[(kind, seed)] = (subprocess.Popen(["bash", "-c", script], cwd=ROOT, stdout=log,
                                                      stderr=subprocess.STDOUT), time.perf_counter(), log)
        time.sleep(1)
        for key, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                walls[key] = time.perf_counter() - start
                del running[key]
                state = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode}; see {log.name})"
                print(f"{key[0]} seed {key[1]}: {state} in {walls[key]:.0f} s", flush=True)
    return walls


def score(kind: str, seed: int, data: Path, runs: Path, steps: int) -> dict:
    import torch

    from vision_rwkv.caption.model import load_caption_model
    from vision_rwkv.cli.prep.shapes_accuracy import accuracy

    ckpt = runs / f"{kind}-{seed}" / "checkpoints" / f"step-{steps:07d}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = accuracy(ckpt, data, "test", batch_size=250, device=device, dtype="bf16" if device == "cuda" else "fp32")
    model = load_caption_model(ckpt)
    result["projector_params"] = sum(p.numel() for p in model.projector.parameters())
    result.pop("examples", None)
    result.update(kind=kind, seed=seed, steps=steps,
                  exact_3=result["exact_by_shapes"].get("3", result["exact_by_shapes"].get(3)))
    return result


def summary(rows: list[dict]) -> str:
    cols = [("exact", "exact (all)"), ("exact_seen", "seen"), ("exact_heldout", "held-out"),
            ("exact_3", "3 shapes"), ("cider", "CIDEr-D")]
    lines = ["| projector | parameters | " + " | ".join(c[1] for c in cols) + " | job s |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        cells = []
        for key, _ in cols:
            values = [r[key] for r in mine if r.get(key) is not None]
            if not values:
                cells.append("n/a")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            scale = 1.0 if key == "cider" else 100.0
            cells.append(f"{statistics.mean(values) * scale:.1f} ± {spread * scale:.1f}")
        walls = [r["train_s"] for r in mine]
        wall = f"{statistics.mean(walls):.0f}" if walls else "n/a"
        lines.append(f"| {kind} | {mine[0]['projector_params']:,} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/shapes_comp"))
    ap.add_argument("--runs", type=Path, default=Path("/tmp/projector_runs"))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=max(1, min(18, os.cpu_count() or 2)),
                    help="runs trained at once (they share the GPU)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--images", default="20000,500,1000", help="train,val,test images of the data set")
    ap.add_argument("--train-arg", action="append", default=[], help="one more override for every run")
    ap.add_argument("--out", type=Path, default=None, help="write every run's figures here (JSON)")
    ap.add_argument("--score-one", default=None, help=argparse.SUPPRESS)  # KIND,SEED: a job's scoring step
    args = ap.parse_args(argv)
    if args.score_one:
        kind, seed = args.score_one.split(",")
        result = score(kind, int(seed), args.data, args.runs, args.steps)
        (args.runs / f"{kind}-{seed}.json").write_text(json.dumps(result))
        return 0
    kinds, seeds = args.kinds.split(","), [int(s) for s in args.seeds.split(",")]
    if bad := [k for k in kinds if k not in KINDS]:
        ap.error(f"unknown projector {bad[0]!r}; expected some of {', '.join(KINDS)}")
    args.runs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    make_data(args.data, args.data_seed, args.images.split(","))
    print(f"data ready in {time.perf_counter() - start:.0f} s", flush=True)
    from vision_rwkv.ops.wkv7.cuda import build

    build()  # once, before the runs that all need it
    walls = run_all([(k, s) for s in seeds for k in kinds], args)
    rows = []
    for (kind, seed), wall in sorted(walls.items()):
        path = args.runs / f"{kind}-{seed}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text()) | {"train_s": wall}
        rows.append(result)
        print(f"{kind} seed {seed}: exact {result['exact']:.3f}, seen {result.get('exact_seen', float('nan')):.3f}, "
              f"held-out {result.get('exact_heldout', float('nan')):.3f}, CIDEr {result['cider']:.3f}", flush=True)
    print(summary(rows))
    print(f"total {time.perf_counter() - start:.0f} s, {args.steps} steps per run, {args.parallel} runs at a time")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
