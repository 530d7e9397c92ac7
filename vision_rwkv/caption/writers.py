"""Where captions go: the output formats, the locked row store that makes a run resumable, and what an
earlier run left (the out itself, a journal, the part files of a torchrun run, NAME.txt sidecars).

    Output(fmt, out, images, overwrite)   the run's output, with .todo (what is left) and .notes (what was found)
    output.writer()                        the Writer a single process writes each batch to
    output.finish()                        csv, coco and text files are written whole, from the journal
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import sys
import warnings
from pathlib import Path

from .._fs import AppendLog, atomic_write, check_writable, write_failed
from ..config import OutputFormat
from ..errors import OutputError, VisionRWKVError
from .captioner import CaptionResult


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank:03d}-of-{world:03d}.jsonl")


def existing_parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{glob.escape(out.name)}.part-*-of-*.jsonl"))


def journal_path(out: Path) -> Path:
    """Where a csv, coco or text run keeps its rows until the whole file is written."""
    return out.with_name(f"{out.name}.journal.jsonl")



class RowStore:
    """Caption rows in a locked JSONL file: the out of a jsonl run, the journal of a csv/coco/text run, or one
    process's part under torchrun. Batches are appended whole and fsynced, so a killed run loses at most the
    batch in flight; a torn last line is cut off when the file is opened again."""

    def __init__(self, path: Path, holder: str = "another caption.py run"):
        self.path = path
        self.log = AppendLog(path, holder=holder)
        try:
            lines, self.torn = self.log.lines()
            rows = self._parse(lines)
        except BaseException:
            self.log.close(remove_if_empty=True)
            raise
        self.keys = {_key(row["path"]) for row in rows}
        self.count = len(rows)

    def _parse(self, lines: list[bytes]) -> list[dict]:
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = _caption_row(line)
            if row is None:
                raise VisionRWKVError(f"{self.path} line {n} is not a caption row; expected JSON objects with a "
                                      "'path' on every line (fix or remove it, or choose another out)")
            rows.append(row)
        return rows

    def rows(self) -> list[dict]:
        return self._parse(self.log.lines()[0])

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.log.append("".join(_json_line(row) for row in rows).encode("utf-8", "surrogateescape"),
                        then=f"the {self.count} rows written before are kept, and the same command resumes "
                             "after them")
        self.count += len(rows)
        self.keys.update(_key(row["path"]) for row in rows)

    def clear(self) -> None:
        self.log.truncate(0)
        self.keys, self.count = set(), 0

    def remove(self) -> None:
        """Delete the file (while still holding it) and let go."""
        self.path.unlink(missing_ok=True)
        self.close(remove_if_empty=False)

    def close(self, remove_if_empty: bool = True) -> None:
        self.log.close(remove_if_empty=remove_if_empty)


class Output:
    """A run's output and what an earlier run left of it; built by the single process, or by process 0.

    - jsonl: out itself is the row store (resume: the images already in it are skipped);
    - csv, coco, text with out: a journal, out.journal.jsonl, collects the rows; finish() writes out whole
      from it, then removes it (a killed or failed run resumes from the journal);
    - parts of a killed torchrun run (out.part-R-of-W.jsonl) are taken into the store first, then removed;
    - txt: an image that already has NAME.txt beside it is left alone unless overwrite;
    - standard output: nothing to resume.
    overwrite starts afresh: the store and any parts are emptied, existing sidecars replaced.
    """

    def __init__(self, fmt: OutputFormat, out: str | None, images: list[str], overwrite: bool):
        self.fmt, self.images = fmt, images
        self.keys = [_key(p) for p in images]
        self.out = Path(out) if out is not None else None
        self.store: RowStore | None = None
        self.notes: list[str] = []
        self.already = ""
        self.todo = list(images)
        if fmt is OutputFormat.txt:
            self._skip_sidecars(overwrite)
        elif self.out is not None:
            check_writable(self.out)
            self.store = RowStore(self.out if fmt is OutputFormat.jsonl else journal_path(self.out))
            try:
                self._resume(overwrite)
            except BaseException:
                self.store.close()
                raise

    def _resume(self, overwrite: bool) -> None:
        store = self.store
        if overwrite:
            store.clear()
            for part in existing_parts(self.out):
                part.unlink()
            return
        if store.torn:
            self.notes.append(f"dropped a partial last line of {store.path} (an interrupted write)")
        taken, parts = self.take_parts()
        if parts:
            self.notes.append(f"took {taken} rows from {parts} part file(s) of an earlier multi-process run into "
                              f"{store.path}")
        if store.count:
            self.todo = [p for p, k in zip(self.images, self.keys) if k not in store.keys]
            done = len(self.images) - len(self.todo)
            self.notes.append(f"{store.path} already holds {store.count} rows: {done} of {len(self.images)} images "
                              f"are done, {len(self.todo)} left")
            if done:
                self.already = f" ({done} already in {self.out})"

    def _skip_sidecars(self, overwrite: bool) -> None:
        SidecarWriter.check_names(self.images)
        if overwrite:
            return
        self.todo = [p for p in self.images if not sidecar_path(p).exists()]
        kept = len(self.images) - len(self.todo)
        if kept:
            self.notes.append(f"{kept} of {len(self.images)} images already have a NAME.txt beside them, and it was "
                              "left alone (overwrite=true replaces them)")
            self.already = f" ({kept} left alone: NAME.txt exists)"

    def take_parts(self) -> tuple[int, int]:
        """Append the rows of the part files beside out to the store, in input order, those already there left
        out (so taking them twice never duplicates), then remove the parts. Returns (rows taken, parts)."""
        if self.store is None:
            return 0, 0
        order = {k: i for i, k in enumerate(self.keys)}
        parts = [RowStore(part) for part in existing_parts(self.out)]  # locked: no live process writes them
        try:
            rows: dict[str, dict] = {}
            for part in parts:
                for row in part.rows():
                    key = _key(row["path"])
                    if key not in self.store.keys:
                        rows.setdefault(key, row)
            self.store.append(sorted(rows.values(), key=lambda row: order.get(_key(row["path"]), len(order))))
            for part in parts:
                part.path.unlink()
        finally:
            for part in parts:
                part.close(remove_if_empty=False)
        return len(rows), len(parts)

    def writer(self) -> Writer:
        """The writer of a single-process run."""
        if self.fmt is OutputFormat.txt:
            return SidecarWriter()
        if self.store is not None:
            return JsonlWriter(self.store)
        if self.fmt in (OutputFormat.text, OutputFormat.jsonl):
            return StreamWriter(self._render())
        return WholeFileWriter(self._render())  # csv or coco on standard output: printed at the end

    def _render(self):
        if self.fmt is OutputFormat.jsonl:
            return lambda results: "".join(_json_line(_row(r)) for r in results)
        if self.fmt is OutputFormat.text:
            return _text_lines(several=len(self.images) > 1)
        return _csv_text if self.fmt is OutputFormat.csv else _coco_text

    def finish(self) -> None:
        """After a complete run: a whole-file format is written from its journal, which then goes."""
        if self.store is None or self.fmt is OutputFormat.jsonl:
            return
        rows = {_key(row["path"]): row for row in self.store.rows()}
        results = [CaptionResult(**_row(rows[k])) for k in self.keys if k in rows]
        try:
            atomic_write(self.out, self._render()(results))
        except OutputError as e:
            raise OutputError(f"{e}; the {len(results)} captions are kept in {self.store.path}, and the same "
                              f"command writes {self.out} from them") from None
        self.store.remove()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


class Writer:
    """Receives each batch's results in input order."""

    def write(self, batch: list[CaptionResult]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The run is complete: write what is still held."""


def _row(r) -> dict:
    if isinstance(r, dict):
        return {k: r.get(k) for k in ("path", "caption", "score", "error")}
    return {"path": r.path, "caption": r.caption, "score": r.score, "error": r.error}


def _text_lines(several: bool):
    def render(results: list[CaptionResult]) -> str:
        lines = []
        for r in results:
            text = r.caption if r.error is None else f"[error] {r.error}"
            lines.append(f"{r.path}\t{text}\n" if several else f"{text}\n")
        return "".join(lines)

    return render


def _csv_text(results: list[CaptionResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "caption", "score", "error"])
    for r in results:
        w.writerow([r.path, r.caption if r.caption is not None else "", "" if r.score is None else r.score,
                    r.error or ""])
    return buf.getvalue()


def _coco_text(results: list[CaptionResult]) -> str:
    rows, seen = [], {}
    for index, r in enumerate(results):
        image_id = coco_image_id(r.path, index)
        if image_id in seen:
            warnings.warn(f"vision_rwkv: {r.path} and {seen[image_id]} get the same image_id {image_id}",
                          stacklevel=2)
        seen[image_id] = r.path
        if r.error is None:
            rows.append({"image_id": image_id, "caption": r.caption})
    return json.dumps(rows, indent=1, ensure_ascii=False) + "\n"


def coco_image_id(path: str, index: int) -> int:
    """The number a COCO-style file name carries (123456.jpg, COCO_val2014_000000123456.jpg), else index."""
    stem = Path(path).stem
    match = re.search(r"(?:^|_)(\d+)$", stem)
    return int(match.group(1)) if match else index


class StreamWriter(Writer):
    """Lines on standard output, flushed after every batch."""

    def __init__(self, render):
        self.render = render

    def write(self, batch):
        _to_stdout(self.render(batch))


class WholeFileWriter(Writer):
    """Collects every result and prints them rendered at the end (csv or coco on standard output)."""

    def __init__(self, render):
        self.render, self.results = render, []

    def write(self, batch):
        self.results.extend(batch)

    def close(self):
        _to_stdout(self.render(self.results))


def _to_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise write_failed("to standard output", e, "the lines printed before stand") from None


class JsonlWriter(Writer):
    """Rows appended to a RowStore one batch per write()."""

    def __init__(self, store: RowStore):
        self.store = store

    def write(self, batch):
        self.store.append([_row(r) for r in batch])


def _caption_row(line: bytes) -> dict | None:
    """A JSONL output line as its row, or None when it is not one (no JSON object with a string path)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("path"), str) else None


def _json_line(row: dict) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8 (surrogate escapes): keep it as \\u escapes
        line = json.dumps(row)
    return line + "\n"


class SidecarWriter(Writer):
    """NAME.txt beside each captioned image NAME.EXT, each written whole (temporary file + rename)."""

    @staticmethod
    def check_names(images: list[str]) -> None:
        owners: dict[Path, str] = {}
        for image in images:
            sidecar = sidecar_path(image)
            if sidecar in owners:
                raise VisionRWKVError(f"{owners[sidecar]} and {image} would both write {sidecar}; "
                                      "expected one image per name, or format=jsonl")
            owners[sidecar] = image

    def write(self, batch):
        for r in batch:
            if r.error is None:
                atomic_write(sidecar_path(r.path), r.caption + "\n")


def sidecar_path(image: str) -> Path:
    return Path(image).with_suffix(".txt")


def _key(path: str) -> str:
    """Paths are matched by what they name, however spelt: absolute or relative, through links or not."""
    return os.path.realpath(path)
