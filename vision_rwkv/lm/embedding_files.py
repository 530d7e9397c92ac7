"""Embeddings on disk: OUT.npy (float32, N x C) and OUT.jsonl (one {"index", ...} line per row), both
written whole or not at all, and never over an existing pair unless asked."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from .._fs import atomic_write, check_writable
from ..errors import VisionRWKVError


def output_paths(out) -> tuple[Path, Path]:
    """OUT (or OUT.npy, OUT.jsonl) -> (OUT.npy, OUT.jsonl)."""
    out = Path(out)
    if out.suffix in (".npy", ".jsonl"):
        out = out.with_suffix("")
    if not out.name:
        raise VisionRWKVError(f"out {str(out)!r} names no file; expected a path such as runs/embeddings")
    return out.with_name(out.name + ".npy"), out.with_name(out.name + ".jsonl")


def check_outputs(out, overwrite: bool) -> tuple[Path, Path]:
    """Before any work: the outputs' folder is writable, and neither output exists unless overwrite."""
    paths = output_paths(out)
    for path in paths:
        check_writable(path)
        if path.exists() and not overwrite:
            raise VisionRWKVError(f"{path} exists; expected a new path, or --overwrite to replace it")
    return paths


def save_embeddings(out, vectors: torch.Tensor, rows: list[dict]) -> tuple[Path, Path]:
    """vectors (N,C) and one dict per row -> OUT.npy (float32) and OUT.jsonl ({"index": i, **row} per line).
    The index is written second, so an index always describes a complete matrix beside it."""
    if vectors.dim() != 2 or vectors.shape[0] != len(rows):
        raise VisionRWKVError(f"{len(rows)} rows but vectors of shape {tuple(vectors.shape)}; expected one row each")
    npy, index = output_paths(out)
    buffer = io.BytesIO()
    np.save(buffer, vectors.detach().cpu().float().numpy())
    atomic_write(npy, buffer.getvalue())
    lines = (json.dumps({"index": i, **row}, ensure_ascii=False) + "\n" for i, row in enumerate(rows))
    atomic_write(index, "".join(lines))
    return npy, index
