"""Held-out accuracy of a captioning model on the synthetic shapes data.

    python data_prep/shapes_accuracy.py --checkpoint vision_rwkv/assets/demo --data data/shapes --split test

Captions every image of the split (greedy, RNN mode) and checks each caption against the image's true
objects with vision_rwkv.synthetic.shapes.score_caption: "exact" means the same objects (size, colour, kind) and
a correct position or relation; objects_f1 gives partial credit. Also CIDEr-D of the captions against
the image's reference captions (vision_rwkv.train.metrics.cider: simple tokenization, no Java). Prints them
and writes them as JSON with --out.

On a folder made with make_shapes.py --split compositional, exact match is also reported apart for the
test scenes that show a held-out composition (exact_heldout) and for those that do not (exact_seen).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ...caption.generate import caption_features
from ...caption.images import load_image
from ...caption.model import load_caption_model
from ...config import SamplingConfig
from ...errors import VisionRWKVError
from ...synthetic.shapes import score_caption
from ...train.data import read_shapes_objects
from ...train.metrics import cider


def accuracy(checkpoint, data, split: str = "test", batch_size: int = 64, limit: int | None = None,
             device: str = "cpu", dtype: str = "fp32", with_cider: bool = True) -> dict:
    """dtype fp32: fp32 weights, no autocast; bf16: bf16 weights under bf16 autocast (what caption.py
    runs on CUDA)."""
    bf16 = dtype == "bf16"
    model = load_caption_model(checkpoint, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    objects = read_shapes_objects(data)
    rows = [json.loads(line) for line in (Path(data) / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split][:limit]
    if not rows:
        raise VisionRWKVError(f"{data} has no images in split {split!r}")
    sampling = SamplingConfig(max_new_tokens=40)
    exact, f1, examples = 0, 0.0, []
    res, gts = {}, {}
    by_count: dict[int, list[int]] = {}  # number of shapes -> [exact, images]
    by_seen: dict[str, list[int]] = {}  # "seen" / "heldout" -> [exact, images], on compositional folders
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        images = torch.stack([model.encoder.preprocess(load_image(Path(data) / r["file_name"])) for r in chunk])
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            hyps = caption_features(model, *model.encode(images.to(device)), sampling)
        for r, h in zip(chunk, hyps):
            text = model.tokenizer.decode(h[0].ids).strip()
            s = score_caption(text, objects[r["image_id"]])
            res[r["image_id"]], gts[r["image_id"]] = [text], list(r["captions"])
            exact += bool(s["exact"])
            tally = by_count.setdefault(len(objects[r["image_id"]]), [0, 0])
            tally[0] += bool(s["exact"])
            tally[1] += 1
            if "heldout" in r:
                tally = by_seen.setdefault("heldout" if r["heldout"] else "seen", [0, 0])
                tally[0] += bool(s["exact"])
                tally[1] += 1
            f1 += s["objects_f1"]
            if len(examples) < 5:
                examples.append({"file": r["file_name"], "caption": text, "exact": bool(s["exact"])})
    n = len(rows)
    seen = {f"exact_{k}": v[0] / v[1] for k, v in sorted(by_seen.items())}
    seen |= {f"images_{k}": v[1] for k, v in sorted(by_seen.items())}
    return {"split": split, "images": n, "exact": exact / n, "objects_f1": f1 / n, **seen,
            "cider": cider(gts, res) if with_cider else None,
            "exact_by_shapes": {k: v[0] / v[1] for k, v in sorted(by_count.items())}, "examples": examples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="caption checkpoint folder")
    ap.add_argument("--data", required=True, help="folder written by data_prep/make_shapes.py")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 weights, or bf16 weights under bf16 autocast (caption.py's default on CUDA)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("--no-cider", action="store_true", help="skip CIDEr (needs pycocoevalcap)")
    args = ap.parse_args(argv)
    try:
        result = accuracy(args.checkpoint, args.data, args.split, limit=args.limit, device=args.device,
                          dtype=args.dtype, with_cider=not args.no_cider)
    except VisionRWKVError as e:
        print(f"shapes_accuracy.py: {e}", file=sys.stderr)
        return 2
    print(f"{result['images']} {args.split} images: exact {result['exact']:.3f}, "
          f"objects F1 {result['objects_f1']:.3f}"
          + (f", CIDEr {result['cider']:.3f}" if result["cider"] is not None else ""))
    print("  exact by number of shapes: " + ", ".join(f"{k}: {v:.3f}" for k, v in result["exact_by_shapes"].items()))
    for kind in ("seen", "heldout"):
        if f"exact_{kind}" in result:
            print(f"  exact on {result[f'images_{kind}']} {kind} scenes: {result[f'exact_{kind}']:.3f}")
    for ex in result["examples"]:
        print(f"  {ex['file']}: {ex['caption']!r} ({'ok' if ex['exact'] else 'wrong'})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
