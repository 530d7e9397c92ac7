"""Convert an RWKV-7 or RWKV-4 decoder between the official .pth layout and a vision_rwkv checkpoint folder.

    python data_prep/convert_checkpoint.py RWKV-x070-World-0.4B.pth checkpoints/rwkv7-0.4b --tokenizer world
    python data_prep/convert_checkpoint.py checkpoints/rwkv7-0.4b back.pth

The direction follows the input: a .pth file becomes a folder, a folder (ours, or a Hugging Face one:
fla's RWKV-7, transformers' RWKV-4) becomes a .pth file.
Writes are atomic; an up-to-date output (newer than its input) is left alone unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="official .pth file, or a vision_rwkv checkpoint folder")
    ap.add_argument("dst", type=Path, help="output folder (from .pth) or .pth file (from a folder)")
    ap.add_argument("--tokenizer", default="world", help="'world' or a tokenizers .json (for .pth -> folder)")
    ap.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep")
    ap.add_argument("--force", action="store_true", help="rewrite an output that is already up to date")
    args = ap.parse_args(argv)

    from ... import VisionRWKVError, load_decoder, load_tokenizer, save_decoder, save_official

    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        if not args.src.exists():
            raise VisionRWKVError(f"{args.src} does not exist")
        if args.dst.exists() and not args.force and args.dst.stat().st_mtime >= args.src.stat().st_mtime:
            print(f"{args.dst} is up to date (use --force to rewrite)")
            return 0
        lm = load_decoder(args.src, dtype=dtype)
        if args.src.is_dir():
            save_official(lm, args.dst)
        else:
            save_decoder(lm, args.dst, tokenizer=load_tokenizer(args.tokenizer))
    except VisionRWKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = lm.config
    print(f"wrote {args.dst}: {c.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
