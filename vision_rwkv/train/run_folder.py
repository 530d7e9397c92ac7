"""A training run's folder: what it holds, who writes it, and which checkpoint a resume starts from.

    <out_dir>/metrics.jsonl                 one JSON object per logged step and per evaluation, appended;
                                            locked while a run writes it (one run per folder)
    <out_dir>/checkpoints/step-NNNNNNN/     model.safetensors, config.yaml, tokenizer,
                                            trainer_state.json + trainer_state.safetensors
    <out_dir>/checkpoints/latest            the name of the newest complete checkpoint
    <out_dir>/tensorboard/, tokenizer.json  TensorBoard events; the BPE a tokenizer=train run learned
    <out_dir>/hydra/                        Hydra's own record of each launch (not the run's data)

A folder "holds a run" when it has checkpoints or metrics; a new run never writes over one unless asked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .._fs import AppendLog, atomic_write, remove_leftovers, write_failed
from ..errors import VisionRWKVError

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP = re.compile(r"step-(\d+)")


class RunFolder:
    def __init__(self, out):
        self.out = Path(out)
        self.checkpoint_dir = self.out / CHECKPOINTS
        self.latest_path = self.checkpoint_dir / LATEST
        self.metrics_path = self.out / METRICS

    def checkpoints(self) -> list[Path]:
        """The step-N folders, oldest first (temporary and hidden folders are not checkpoints)."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.iterdir() if p.is_dir() and _STEP.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(_STEP.fullmatch(p.name).group(1)))

    def latest(self) -> Path | None:
        """The folder `latest` names, or None when the pointer is missing, torn or names no checkpoint."""
        try:
            name = self.latest_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        folder = self.checkpoint_dir / name
        return folder if _STEP.fullmatch(name) and folder.is_dir() else None

    def point_latest(self, folder: Path) -> None:
        atomic_write(self.latest_path, folder.name)

    def describe(self, metrics_lines: int | None = None) -> str | None:
        """What run this folder holds, in words ("3 checkpoints up to step-0000060 and metrics.jsonl with 66
        lines"), or None when it holds none. metrics_lines: the count when the caller has the file open."""
        parts = []
        checkpoints = self.checkpoints()
        if checkpoints:
            parts.append(f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}")
        if metrics_lines is None:
            try:
                metrics_lines = self.metrics_path.read_bytes().count(b"\n")
            except OSError:
                metrics_lines = 0
        if metrics_lines:
            parts.append(f"{METRICS} with {metrics_lines} lines")
        return " and ".join(parts) or None

    def remove_run(self, metrics: AppendLog) -> None:
        """Delete the run's own files (checkpoints, metrics, TensorBoard events, a learned BPE); Hydra's records
        stay. The metrics file is emptied in place: the caller holds it."""
        metrics.truncate(0)
        for name in (CHECKPOINTS, "tensorboard"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        (self.out / "tokenizer.json").unlink(missing_ok=True)

    def resume_candidates(self) -> list[Path]:
        """The checkpoint `latest` names, then the others, newest first."""
        ordered = list(reversed(self.checkpoints()))
        latest = self.latest()
        if latest is not None:
            ordered = [latest] + [p for p in ordered if p != latest]
        return ordered

    def prune(self, keep_last: int | None, protect: Path) -> list[Path]:
        """Delete the oldest checkpoints beyond keep_last (never `protect`, the one `latest` names)."""
        if not keep_last:
            return []
        doomed = [p for p in self.checkpoints()[:-keep_last] if p != protect]
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)
        return doomed


def claim(run: RunFolder, *, resume: bool, overwrite: bool) -> tuple[AppendLog, list[str]]:
    """Take the run folder for this run: lock its metrics file, refuse to start over an earlier run unless
    asked (trainer.resume or trainer.overwrite). Returns the locked metrics log and lines to tell the user."""
    if resume and overwrite:
        raise VisionRWKVError("trainer.resume=true and trainer.overwrite=true contradict each other; expected one "
                              "of them (resume continues the run in trainer.out_dir, overwrite replaces it)")
    try:
        run.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VisionRWKVError(f"cannot create trainer.out_dir {run.out} ({e.strerror}); expected a writable "
                              "path") from None
    metrics = AppendLog(run.metrics_path, holder="another training run")
    try:
        notes = []
        leftovers = remove_leftovers(run.checkpoint_dir) + remove_leftovers(run.out)
        if leftovers:
            notes.append(f"removed {len(leftovers)} unfinished temporary file(s) of a killed run, e.g. "
                         f"{leftovers[0].name}")
        held = run.describe(len(metrics.lines(cut_torn=False)[0]))
        if held and not resume:
            if not overwrite:
                raise VisionRWKVError(f"trainer.out_dir {run.out} already holds a run ({held}); expected "
                                      "trainer.resume=true to continue it, trainer.overwrite=true to replace it, "
                                      "or another trainer.out_dir")
            run.remove_run(metrics)
            notes.append(f"trainer.overwrite=true: removed the earlier run in {run.out} ({held})")
        return metrics, notes
    except BaseException:
        metrics.close(remove_if_empty=True)
        raise


class MetricsLog:
    """metrics.jsonl (locked, appended and fsynced per line) and TensorBoard events, written by rank 0.

    On resume, lines past the resumed step are dropped, and so is a torn last line or anything after a line
    that is not JSON (a damaged tail), each said in one line."""

    def __init__(self, run: RunFolder, log: AppendLog | None, keep_through_step: int):
        self.log, self.tb, self.notes = log, None, []
        if log is None:  # not rank 0
            return
        lines, torn = log.lines()
        if torn:
            self.notes.append(f"dropped a partial last line of {run.metrics_path} (an interrupted write)")
        keep, size = 0, 0
        for line in lines:
            step = _step_of(line)
            if step is None:
                self.notes.append(f"dropped {len(lines) - keep} lines of {run.metrics_path} from line {keep + 1} "
                                  "on, which is not a JSON object with a step")
                break
            if step > keep_through_step:
                break
            keep, size = keep + 1, size + len(line)
        if keep < len(lines):
            log.truncate(size)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.out / "tensorboard"))
        except ImportError:  # TensorBoard is optional for the library: metrics.jsonl has everything
            self.tb = None

    def write(self, record: dict) -> None:
        if self.log is None:
            return
        self.log.append((json.dumps(record) + "\n").encode(),
                        then="the lines before it are kept, and trainer.resume=true continues from the last "
                             "checkpoint")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.log is not None:
            self.log.close(remove_if_empty=True)
            self.log = None
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError as e:
                raise write_failed(self.tb.log_dir, e) from None
            self.tb = None


def _step_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None

