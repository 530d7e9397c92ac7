"""Caption image files and folders from the command line (see USAGE, or run `python caption.py --help`).

Hydra composes the options from conf/caption.yaml, typed by CaptionCLIConfig below, so a misspelt key
or a wrong type fails before any work with Hydra's own message.
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
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from vision_rwkv._faults import fault_point
from vision_rwkv._fs import AppendLog, atomic_write, check_writable, write_failed
from vision_rwkv.caption.captioner import CaptionResult, check_dtype
from vision_rwkv.config import SamplingConfig
from vision_rwkv.errors import (
    EXIT_ALL_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OutputError,
    VisionRWKVError,
    one_line,
    short_warnings,
)
from vision_rwkv.train.launch import Launch, die_with_parent

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
PROG = "caption.py"

USAGE = """\
usage: python caption.py PATH [PATH ...] [key=value ...] [-- PATH ...]

Caption images with a vision_rwkv model (frozen CLIP encoder -> projector -> RWKV-7 decoder).

PATH is an image file or a folder; folders are searched recursively for .bmp .gif .jpeg .jpg .png
.tif .tiff .webp files. Every argument without '=' is a path. Arguments after `--` are paths whatever
they look like (use it for names that start with '-', '+' or '~', or that contain '=' and start with
an option's name).

options (Hydra overrides, key=value; defaults in conf/caption.yaml):
  checkpoint=DIR          caption checkpoint folder (config.yaml, model.safetensors, tokenizer), or a
                          training run's <out_dir>/checkpoints/latest;
                          null (default): the demo model shipped in vision_rwkv/assets/demo
  out=FILE                where to write; null (default): standard output
  format=FORMAT           auto (default) | text | jsonl | csv | coco | txt (see below)
  sampling=NAME           decoding preset from conf/sampling: greedy (default) | beam | nucleus
  sampling.KEY=VALUE      any SamplingConfig field of the preset's strategy, e.g. sampling.max_new_tokens=32,
                          sampling=beam sampling.num_beams=5, sampling=nucleus sampling.top_p=0.9
                          sampling.temperature=0.7 sampling.seed=1; a field the strategy does not use
                          (top_p under greedy) is an error that names the preset to use
  batch_size=N            images encoded and decoded together (default 32)
  num_workers=N           processes decoding image files; null (default): one per CPU, at most 8;
                          0: in this process (never more than there are batches)
  device=DEVICE           auto (default: CUDA when available) | cpu | cuda | cuda:N
  dtype=DTYPE             auto (default: bf16 weights and autocast on CUDA, fp32 on the CPU) | bf16 | fp32
  progress=BOOL           progress bar with images/s on stderr; null (default): when stderr is a terminal
  overwrite=BOOL          false (default): resume what an earlier run with this out left, and leave an
                          existing NAME.txt alone (format=txt); true: start afresh and replace them
  paths=[A,B]             paths as a Hydra list (added to the positional ones)
                          (a value with spaces, commas or brackets needs Hydra's quotes: out="'my file.jsonl'")
  --cfg                   print the composed configuration and exit
  -h, --help              print this text and exit

output formats (format=auto picks from out's suffix: .jsonl -> jsonl, .csv -> csv, .json -> coco,
.txt -> text; no out -> text on standard output):
  text    one line per image: the caption, or PATH<TAB>CAPTION when there are several images;
          a failed image's line reads [error] REASON in place of the caption
  jsonl   one {"path", "caption", "score", "error"} object per line, appended and fsynced after
          every batch; a re-run with the same out skips the images already in the file, matched by
          the file they name however the path is spelt (resume; to retry failed images, delete
          their lines)
  csv     columns path, caption, score, error
  coco    COCO results JSON: [{"image_id", "caption"}]; image_id is the file name's number
          (000000123456.jpg, COCO_val2014_000000123456.jpg), else the image's position in the input;
          failed images are left out (the format has no place for them)
  txt     a sidecar NAME.txt holding the caption beside each image NAME.EXT (out must be unset;
          failed images get none); an image that already has a NAME.txt (often a caption written
          by hand) is left alone and counted in one line, unless overwrite=true
score is the caption's total log-probability under the model (higher is more likely).
csv, coco and text files are written whole at the end, through a temporary file and a rename; until
then the rows go to OUT.journal.jsonl beside out, batch by batch, so a killed or failed run loses at
most one batch and a re-run with the same out resumes from the journal. One run at a time per out:
a second run on the same out stops with one line.

A file that cannot be read (corrupt, truncated, not an image, too large, unreadable, a symlink loop)
gets one line on stderr and an error row; the run goes on. At the end stderr says
"captioned N images, M failed in T s (R images/s)" (T from the loaded model to the last image).
Exit status: 0 when done, 1 when every image failed, 2 on a usage, config or checkpoint error (before
any work), 3 when an output could not be written (disk full, read-only): one line says what, the rows
written before are kept and the same command resumes; 130 on Ctrl-C; 141 when standard output was
closed early (e.g. | head), quietly, as a process ended by SIGPIPE.

several processes (one per GPU; torchrun's own flags for several machines):
  torchrun --nproc_per_node=2 caption.py photos/ out=captions.jsonl
each process captions every 2nd pending image into out.part-R-of-W.jsonl beside out; process 0 then
merges the parts into out in input order. out is required (any format but text on standard output;
format=txt needs none). A killed run resumes with any number of processes, a single one included: the
parts it left are taken into out (or its journal) first, then removed.

examples:
  python caption.py photo.jpg
  python caption.py photos/ more.jpg sampling=beam sampling.num_beams=5 out=captions.jsonl
  python caption.py photos/ checkpoint=runs/x/checkpoints/step-0001000 batch_size=64 device=cpu
"""


class OutputFormat(str, Enum):
    auto = "auto"
    text = "text"
    jsonl = "jsonl"
    csv = "csv"
    coco = "coco"
    txt = "txt"


@dataclass
class CaptionCLIConfig:
    """The schema of conf/caption.yaml."""

    paths: list[str] = field(default_factory=list)
    checkpoint: Optional[str] = None  # None: the shipped demo model
    out: Optional[str] = None  # None: standard output
    format: OutputFormat = OutputFormat.auto
    batch_size: int = 32
    num_workers: Optional[int] = None  # None: one per usable CPU, at most 8
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 weights and autocast on CUDA, fp32 on the CPU | bf16 | fp32
    progress: Optional[bool] = None  # None: when stderr is a terminal
    overwrite: bool = False  # True: start afresh (no resume), replacing out, its journal and existing NAME.txt
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


ConfigStore.instance().store(name="caption_cli_schema", node=CaptionCLIConfig)
EXIT_BROKEN_PIPE = 128 + 13  # as a process ended by SIGPIPE, what shells report for `yes | head -1`
SUFFIX_FORMATS = {".jsonl": OutputFormat.jsonl, ".csv": OutputFormat.csv, ".json": OutputFormat.coco,
                  ".txt": OutputFormat.text}


# ---- the command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run as `python caption.py ARGS` would, in-process; returns the exit status."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[: argv.index("--")] if "--" in argv else argv
    if "-h" in options or "--help" in options:
        print(USAGE, end="")
        return 0
    try:
        paths, overrides, show_cfg = split_argv(argv)
        cfg = compose(overrides)
        if show_cfg:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        app = OmegaConf.to_object(cfg)
        app.paths = [*app.paths, *paths]
        return run(app)
    except BrokenPipeError:  # e.g. `caption.py photos/ | head -1`: the reader has gone; stop quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:
        hint = "" if isinstance(e, VisionRWKVError) else " (python caption.py --help lists the options)"
        print(f"{PROG}: {one_line(e)}{hint}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test's captured stream)
        pass


def split_argv(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """argv -> (paths, Hydra overrides, --cfg given).

    Paths never pass through Hydra: its override grammar gives meaning to spaces, commas, brackets,
    quotes, '$' and '=' in values, and no escaping survives every file name. They are kept aside and
    set on the composed config instead. For the same reason main() composes with Hydra's compose API
    rather than @hydra.main, which would also own argv, change the logging, and make an outputs/ folder
    in the working directory of every captioning run.
    """
    paths, overrides, show_cfg, only_paths = [], [], False, False
    for arg in argv:
        if only_paths:
            paths.append(arg)
        elif arg == "--":
            only_paths = True
        elif arg == "--cfg":
            show_cfg = True
        elif arg.startswith("-"):
            raise VisionRWKVError(f"unknown option {arg!r}; options are key=value (see --help), "
                                  "and paths that start with '-' go after --")
        elif arg.startswith(("+", "~")) or ("=" in arg and not _names_a_file(arg)):
            overrides.append(arg)
        else:
            paths.append(arg)
    return paths, overrides, show_cfg


def _names_a_file(arg: str) -> bool:
    """A name like 'a=b.jpg' that exists and does not start with an option's name is a path."""
    key = arg.split("=", 1)[0].split(".", 1)[0]
    return key not in {f.name for f in fields(CaptionCLIConfig)} | {"hydra"} and os.path.lexists(arg)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name="caption"):
        return hydra_compose(config_name="caption", overrides=list(overrides))


# ---- a run --------------------------------------------------------------------------------------------------


def run(cfg: CaptionCLIConfig) -> int:
    fmt = output_format(cfg)
    if cfg.batch_size < 1:
        raise VisionRWKVError(f"batch_size is {cfg.batch_size}; expected a positive integer")
    if cfg.num_workers is None:
        cfg.num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                              (os.cpu_count() or 1))
    if cfg.num_workers < 0:
        raise VisionRWKVError(f"num_workers is {cfg.num_workers}; expected 0 or more")
    cfg.sampling.validate()
    check_dtype(cfg.dtype)  # now, not after listing the images and loading the model
    if not cfg.paths:
        raise VisionRWKVError("no images given; expected image files or folders, e.g. python caption.py photos/ "
                              "(see --help)")
    shard = Launch.from_env()
    if shard.world > 1:
        return run_sharded(cfg, fmt, shard)
    images = list_images(cfg.paths, quiet=False)
    output = Output(fmt, cfg.out, images, cfg.overwrite)
    try:
        for note in output.notes:
            print(f"{PROG}: {note}", file=sys.stderr)
        writer = output.writer()
        captioned, failed, seconds = caption_into(writer, output.todo, cfg, cfg.device)
        writer.close()
        output.finish()  # csv, coco and text files are written here, from the journal, after a complete run
    finally:
        output.close()
    print(f"{PROG}: captioned {captioned} images, {failed} failed{_rate(captioned + failed, seconds)}"
          + output.already, file=sys.stderr)
    return EXIT_ALL_FAILED if failed and not captioned else EXIT_OK


def list_images(paths: list[str], quiet: bool) -> list[str]:
    from vision_rwkv.caption.images import find_images

    with warnings.catch_warnings(record=True) as caught:  # e.g. a folder that cannot be listed: one line each
        warnings.simplefilter("always")
        images = [str(p) for p in find_images(paths)]
    for w in caught if not quiet else ():
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    return images


def caption_into(writer: Writer, todo: list[str], cfg: CaptionCLIConfig, device: str,
                 main_process: bool = True) -> tuple[int, int, float]:
    """Caption `todo` batch by batch into writer; one stderr line per failed image.

    Returns (captioned, failed, seconds), the seconds counted from the loaded model to the last batch.
    """
    import time

    from tqdm.auto import tqdm

    from vision_rwkv.caption.captioner import Captioner

    captioned = failed = 0
    if not todo:
        return 0, 0, 0.0
    if cfg.checkpoint is None and main_process:
        print(f"{PROG}: no checkpoint given: captioning with the shipped demo model", file=sys.stderr)
    captioner = Captioner.load(cfg.checkpoint, device=device, dtype=cfg.dtype)
    start = time.perf_counter()
    progress = main_process and (sys.stderr.isatty() if cfg.progress is None else cfg.progress)
    batches = captioner.caption_batches(todo, cfg.sampling, batch_size=cfg.batch_size,
                                        num_workers=cfg.num_workers, progress=progress)
    for batch in batches:
        for result in batch:
            if result.error is not None:  # through tqdm, so a progress bar is redrawn below the line
                tqdm.write(f"{PROG}: {result.path}: {result.error}", file=sys.stderr)
        failed += sum(r.error is not None for r in batch)
        captioned += sum(r.error is None for r in batch)
        writer.write(batch)
        fault_point("caption.batch_written")
    return captioned, failed, time.perf_counter() - start


def _rate(images: int, seconds: float) -> str:
    return f" in {seconds:.1f} s ({images / seconds:.1f} images/s)" if images and seconds > 0 else ""


# ---- several processes (torchrun) ---------------------------------------------------------------------------


def run_sharded(cfg: CaptionCLIConfig, fmt: OutputFormat, shard: Launch) -> int:
    """Under torchrun: each process captions every WORLD_SIZE-th pending image into its own part file (JSONL,
    flushed per batch), then process 0 merges the parts into the output in input order.

    Process 0 alone holds the output (locked for the whole run): it lists the images, takes in the parts of an
    earlier killed run (any process count), and tells the others what is left. The whole-file formats are
    rendered from their journal once every process is done; format=txt needs no merge.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if cfg.out is None and fmt is not OutputFormat.txt:
        raise VisionRWKVError(f"under torchrun (WORLD_SIZE={shard.world}) the processes cannot share standard "
                              "output; expected out=FILE (each process writes FILE.part-R-of-W.jsonl and process "
                              "0 merges them) or format=txt")
    die_with_parent()  # a torchrun agent killed with -9 takes its workers with it
    if not dist.is_initialized():  # gloo: only barriers, the file list and a few integers pass between processes
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    main_process = shard.rank == 0
    output = None
    try:
        plan: list = [None]
        if main_process:
            try:
                images = list_images(cfg.paths, quiet=False)
                output = Output(fmt, cfg.out, images, cfg.overwrite)
                for note in output.notes:
                    print(f"{PROG}: {note}", file=sys.stderr)
                plan = [(output.todo, output.already)]
            except VisionRWKVError as e:
                plan = [e]
        dist.broadcast_object_list(plan, src=0)
        if isinstance(plan[0], VisionRWKVError):  # said once, by process 0; the others just stop
            if main_process:
                raise plan[0]
            return EXIT_USAGE
        todo, already = plan[0]
        mine = todo[shard.rank::shard.world]
        part = None if fmt is OutputFormat.txt else RowStore(part_path(Path(cfg.out), shard.rank, shard.world))
        writer = SidecarWriter() if part is None else JsonlWriter(part)
        device = shard.device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this process's GPU is also the current one (streams, graphs)
        try:
            captioned, failed, seconds = caption_into(writer, mine, cfg, str(device), main_process)
        finally:
            if part is not None:
                part.close()
        counts = [None] * shard.world
        dist.all_gather_object(counts, (captioned, failed, seconds))  # also the barrier: every part is complete
        captioned, failed = (sum(c[i] for c in counts) for i in (0, 1))
        seconds = max(c[2] for c in counts)  # the slowest process
        if main_process:
            output.take_parts()
            output.finish()
        dist.barrier()
    finally:
        if output is not None:
            output.close()
        dist.destroy_process_group()
    if main_process:
        print(f"{PROG}: captioned {captioned} images, {failed} failed with {shard.world} processes"
              f"{_rate(captioned + failed, seconds)}" + already, file=sys.stderr)
    return EXIT_ALL_FAILED if failed and not captioned else EXIT_OK


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank:03d}-of-{world:03d}.jsonl")


def existing_parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{glob.escape(out.name)}.part-*-of-*.jsonl"))


def journal_path(out: Path) -> Path:
    """Where a csv, coco or text run keeps its rows until the whole file is written."""
    return out.with_name(f"{out.name}.journal.jsonl")


def output_format(cfg: CaptionCLIConfig) -> OutputFormat:
    fmt = OutputFormat(cfg.format)
    out = cfg.out
    if fmt is OutputFormat.auto:
        if out is None:
            return OutputFormat.text
        suffix = Path(out).suffix.lower()
        if suffix not in SUFFIX_FORMATS:
            raise VisionRWKVError(f"cannot tell the format from out={out!r}; expected a name ending in "
                                  f"{', '.join(SUFFIX_FORMATS)}, or set format=text|jsonl|csv|coco")
        return SUFFIX_FORMATS[suffix]
    if fmt is OutputFormat.txt and out is not None:
        raise VisionRWKVError(f"format=txt writes NAME.txt beside each image, so out={out!r} has no use; "
                              "expected out unset (or another format)")
    return fmt


# ---- where the rows go --------------------------------------------------------------------------------------


class RowStore:
    """Caption rows in a locked JSONL file: the out of a jsonl run, the journal of a csv/coco/text run, or one
    process's part under torchrun. Batches are appended whole and fsynced, so a killed run loses at most the
    batch in flight; a torn last line is cut off when the file is opened again."""

    def __init__(self, path: Path):
        self.path = path
        self.log = AppendLog(path, holder="another caption.py run")
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
            print(f"{PROG}: warning: {r.path} and {seen[image_id]} get the same image_id {image_id}",
                  file=sys.stderr)
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


if __name__ == "__main__":
    short_warnings(PROG)  # the library's warnings as one line each (not in-process: tests record them)
    sys.exit(main())
