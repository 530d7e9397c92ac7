"""What every preparation command shares: an output is written whole (vision_rwkv._fs) with a small record
of what it was made from (prep.json); a re-run whose record matches does nothing, and an output without a
record is never taken as complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from ..._fs import atomic_folder, atomic_write
from ...errors import VisionRWKVError
from ...train.data import METADATA_FILES

PREP_RECORD = "prep.json"


def metadata_file(folder) -> Path:
    """The metadata file read_image_folder would use, or a one-line error."""
    for name in METADATA_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise VisionRWKVError(f"{folder} has no {' or '.join(METADATA_FILES)}; expected an image folder with captions")


def fingerprint(path) -> dict:
    """Sizes and modification times of a file, or of every file under a folder: enough to see a change."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"path": os.path.abspath(path),
            "files": [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
                      for p in files]}


def read_prep_record(path) -> dict | None:
    """The record saved with an output, or None when there is none (or it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_dataset(dsd: datasets.DatasetDict, out, record: dict) -> None:
    """save_to_disk into a temporary folder with the prep record, then replace out with it in one step."""
    with atomic_folder(out) as tmp:
        dsd.save_to_disk(str(tmp))
        atomic_write(tmp / PREP_RECORD, json.dumps(record, indent=1) + "\n")


def split_counts(args, stride: int) -> dict[str, int]:
    """--train/--val/--test of a generator, checked: each below `stride` (ids are split * stride + index)."""
    counts = {"train": args.train, "val": args.val, "test": args.test}
    for split, n in counts.items():
        if not 0 <= n < stride:
            raise VisionRWKVError(f"--{split} is {n}; expected 0 to {stride - 1}")
    if sum(counts.values()) == 0:
        raise VisionRWKVError("--train, --val and --test are all 0; expected at least one image")
    return counts


def claim_settings(out: Path, settings: dict, file_name: str, image_glob: str, command: str, hint: str) -> None:
    """Record a generator's settings in out/file_name before its first image, so that a later run cannot mix
    images made differently: a folder made with other settings, or holding images but no record, is refused."""
    path = out / file_name
    if path.exists():
        old = read_prep_record(path)
        if old != settings:
            raise VisionRWKVError(f"{out} holds images made with {old}; expected {settings}: use {hint}, "
                                  "another --out, or delete the folder")
        return
    if any((out / "images").glob(image_glob)):
        raise VisionRWKVError(f"{out}/images holds images but no {file_name}; expected an empty or a "
                              f"{command} folder")
    atomic_write(path, json.dumps(settings) + "\n")
