"""Write the synthetic shapes data set: images/<split>/<image_id>.png and metadata.jsonl.

    python data_prep/make_shapes.py --out data/shapes --train 20000 --val 500 --test 500 --size 64 --seed 0
    python data_prep/make_shapes.py --out data/shapes_comp --split compositional    # held-out compositions

Each example comes from its own random stream (seed, split, index), so a re-run with the same --seed and
--size skips every image already written and adds only the missing ones; larger counts extend the set.
Images are written under a temporary name and renamed; metadata.jsonl, which lists every image with its
captions and objects, is written last, so a folder with a metadata.jsonl is complete.
The folder is read by load_source with data.source=shapes (see vision_rwkv/data.py).

--split compositional keeps the compositions of vision_rwkv.synthetic.shapes.COMPOSITIONAL (three
(colour, kind) pairs, and three (kind, place) pairs of lone shapes) out of the train and val scenes;
test scenes are drawn freely, and each test record lists under "heldout" the held-out compositions it
shows (empty for a seen scene). shapes_accuracy.py reports exact match on both kinds of test scene.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ..._fs import atomic_file, atomic_write
from ...errors import VisionRWKVError
from ...synthetic.shapes import HOLDOUTS, make_captions, render, sample_objects
from .records import claim_settings, split_counts

SPLITS = ("train", "val", "test")
ID_STRIDE = 10_000_000  # image_id = split index * ID_STRIDE + example index: unique, and stable as counts grow
PARAMS_FILE = "shapes.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--train", type=int, default=20000, help="number of training images")
    ap.add_argument("--val", type=int, default=500, help="number of validation images")
    ap.add_argument("--test", type=int, default=1000, help="number of test images")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=sorted(HOLDOUTS), default="standard",
                    help="standard: every split drawn alike; compositional: some compositions never in train/val")
    args = ap.parse_args(argv)

    try:
        counts = _check_args(args)
        written, kept, changed = make_shapes(args.out, counts, args.size, args.seed, args.split)
    except VisionRWKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = "written" if changed else "up to date"
    print(f"{args.out}: {written + kept} images ({written} written, {kept} already there), metadata.jsonl {state}")
    return 0


def _check_args(args) -> dict[str, int]:
    if args.out.exists() and not args.out.is_dir():
        raise VisionRWKVError(f"--out {args.out} is a file; expected a folder (new or made by make_shapes.py)")
    counts = split_counts(args, ID_STRIDE)
    if not 16 <= args.size <= 1024:
        raise VisionRWKVError(f"--size is {args.size}; expected 16 to 1024 pixels")
    return counts


def make_shapes(out: Path, counts: dict[str, int], size: int, seed: int,
                split_kind: str = "standard") -> tuple[int, int, bool]:
    """Write the missing images, then the metadata; returns (images written, images kept, metadata changed)."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seed": seed, "size": size, "format": 1} | ({} if split_kind == "standard" else {"split": split_kind})
    claim_settings(out, settings, PARAMS_FILE, "*/*.png", "make_shapes.py", "the same --seed, --size and --split")
    lines, written, kept = [], 0, 0
    for split_index, split in enumerate(SPLITS):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            record, new = _example(out, split, split_index * ID_STRIDE + i, i, size, seed, split_kind)
            lines.append(json.dumps(record))
            written, kept = written + new, kept + (not new)
    text = "\n".join(lines) + "\n"
    metadata = out / "metadata.jsonl"
    changed = not metadata.is_file() or metadata.read_text(encoding="utf-8") != text
    if changed:
        atomic_write(metadata, text)
    return written, kept, changed


def _example(out: Path, split: str, image_id: int, index: int, size: int, seed: int,
             split_kind: str = "standard") -> tuple[dict, bool]:
    # One stream per example: regenerating example i never depends on how many came before it.
    holdout = HOLDOUTS[split_kind]
    rng = random.Random(f"shapes/{seed}/{split}/{index}")
    objects = sample_objects(rng, None if split == "test" else holdout)
    file_name = f"images/{split}/{image_id}.png"
    path = out / file_name
    new = not path.is_file()
    if new:
        with atomic_file(path) as tmp:
            render(objects, size).save(tmp, format="PNG")
    record = {"file_name": file_name, "image_id": image_id, "split": split, "captions": make_captions(objects),
              "objects": objects}
    if split_kind != "standard" and split == "test":
        record["heldout"] = holdout.shown(objects)
    return record, new


if __name__ == "__main__":
    sys.exit(main())
