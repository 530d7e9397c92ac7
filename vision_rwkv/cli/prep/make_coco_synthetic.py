"""Write a COCO-shaped synthetic data set: 640x480 JPEGs and a Karpathy split JSON, 5 captions an image.

    python data_prep/make_coco_synthetic.py --out data/coco_synth --train 5000 --val 100 --test 100

For measuring the COCO recipe at its real size where COCO itself cannot be downloaded: the images have
COCO's size and a photograph's JPEG cost (a scene of the shapes world over a textured, noisy background,
at --quality), and the JSON has dataset_coco.json's layout (images/<filepath>/<filename>, imgid, cocoid,
split, five sentences with raw text and tokens), so the real preparation reads it:

    python data_prep/karpathy_to_dataset.py --json data/coco_synth/dataset_coco.json \\
        --image-root data/coco_synth/images --out data/coco_synth_ds

Each image comes from its own random stream (seed, split, index): a re-run with the same settings skips the
images already written and adds only the missing ones. Images are written under a temporary name and
renamed; dataset_coco.json is written last, so a folder holding it is complete.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..._fs import atomic_file, atomic_write
from ...errors import VisionRWKVError
from ...synthetic.shapes import make_captions, render, sample_objects
from .records import claim_settings, split_counts

SPLITS = ("train", "val", "test")
ID_STRIDE = 10_000_000  # cocoid = split index * ID_STRIDE + example index, stable as counts grow
PARAMS_FILE = "coco_synthetic.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--train", type=int, default=1000, help="number of training images")
    ap.add_argument("--val", type=int, default=50, help="number of validation images")
    ap.add_argument("--test", type=int, default=50, help="number of test images")
    ap.add_argument("--width", type=int, default=640, help="image width in pixels (COCO's usual 640)")
    ap.add_argument("--height", type=int, default=480, help="image height in pixels (COCO's usual 480)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality, 1 to 95")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        counts = _check_args(args)
        written, kept = make_coco_synthetic(args.out, counts, (args.width, args.height), args.quality, args.seed)
    except VisionRWKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {written + kept} images ({written} written, {kept} already there) and dataset_coco.json")
    return 0


def _check_args(args) -> dict[str, int]:
    if args.out.exists() and not args.out.is_dir():
        raise VisionRWKVError(f"--out {args.out} is a file; expected a folder (new or made by make_coco_synthetic.py)")
    counts = split_counts(args, ID_STRIDE)
    for name in ("width", "height"):
        if not 16 <= getattr(args, name) <= 4096:
            raise VisionRWKVError(f"--{name} is {getattr(args, name)}; expected 16 to 4096 pixels")
    if not 1 <= args.quality <= 95:
        raise VisionRWKVError(f"--quality is {args.quality}; expected 1 to 95")
    return counts


def make_coco_synthetic(out: Path, counts: dict[str, int], size: tuple[int, int], quality: int,
                        seed: int) -> tuple[int, int]:
    """Write the missing images, then dataset_coco.json; returns (images written, images kept)."""
    out.mkdir(parents=True, exist_ok=True)
    claim_settings(out, {"seed": seed, "width": size[0], "height": size[1], "quality": quality, "format": 1},
                   PARAMS_FILE, "*/*.jpg", "make_coco_synthetic.py", "the same --seed, --width, --height and --quality")
    images, written, kept, sentid = [], 0, 0, 0
    for split_index, split in enumerate(SPLITS):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            cocoid = split_index * ID_STRIDE + i
            filename = f"COCO_synthetic_{cocoid:012d}.jpg"
            rng = random.Random(f"coco_synthetic/{seed}/{split}/{i}")
            objects = sample_objects(rng)
            path = out / "images" / split / filename
            if path.is_file():
                kept += 1
            else:
                with atomic_file(path) as tmp:
                    _image(objects, size, rng).save(tmp, format="JPEG", quality=quality)
                written += 1
            sentences = []
            for raw in make_captions(objects):  # five phrasings, as COCO has five captions an image
                sentences.append({"raw": raw[0].upper() + raw[1:] + ".", "tokens": raw.replace(",", "").split(),
                                  "imgid": len(images), "sentid": sentid})
                sentid += 1
            images.append({"filepath": split, "filename": filename, "imgid": len(images), "cocoid": cocoid,
                           "split": split, "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    text = json.dumps({"dataset": "coco", "images": images}) + "\n"
    target = out / "dataset_coco.json"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        atomic_write(target, text)
    return written, kept


def _image(objects: list[dict], size: tuple[int, int], rng: random.Random) -> Image.Image:
    """The scene drawn at half the larger side (drawing is most of the time), stretched to (width, height),
    over a smooth colour field with noise: photographs' entropy, so that the JPEG costs about what a real
    one does to store and decode."""
    width, height = size
    scene = render(objects, max(16, max(width, height) // 2)).resize((width, height), Image.BILINEAR)
    scene = np.asarray(scene, np.float32)
    g = np.random.default_rng(rng.getrandbits(64))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.stack([np.sin(xx / g.uniform(20, 90) + g.uniform(0, 6)) * np.cos(yy / g.uniform(20, 90))
                      for _ in range(3)], -1)
    background = np.all(scene > 230, axis=-1, keepdims=True)  # the shapes world's near-white background
    scene = np.where(background, 170 + 60 * field, scene) + g.normal(0, 10, scene.shape)
    return Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))


if __name__ == "__main__":
    sys.exit(main())
