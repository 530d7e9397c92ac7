"""Decoding and preprocessing JPEGs for the encoder: in full, or at the JPEG's own DCT scale (draft mode).

    python bench/jpeg_draft.py --images 200 --size 224

Writes COCO-shaped 640x480 JPEGs (data_prep/make_coco_synthetic.py's photograph-like images) to a temporary
folder, then times, in this one process, what a Captioner's DataLoader worker does per image: load_image
(in full, then with draft_size = the encoder's input side) and open_clip's inference preprocess at that
side (resize the shorter side with bicubic, centre crop, normalise). Prints milliseconds per image for
both, their ratio, and how far apart the two preprocessed tensors are (mean absolute difference, in the
normalised units the encoder reads). The baseline is the full decode in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vision_rwkv.caption.images import load_image  # noqa: E402
from vision_rwkv.cli.prep.make_coco_synthetic import main as make_coco  # noqa: E402


def per_image_ms(paths, preprocess, draft_size, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for p in paths:
            preprocess(load_image(p, draft_size=draft_size))
        times.append((time.perf_counter() - start) / len(paths) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=224, help="the encoder's input side")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import open_clip

    torch.set_num_threads(1)  # one DataLoader worker's view
    preprocess = open_clip.image_transform(args.size, is_train=False)
    with tempfile.TemporaryDirectory() as tmp:
        make_coco(["--out", tmp, "--train", str(args.images), "--val", "0", "--test", "0"])
        paths = sorted(Path(tmp).rglob("*.jpg"))
        full = per_image_ms(paths, preprocess, None, args.rounds)
        draft = per_image_ms(paths, preprocess, args.size, args.rounds)
        gap = statistics.mean(float((preprocess(load_image(p)) - preprocess(load_image(p, draft_size=args.size)))
                                    .abs().mean()) for p in paths[:50])
        decoded = load_image(paths[0], draft_size=args.size).size
    print(f"{len(paths)} 640x480 JPEGs, preprocess to {args.size} px, one thread, torch {torch.__version__}")
    print("| decode | ms per image (decode + preprocess) | images/s |")
    print("|---|---|---|")
    print(f"| full (640x480) | {full:.2f} | {1e3 / full:,.0f} |")
    print(f"| draft ({decoded[0]}x{decoded[1]}) | {draft:.2f} | {1e3 / draft:,.0f} ({full / draft:.2f}x) |")
    print(f"mean |difference| of the preprocessed tensors: {gap:.4f} (normalised units)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
