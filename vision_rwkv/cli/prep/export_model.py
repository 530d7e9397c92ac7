"""Export a training checkpoint for inference: weights (optionally cast to bf16/fp16), config, tokenizer.

    python data_prep/export_model.py --checkpoint runs/x/checkpoints/latest --out vision_rwkv/assets/demo

Drops the trainer state (optimizer, RNG); writes the folder atomically. "latest" resolves through
<checkpoints>/latest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ...caption.model import load_caption_model, save_caption_model
from ...errors import VisionRWKVError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder, or <run>/checkpoints/latest")
    ap.add_argument("--out", required=True, help="the folder to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    try:
        model = load_caption_model(args.checkpoint)  # resolves <run>/checkpoints/latest
        save_caption_model(model, args.out, dtype=DTYPES[args.dtype])
    except VisionRWKVError as e:
        print(f"export_model.py: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in Path(args.out).iterdir())
    print(f"{args.out}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
