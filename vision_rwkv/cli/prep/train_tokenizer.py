"""Train a byte-level BPE tokenizer on the training captions of any data source.

    python data_prep/train_tokenizer.py --data data/shapes --vocab-size 300 --out data/shapes_tokenizer.json
    python data_prep/train_tokenizer.py --data data/dataset_coco.json --vocab-size 8000 --out coco_bpe.json

--data is a Karpathy split JSON, an image folder (or its metadata.jsonl / metadata.csv; make_shapes.py output
is one), or a save_to_disk folder; --source names the kind when the guess is wrong. Only the captions of
--split are read, so the images need not be present. <|endoftext|> is id 0.
The tokenizer is written under a temporary name and renamed, with <out stem>.prep.json beside it recording
the inputs; a re-run with the same inputs does nothing unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..._fs import atomic_write
from ...errors import VisionRWKVError
from ...lm.tokenizer import train_bpe
from ...train.data import METADATA_FILES, read_disk, read_image_folder, read_karpathy
from .records import fingerprint, read_prep_record

SOURCES = ("auto", "karpathy", "folder", "shapes", "disk")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="Karpathy JSON, image folder, metadata file or "
                                                               "save_to_disk folder")
    ap.add_argument("--source", choices=SOURCES, default="auto", help="what --data is (default: guessed)")
    ap.add_argument("--split", default="train", help="the split whose captions are used")
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged")
    ap.add_argument("--out", type=Path, required=True, help="output tokenizers .json file")
    ap.add_argument("--force", action="store_true", help="retrain even when the output is up to date")
    args = ap.parse_args(argv)

    try:
        source, data = resolve_source(args.data, args.source)
        if args.vocab_size < 257:
            raise VisionRWKVError(f"--vocab-size is {args.vocab_size}; expected at least 257 (256 bytes and "
                                  "<|endoftext|>)")
        record_path = args.out.with_suffix(".prep.json")
        record = {"command": "train_tokenizer", "source": source, "data": fingerprint(_input_file(source, data)),
                  "split": args.split, "vocab_size": args.vocab_size, "min_frequency": args.min_frequency}
        if not args.force and args.out.is_file() and read_prep_record(record_path) == record:
            print(f"{args.out} is up to date (use --force to retrain)")
            return 0
        captions = read_captions(source, data, args.split)
        tokenizer = train_bpe(captions, args.vocab_size, min_frequency=args.min_frequency)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, tokenizer.tk.to_str())
        atomic_write(record_path, json.dumps(record, indent=1) + "\n")
    except VisionRWKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: vocabulary {tokenizer.vocab_size}, trained on {len(captions)} {args.split} captions")
    return 0


def resolve_source(data: Path, source: str) -> tuple[str, Path]:
    """(source kind, path to read) for --data; shapes folders are plain image folders here."""
    if not data.exists():
        raise VisionRWKVError(f"--data {data} does not exist; expected a Karpathy JSON, an image folder or a "
                              "save_to_disk folder")
    if data.is_file() and data.name in METADATA_FILES:
        data = data.parent
    if source == "shapes":
        source = "folder"
    if source != "auto":
        return source, data
    if data.is_file():
        return "karpathy", data
    if (data / "dataset_dict.json").is_file() or (data / "state.json").is_file():
        return "disk", data
    return "folder", data


def _input_file(source: str, data: Path) -> Path:
    if source == "folder":
        return next((data / n for n in METADATA_FILES if (data / n).is_file()), data)
    return data


def read_captions(source: str, data: Path, split: str) -> list[str]:
    if source == "karpathy":
        rows = read_karpathy(data, None, splits=[split], check_images=False)
    elif source == "folder":
        rows = [r for r in read_image_folder(data, check_images=False) if r["split"] == split]
    else:
        dsd = read_disk(data)
        rows = [{"captions": c} for c in dsd[split]["captions"]] if split in dsd else []
    captions = [c for row in rows for c in row["captions"]]
    if not captions:
        raise VisionRWKVError(f"{data} has no captions in split {split!r}; expected --split to name a split with "
                              "captions")
    return captions


if __name__ == "__main__":
    sys.exit(main())
