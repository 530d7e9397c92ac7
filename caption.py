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
import tempfile
import warnings
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from vision_rwkv.captioner import CaptionResult, check_dtype
from vision_rwkv.config import SamplingConfig
from vision_rwkv.errors import VisionRWKVError, short_warnings
from vision_rwkv.launch import Launch

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
  sampling.KEY=VALUE      any SamplingConfig field, e.g. sampling.num_beams=5 sampling.max_new_tokens=32
                          sampling.temperature=0.7 sampling.top_p=0.9 sampling.seed=1
  batch_size=N            images encoded and decoded together (default 32)
  num_workers=N           processes decoding image files; null (default): one per CPU, at most 8;
                          0: in this process (never more than there are batches)
  device=DEVICE           auto (default: CUDA when available) | cpu | cuda | cuda:N
  dtype=DTYPE             auto (default: bf16 weights and autocast on CUDA, fp32 on the CPU) | bf16 | fp32
  progress=BOOL           progress bar with images/s on stderr; null (default): when stderr is a terminal
  paths=[A,B]             paths as a Hydra list (added to the positional ones)
                          (a value with spaces, commas or brackets needs Hydra's quotes: out="'my file.jsonl'")
  --cfg                   print the composed configuration and exit
  -h, --help              print this text and exit

output formats (format=auto picks from out's suffix: .jsonl -> jsonl, .csv -> csv, .json -> coco,
.txt -> text; no out -> text on standard output):
  text    one line per image: the caption, or PATH<TAB>CAPTION when there are several images;
          a failed image's line reads [error] REASON in place of the caption
  jsonl   one {"path", "caption", "score", "error"} object per line, appended and flushed after
          every batch; a re-run with the same out skips the images already in the file (resume;
          to retry failed images, delete their lines)
  csv     columns path, caption, score, error
  coco    COCO results JSON: [{"image_id", "caption"}]; image_id is the file name's number
          (000000123456.jpg, COCO_val2014_000000123456.jpg), else the image's position in the input;
          failed images are left out (the format has no place for them)
  txt     a sidecar NAME.txt holding the caption beside each image NAME.EXT (out must be unset;
          failed images get none)
score is the caption's total log-probability under the model (higher is more likely).
csv, coco and text files are written whole at the end, through a temporary file and a rename.

A file that cannot be read (corrupt, truncated, not an image, too large, unreadable, a symlink loop)
gets one line on stderr and an error row; the run goes on. At the end stderr says
"captioned N images, M failed in T s (R images/s)" (T from the loaded model to the last image).
Exit status: 0 when done, 1 when every image failed, 2 on a usage, config or checkpoint error.

several processes (one per GPU; torchrun's own flags for several machines):
  torchrun --nproc_per_node=2 caption.py photos/ out=captions.jsonl
each process captions every 2nd pending image into out.part-R-of-W.jsonl beside out; process 0 then
merges the parts into out in input order. out is required (any format but text on standard output;
format=txt needs none). A killed jsonl run resumes with any number of processes.

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
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


ConfigStore.instance().store(name="caption_cli_schema", node=CaptionCLIConfig)
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
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:
        hint = "" if isinstance(e, VisionRWKVError) else " (python caption.py --help lists the options)"
        print(f"{PROG}: {one_line(e)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


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


def one_line(e: BaseException) -> str:
    """Hydra and OmegaConf spread a message over several lines and a chain of causes: keep the words."""
    noise = ("full_key:", "object_type=", "reference_type=", "To append to your config", "See https://hydra.cc",
             "Set the environment variable HYDRA_FULL_ERROR")
    parts: list[str] = []
    cause: BaseException | None = e
    while cause is not None and len(parts) < 3:
        text = str(cause).split("Config search path:")[0]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
        if lines:
            parts.append(" ".join(lines).rstrip("."))
        cause = cause.__cause__
    return ": ".join(parts) or type(e).__name__


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
    writer = make_writer(fmt, cfg.out, images)
    todo = [p for p in images if _key(p) not in writer.done]
    skipped = len(images) - len(todo)
    if skipped:
        print(f"{PROG}: {skipped} of {len(images)} images are already in {cfg.out}; captioning the other "
              f"{len(todo)}", file=sys.stderr)
    try:
        captioned, failed, seconds = caption_into(writer, todo, cfg, cfg.device)
        writer.close()  # the whole-file formats are written here, only after a complete run
    finally:
        writer.release()
    print(f"{PROG}: captioned {captioned} images, {failed} failed{_rate(captioned + failed, seconds)}"
          + (f" ({skipped} already in {cfg.out})" if skipped else ""), file=sys.stderr)
    return 1 if failed and not captioned else 0


def list_images(paths: list[str], quiet: bool) -> list[str]:
    from vision_rwkv.images import find_images

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

    from vision_rwkv.captioner import Captioner

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
    return captioned, failed, time.perf_counter() - start


def _rate(images: int, seconds: float) -> str:
    return f" in {seconds:.1f} s ({images / seconds:.1f} images/s)" if images and seconds > 0 else ""


# ---- several processes (torchrun) ---------------------------------------------------------------------------


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank:03d}-of-{world:03d}.jsonl")


def existing_parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{glob.escape(out.name)}.part-*-of-*.jsonl"))


def read_part_rows(part: Path) -> list[dict]:
    """The whole rows of a part file (a last line cut by a kill is left out)."""
    rows = []
    for n, line in enumerate(part.read_bytes().split(b"\n")[:-1], 1):
        row = _caption_row(line)
        if row is None:
            raise VisionRWKVError(f"{part} line {n} is not a caption row; it is a part file of an earlier "
                                  "multi-process run (fix or remove it)")
        rows.append(row)
    return rows


def _caption_row(line: bytes) -> dict | None:
    """A JSONL output line as its row, or None when it is not one (no JSON object with a string path)."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("path"), str) else None


def absorb_parts(out: Path, images: list[str]) -> None:
    """Append the rows of every part file next to a JSONL out (in input order, rows already in out left
    out, so absorbing twice never duplicates), fsync, then delete the parts."""
    parts = existing_parts(out)
    if not parts:
        return
    done = set(_read_jsonl_paths(out))
    order = {_key(p): i for i, p in enumerate(images)}
    rows: dict[str, dict] = {}
    for part in parts:
        for row in read_part_rows(part):
            key = _key(row["path"])
            if key not in done:
                rows.setdefault(key, row)
    ranked = sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order)))
    if ranked:
        with open(out, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(_json_line(row) for _, row in ranked))
            f.flush()
            os.fsync(f.fileno())
    for part in parts:
        part.unlink()


def run_sharded(cfg: CaptionCLIConfig, fmt: OutputFormat, shard: Launch) -> int:
    """Under torchrun: each process captions every WORLD_SIZE-th image of the pending list into its own
    part file (JSONL, flushed per batch), then process 0 merges the parts into out in input order.

    JSONL out resumes as usual: parts left by a killed run (any process count) are merged into out first.
    The whole-file formats are rendered by process 0 from the parts once every process is done; format=txt
    needs no merge (each process writes its own sidecars).
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if cfg.out is None and fmt is not OutputFormat.txt:
        raise VisionRWKVError(f"under torchrun (WORLD_SIZE={shard.world}) the processes cannot share standard "
                              "output; expected out=FILE (each process writes FILE.part-R-of-W.jsonl and process "
                              "0 merges them) or format=txt")
    out = Path(cfg.out) if cfg.out is not None else None
    if out is not None:
        _check_writable(out)
    if not dist.is_initialized():  # gloo: only barriers, the file list and a few integers pass between processes
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    try:
        main_process = shard.rank == 0
        # one listing for all: processes listing a folder that changes meanwhile would split different lists
        listing: list = [None]
        if main_process:
            try:
                listing = [list_images(cfg.paths, quiet=False)]
            except VisionRWKVError as e:
                listing = [e]
        dist.broadcast_object_list(listing, src=0)
        if isinstance(listing[0], VisionRWKVError):  # said once, by process 0; the others just stop
            if main_process:
                raise listing[0]
            return 2
        images = listing[0]
        if main_process and out is not None:
            if fmt is OutputFormat.jsonl:
                absorb_parts(out, images)  # an earlier killed run's parts
            else:
                for part in existing_parts(out):  # whole-file formats do not resume: start clean
                    part.unlink()
        dist.barrier()
        done = frozenset(_read_jsonl_paths(out)) if fmt is OutputFormat.jsonl else frozenset()
        todo = [p for p in images if _key(p) not in done]
        mine = todo[shard.rank::shard.world]
        writer = SidecarWriter(mine) if fmt is OutputFormat.txt else JsonlWriter(part_path(out, shard.rank,
                                                                                            shard.world))
        device = shard.device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this process's GPU is also the current one (streams, graphs)
        try:
            captioned, failed, seconds = caption_into(writer, mine, cfg, str(device), main_process)
        finally:
            writer.release()
        counts = [None] * shard.world
        dist.all_gather_object(counts, (captioned, failed, seconds))  # also the barrier: every part is complete
        captioned, failed = (sum(c[i] for c in counts) for i in (0, 1))
        seconds = max(c[2] for c in counts)  # the slowest process
        if main_process and out is not None:
            if fmt is OutputFormat.jsonl:
                absorb_parts(out, images)
            else:
                rows = {_key(r["path"]): r for part in existing_parts(out) for r in read_part_rows(part)}
                results = [CaptionResult(**rows[_key(p)]) for p in images if _key(p) in rows]
                whole = make_writer(fmt, cfg.out, images)
                whole.write(results)
                whole.close()
                for part in existing_parts(out):
                    part.unlink()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    skipped = len(images) - len(todo)
    if main_process:
        print(f"{PROG}: captioned {captioned} images, {failed} failed with {shard.world} processes"
              f"{_rate(captioned + failed, seconds)}" + (f" ({skipped} already in {cfg.out})" if skipped else ""),
              file=sys.stderr)
    return 1 if failed and not captioned else 0


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


# ---- writers ------------------------------------------------------------------------------------------------


class Writer:
    """Receives each batch's results in input order. `done` holds the paths an earlier run wrote (resume)."""

    done: frozenset[str] = frozenset()

    def write(self, batch: list[CaptionResult]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The run is complete: write what is still held."""

    def release(self) -> None:
        """Complete or not: let go of open files."""


def make_writer(fmt: OutputFormat, out: str | None, images: list[str]) -> Writer:
    path = Path(out) if out is not None else None
    if path is not None:
        _check_writable(path)
    if fmt is OutputFormat.jsonl:
        return JsonlWriter(path)
    if fmt is OutputFormat.txt:
        return SidecarWriter(images)
    if fmt is OutputFormat.text:
        render = _text_lines(several=len(images) > 1)
        return StreamWriter(render) if path is None else WholeFileWriter(path, render)
    return WholeFileWriter(path, _csv_text if fmt is OutputFormat.csv else _coco_text)


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
    """Text on standard output, flushed after every batch."""

    def __init__(self, render):
        self.render = render

    def write(self, batch):
        sys.stdout.write(self.render(batch))
        sys.stdout.flush()


class WholeFileWriter(Writer):
    """Collects every result, renders them at the end: to a file (temporary file + rename) or stdout."""

    def __init__(self, path: Path | None, render):
        self.path, self.render, self.results = path, render, []

    def write(self, batch):
        self.results.extend(batch)

    def close(self):
        text = self.render(self.results)
        if self.path is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            atomic_write(self.path, text)


class JsonlWriter(Writer):
    """JSONL rows appended one batch per write(), then flushed and fsynced: a killed run loses at most the
    batch in flight, and a restart drops a half-written last line before appending."""

    def __init__(self, path: Path | None):
        self.path = path
        self.fd = None
        if path is not None:
            self.done = frozenset(_read_jsonl_paths(path))

    def write(self, batch):
        data = "".join(_json_line({"path": r.path, "caption": r.caption, "score": r.score, "error": r.error})
                       for r in batch)
        if self.path is None:
            sys.stdout.write(data)
            sys.stdout.flush()
            return
        if self.fd is None:  # opened at the first batch: a run that fails to start leaves no empty file
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(data.encode("utf-8"))
        while view:  # one write() in practice; a short write only continues the same line
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _json_line(row: dict) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8 (surrogate escapes): keep it as \\u escapes
        line = json.dumps(row)
    return line + "\n"


def _read_jsonl_paths(path: Path) -> set[str]:
    """Paths of an existing JSONL output; a last line without its newline (a killed write) is cut off."""
    if not path.exists():
        return set()
    done, good_end, n = set(), 0, 0
    with open(path, "r+b") as f:
        for n, line in enumerate(f, 1):  # noqa: B007 (n names the line in errors)
            if not line.endswith(b"\n"):
                f.truncate(good_end)
                os.fsync(f.fileno())
                print(f"{PROG}: dropped a partial last line of {path} (an interrupted write)", file=sys.stderr)
                break
            good_end += len(line)
            if not line.strip():
                continue
            row = _caption_row(line)
            if row is None:
                raise VisionRWKVError(f"{path} line {n} is not a caption row; expected JSON objects with a "
                                      "'path' on every line (fix or remove it, or choose another out)")
            done.add(_key(row["path"]))
    return done


class SidecarWriter(Writer):
    """NAME.txt beside each captioned image NAME.EXT, each written whole (temporary file + rename)."""

    def __init__(self, images: list[str]):
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
    return os.path.normpath(path)


def _check_writable(path: Path) -> None:
    """Fail before the model loads, not after hours of captioning."""
    if path.is_dir():
        raise VisionRWKVError(f"out={str(path)!r} is a folder; expected a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VisionRWKVError(f"cannot create the folder {parent} for out ({e.strerror}); "
                              "expected a writable path") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise VisionRWKVError(f"cannot write {path}; expected a writable file path")


def atomic_write(path: Path, text: str) -> None:
    """The whole file or nothing: a temporary file in the same folder, fsynced, then renamed over path."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise VisionRWKVError(f"cannot write {path} ({e.strerror}); expected a writable folder") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    short_warnings(PROG)  # the library's warnings as one line each (not in-process: tests record them)
    sys.exit(main())
