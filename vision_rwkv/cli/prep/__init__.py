"""`vision-rwkv prep STEP [options]`: one data preparation step each (also `python data_prep/STEP.py`)."""

from __future__ import annotations

import importlib
import sys

STEPS = {
    "make_shapes": "write the synthetic shapes data set",
    "make_coco_synthetic": "COCO-shaped synthetic data: 640x480 JPEGs and a Karpathy JSON, 5 captions each",
    "karpathy_to_dataset": "a Karpathy split JSON (COCO, Flickr30k) to a datasets folder",
    "folder_to_dataset": "an image folder with metadata.jsonl/csv to a datasets folder",
    "train_tokenizer": "a byte-level BPE trained on the captions",
    "cache_features": "the frozen encoder's features, for training (Hydra overrides as for train)",
    "convert_checkpoint": "an RWKV-7 or RWKV-4 decoder between the official .pth and a vision_rwkv folder",
    "export_model": "a training checkpoint as a small inference copy",
    "shapes_accuracy": "held-out accuracy of a model on the shapes data",
}


def main(argv: list[str] | None = None, prog: str = "vision-rwkv prep") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        rows = "\n".join(f"  {name:<20}  {what}" for name, what in STEPS.items())
        print(f"usage: vision-rwkv prep STEP [options]\n\nsteps:\n{rows}\n\n`vision-rwkv prep STEP --help` "
              "describes each one.\n", end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in STEPS:
        print(f"{prog}: unknown step {name!r}; expected one of {', '.join(STEPS)}", file=sys.stderr)
        return 2
    sys.argv = [f"{prog} {name}", *rest]  # argparse names the program after argv[0]
    return importlib.import_module(f"{__name__}.{name}").main(rest) or 0
