"""Where a checkpoint came from: saved beside its weights as provenance.json, and shown in its model card.

    {"created": ..., "command": "train_caption.py experiment=...", "overrides": [...],
     "code": {"version": "0.1.0", "git_commit": "...", "git_dirty": false},
     "data": {"source", "path", "split", "images", "captions", "fingerprint"},
     "step": 3000, "metrics": {"loss": ..., "val_loss": ..., "val_cider": ...}}

The data fingerprint hashes every training image's path (relative to the images' common folder, so moving
the data keeps it) with its captions: two runs with the same fingerprint saw the same pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def code_version() -> dict:
    """The package version and, in a git checkout, the commit (and whether files differ from it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        info = {"version": version("vision_rwkv")}
    except PackageNotFoundError:
        info = {"version": None}
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if commit:
                info.update(git_commit=commit, git_dirty=bool(dirty))
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def data_fingerprint(rows, source: str, path: str, split: str) -> dict:
    """What the run trained on: counts and a sha256 over (relative image path, captions) of every row."""
    images = list(rows["image"])
    captions = list(rows["captions"])
    root = os.path.commonpath(images) if len(images) > 1 else os.path.dirname(images[0]) if images else ""
    digest = hashlib.sha256()
    for image, caps in zip(images, captions):
        digest.update(json.dumps([os.path.relpath(image, root) if root else image, list(caps)]).encode())
        digest.update(b"\n")
    return {"source": str(source), "path": str(path), "split": split, "images": len(images),
            "captions": sum(len(c) for c in captions), "fingerprint": "sha256:" + digest.hexdigest()[:32]}


def new_record(command: str | None, overrides: list[str] | None, data: dict) -> dict:
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "overrides": list(overrides or []), "code": code_version(), "data": data, "step": 0, "metrics": {}}
