"""Export a training checkpoint for inference: weights (optionally cast to bf16/fp16), config, tokenizer,
provenance and a model card (README.md); to a folder, to the Hugging Face Hub, or both.

    python data_prep/export_model.py --checkpoint runs/x/checkpoints/latest --out models/x
    python data_prep/export_model.py --checkpoint runs/x/checkpoints/latest --push-to-hub me/x-captioner

Drops the trainer state (optimizer, RNG); writes the folder atomically. "latest" resolves through
<checkpoints>/latest. Pushing uses huggingface_hub's login (`hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ...caption.model import load_caption_model
from ...errors import VisionRWKVError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder, or <run>/checkpoints/latest")
    ap.add_argument("--out", help="the folder to write")
    ap.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload to this Hugging Face Hub model repository")
    ap.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    try:
        if not args.out and not args.push_to_hub:
            raise VisionRWKVError("nothing to write; expected --out FOLDER, --push-to-hub ORG/NAME, or both")
        model = load_caption_model(args.checkpoint)  # resolves <run>/checkpoints/latest
        dtype = DTYPES[args.dtype]
        if args.out:
            model.save_pretrained(args.out, dtype=dtype, repo_id=args.push_to_hub)
            size = sum(p.stat().st_size for p in Path(args.out).iterdir())
            print(f"{args.out}: {size / 1e6:.1f} MB")
        if args.push_to_hub:
            url = model.push_to_hub(args.push_to_hub, dtype=dtype, private=args.private or None)
            print(f"{args.push_to_hub}: {url}")
    except VisionRWKVError as e:
        print(f"export_model.py: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
