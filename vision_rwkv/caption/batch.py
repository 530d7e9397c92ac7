"""Captioning image files and folders as a job: list the images, open the output (resuming what an earlier
run left), caption batch by batch, and, under torchrun, share the images among the processes and merge
their parts. `run(CaptionJobConfig(...))` is what `caption.py` and `vision-rwkv caption` call.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .._faults import fault_point
from ..config import CaptionJobConfig, OutputFormat
from ..errors import EXIT_ALL_FAILED, EXIT_OK, EXIT_USAGE, VisionRWKVError
from ..launch import Launch, die_with_parent
from .captioner import check_dtype
from .writers import JsonlWriter, Output, RowStore, SidecarWriter, Writer, part_path

SUFFIX_FORMATS = {".jsonl": OutputFormat.jsonl, ".csv": OutputFormat.csv, ".json": OutputFormat.coco,
                  ".txt": OutputFormat.text}


Say = Callable[[str], None]


def stderr_lines(prog: str) -> Say:
    """Lines for the user on stderr under the command's name, through tqdm so that a progress bar is redrawn
    below them."""
    from tqdm.auto import tqdm

    return lambda line: tqdm.write(f"{prog}: {line}", file=sys.stderr)


def run(cfg: CaptionJobConfig, say: Say | None = None) -> int:
    """Run the job and return its exit status; `say` receives each line for the user (by default stderr, under
    the name caption.py)."""
    say = say or stderr_lines("caption.py")
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
        return run_sharded(cfg, fmt, shard, say)
    images = list_images(cfg.paths, say)
    output = Output(fmt, cfg.out, images, cfg.overwrite)
    try:
        for note in output.notes:
            say(note)
        writer = output.writer()
        captioned, failed, seconds = caption_into(writer, output.todo, cfg, cfg.device, say)
        writer.close()
        output.finish()  # csv, coco and text files are written here, from the journal, after a complete run
    finally:
        output.close()
    say(f"captioned {captioned} images, {failed} failed{_rate(captioned + failed, seconds)}{output.already}")
    return EXIT_ALL_FAILED if failed and not captioned else EXIT_OK


def list_images(paths: list[str], say: Say) -> list[str]:
    from .images import find_images

    with warnings.catch_warnings(record=True) as caught:  # e.g. a folder that cannot be listed: one line each
        warnings.simplefilter("always")
        images = [str(p) for p in find_images(paths)]
    for w in caught:
        say(f"warning: {w.message}")
    return images


def caption_into(writer: Writer, todo: list[str], cfg: CaptionJobConfig, device: str, say: Say,
                 main_process: bool = True) -> tuple[int, int, float]:
    """Caption `todo` batch by batch into writer; one line said per failed image.

    Returns (captioned, failed, seconds), the seconds counted from the loaded model to the last batch.
    """
    import time

    from .captioner import Captioner

    captioned = failed = 0
    if not todo:
        return 0, 0, 0.0
    if cfg.checkpoint is None and main_process:
        say("no checkpoint given: captioning with the shipped demo model")
    captioner = Captioner.load(cfg.checkpoint, device=device, dtype=cfg.dtype)
    start = time.perf_counter()
    progress = main_process and (sys.stderr.isatty() if cfg.progress is None else cfg.progress)
    batches = captioner.caption_batches(todo, cfg.sampling, batch_size=cfg.batch_size,
                                        num_workers=cfg.num_workers, progress=progress)
    for batch in batches:
        for result in batch:
            if result.error is not None:
                say(f"{result.path}: {result.error}")
        failed += sum(r.error is not None for r in batch)
        captioned += sum(r.error is None for r in batch)
        writer.write(batch)
        fault_point("caption.batch_written")
    return captioned, failed, time.perf_counter() - start


def _rate(images: int, seconds: float) -> str:
    return f" in {seconds:.1f} s ({images / seconds:.1f} images/s)" if images and seconds > 0 else ""


# ---- several processes (torchrun) ---------------------------------------------------------------------------


def run_sharded(cfg: CaptionJobConfig, fmt: OutputFormat, shard: Launch, say: Say) -> int:
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
                images = list_images(cfg.paths, say)
                output = Output(fmt, cfg.out, images, cfg.overwrite)
                for note in output.notes:
                    say(note)
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
            captioned, failed, seconds = caption_into(writer, mine, cfg, str(device), say, main_process)
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
        say(f"captioned {captioned} images, {failed} failed with {shard.world} processes"
            f"{_rate(captioned + failed, seconds)}{already}")
    return EXIT_ALL_FAILED if failed and not captioned else EXIT_OK


def output_format(cfg: CaptionJobConfig) -> OutputFormat:
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
