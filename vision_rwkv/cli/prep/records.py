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
