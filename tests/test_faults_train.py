"""Fault injection for train_caption.py: a run folder is never destroyed, and every resume is exact.

kill -9 comes from the named fault points of vision_rwkv._faults (train.step_done, checkpoint.files_written),
so where a run dies is the same every time. Each test looks at the files afterwards.
"""

import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import losses, tiny

from vision_rwkv._fs import AppendLog
from vision_rwkv.caption.model import load_caption_model
from vision_rwkv.cli import train as train_caption

REPO = Path(__file__).resolve().parents[1]
COMMON = ["trainer.max_steps=6", "trainer.eval_every=0", "trainer.save_every=2", "trainer.projector_steps=2"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_prep import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    assert make_shapes.main(["--out", str(root), "--train", "48", "--val", "6", "--test", "4", "--size", "32"]) == 0
    return root


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory) -> Path:
    """The reference: the same run, never stopped."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train_caption.main(tiny(shapes, out, *COMMON)) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted_process(shapes, tmp_path_factory) -> Path:
    """The reference for runs in a child process (its thread count, hence its float sums, are the children's)."""
    out = tmp_path_factory.mktemp("ref_process") / "run"
    proc = train_process(*tiny(shapes, out, *COMMON))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run folder but Hydra's records, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "hydra" not in p.parts}


def same_weights(a: Path, b: Path) -> None:
    ma, mb = load_caption_model(a), load_caption_model(b)
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), k


def assert_exact_continuation(out: Path, reference: Path) -> None:
    a, _ = losses(reference)
    b, _ = losses(out)
    assert sorted(b) == list(range(1, 7))
    assert [b[s] for s in range(1, 7)] == [a[s] for s in range(1, 7)]  # bit-identical, not close
    same_weights(out / "checkpoints" / "step-0000006", reference / "checkpoints" / "step-0000006")


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def train_process(*args, fault=None) -> subprocess.CompletedProcess:
    extra = {"VISION_RWKV_FAULT": fault} if fault else {}
    return subprocess.run([sys.executable, str(REPO / "train_caption.py"), *args], env=env(**extra),
                          capture_output=True, text=True, timeout=600)


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("train_caption.py:")]


# ---- a folder that already holds a run ----------------------------------------------------------------------


def test_a_finished_run_is_never_overwritten_by_accident(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_caption.main(tiny(shapes, out, *COMMON)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.max_steps=3")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"train_caption.py: trainer.out_dir {out} already holds a run (3 checkpoint(s) up to step-0000006 "
                   "and metrics.jsonl with 6 lines); expected trainer.resume=true to continue it, "
                   "trainer.overwrite=true to replace it, or another trainer.out_dir"]
    assert snapshot(out) == before


def test_the_command_line_refuses_too_and_only_hydra_records_are_added(shapes, tmp_path):
    out = tmp_path / "run"
    first = train_process(*tiny(shapes, out, *COMMON, "trainer.max_steps=2"))
    assert first.returncode == 0, first.stderr[-2000:]  # Hydra's own folder was there first: not a run
    before = snapshot(out)
    again = train_process(*tiny(shapes, out, *COMMON, "trainer.max_steps=2"))
    assert again.returncode == 2
    assert len(our_lines(again.stderr)) == 1 and "already holds a run" in again.stderr
    assert snapshot(out) == before


def test_overwrite_replaces_the_run(shapes, tmp_path, uninterrupted):
    out = tmp_path / "run"
    assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.max_steps=4", "optim.lr=1e-2")) == 0
    with pytest.warns(UserWarning, match=r"trainer.overwrite=true: removed the earlier run in .* \(2 checkpoint"):
        assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.overwrite=true")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004",
                                                                        "step-0000006"]
    assert_exact_continuation(out, uninterrupted)  # nothing of the old run is left to mix in


def test_resume_and_overwrite_together_is_an_error(shapes, tmp_path, capsys):
    assert train_caption.main(tiny(shapes, tmp_path / "run", *COMMON, "trainer.resume=true",
                                   "trainer.overwrite=true")) == 2
    assert "contradict each other" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(shapes, tmp_path, uninterrupted):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"trainer.resume=true but .* holds no checkpoint: starting from step 0"):
        assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.resume=true")) == 0
    assert_exact_continuation(out, uninterrupted)


def test_a_second_run_on_a_busy_folder_is_refused(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = AppendLog(out / "metrics.jsonl")  # another training run writes here
    try:
        assert train_caption.main(tiny(shapes, out, *COMMON)) == 2
    finally:
        other.close()
    assert "is being written by another training run" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


# ---- kill -9, then resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["train.step_done:3", "checkpoint.files_written:2"])
def test_a_run_killed_anywhere_resumes_bit_identically(shapes, tmp_path, uninterrupted_process, fault):
    out = tmp_path / "run"
    killed = train_process(*tiny(shapes, out, *COMMON), fault=fault)
    assert killed.returncode == -signal.SIGKILL
    # the checkpoint being written when the kill came is not there, not even in part; latest names a whole one
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "latest", "step-0000002"]
    resumed = train_process(*tiny(shapes, out, *COMMON, "trainer.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_exact_continuation(out, uninterrupted_process)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---- torn and damaged files ---------------------------------------------------------------------------------


def stopped_run(shapes, out: Path, at: int = 4) -> None:
    assert train_caption.main(tiny(shapes, out, *COMMON, f"trainer.stop_after={at}")) == 0


def test_a_torn_metrics_line_is_dropped(shapes, tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped_run(shapes, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a write cut by a kill
    with pytest.warns(UserWarning, match="dropped a partial last line of .*metrics.jsonl"):
        assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.resume=true")) == 0
    assert_exact_continuation(out, uninterrupted)


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(shapes, tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped_run(shapes, out)
    state = out / "checkpoints" / "step-0000004" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"step-0000004 cannot be read: .*; resuming from step-0000002, the newest"):
        assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.resume=true")) == 0
    assert_exact_continuation(out, uninterrupted)


def test_a_torn_latest_pointer_falls_back_to_the_newest_checkpoint(shapes, tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped_run(shapes, out)
    (out / "checkpoints" / "latest").write_text("step-00")
    with pytest.warns(UserWarning, match=r"latest is missing or names no checkpoint; resuming from step-0000004"):
        assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.resume=true")) == 0
    assert_exact_continuation(out, uninterrupted)


def test_no_readable_checkpoint_is_one_line(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    stopped_run(shapes, out, at=2)
    (out / "checkpoints" / "step-0000002" / "model.safetensors").write_bytes(b"\0" * 10)
    capsys.readouterr()
    assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.resume=true")) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("train_caption.py: no checkpoint in") and "model.safetensors" in line


class _Payload:
    """Unpickling this runs code: it writes a file (a stand-in for anything worse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_resume_never_unpickles(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    stopped_run(shapes, out, at=2)
    folder = out / "checkpoints" / "step-0000002"
    for name in ("trainer_state.json", "trainer_state.safetensors"):  # what an old (or hostile) folder holds
        (folder / name).unlink()
    marker = tmp_path / "marker"
    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"step": 2, "x": _Payload(marker)}))
    capsys.readouterr()
    assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.resume=true")) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "trainer_state.pt is a pickle" in line and "can run code" in line
    assert not marker.exists()


# ---- disks, modes and scale ---------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_full_disk_at_a_checkpoint_keeps_the_earlier_ones(shapes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = os.fsync

    def fsync(fd):
        if "step-0000004" in os.path.realpath(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert train_caption.main(tiny(shapes, out, *COMMON)) == 3
    monkeypatch.undo()
    err = capsys.readouterr().err.splitlines()
    assert err == [f"train_caption.py: cannot write {out}/checkpoints/step-0000004 (no space left on the device); it "
                   "was left as it was before; the checkpoints before it are kept, and trainer.resume=true continues "
                   "from step-0000002"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"


def test_saved_files_follow_the_umask(shapes, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        stopped_run(shapes, out, at=2)
        assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.stop_after=4", "trainer.resume=true")) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    folder = out / "checkpoints" / "step-0000004"
    assert mode(folder) == 0o755 and mode(out / "checkpoints") == 0o755
    for path in [*folder.iterdir(), out / "checkpoints" / "latest", out / "metrics.jsonl", out / "tokenizer.json"]:
        assert mode(path) == 0o644, path


def test_keep_last_prunes_the_oldest_checkpoints(shapes, tmp_path):
    out = tmp_path / "run"
    assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.save_every=1", "trainer.keep_last=2")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000005", "step-0000006"]


def test_a_new_global_batch_restarts_the_epoch_and_says_so(shapes, tmp_path):
    out = tmp_path / "run"
    stopped_run(shapes, out, at=2)
    with pytest.warns(UserWarning, match=r"global batch changes from 8 to 4, so epoch 0 restarts from its first "
                                         r"batch"):
        assert train_caption.main(tiny(shapes, out, *COMMON, "trainer.resume=true", "data.batch_size=4")) == 0
    assert sorted(losses(out)[0]) == list(range(1, 7))


def test_config_errors_on_the_command_line_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "never"
    for bad in ("trainer.max_stepz=3", "projector.kind=transformer", "sampling.strategy=nucleus"):
        proc = train_process(bad, f"trainer.out_dir={out}")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("train_caption.py: ")
        assert bad.split("=")[0].split(".")[-1] in proc.stderr or "nucleus" in proc.stderr
        assert not out.exists()


@pytest.mark.slow
def test_multirun_jobs_get_their_own_folders_and_resume_there(shapes, tmp_path):
    out = tmp_path / "sweep"
    args = tiny(shapes, out, "trainer.eval_every=0", "trainer.save_every=2", "trainer.projector_steps=1")
    proc = train_process("-m", *args, "trainer.max_steps=2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, steps in ((0, 2), (1, 3)):
        assert sorted(losses(out / f"job-{job}")[0]) == list(range(1, steps + 1))
    again = train_process("-m", *args, "trainer.max_steps=4,5", "trainer.resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    for job, steps in ((0, 4), (1, 5)):
        assert sorted(losses(out / f"job-{job}")[0]) == list(range(1, steps + 1))
    assert not (out / "metrics.jsonl").exists() and not (tmp_path / "multirun").exists()
    assert json.loads((out / "job-1" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5


def test_runs_sharing_a_feature_cache_take_turns(shapes, tmp_path):
    import threading
    import warnings

    from filelock import FileLock

    from vision_rwkv.caption.encoder import ClipEncoder
    from vision_rwkv.train.data import load_source
    from vision_rwkv.train.features import feature_cache

    cfg = train_caption.to_caption_config(
        train_caption.compose(["experiment=shapes_demo", "encoder=tiny", f"data.path={shapes}"]))
    encoder, rows = ClipEncoder(cfg.encoder), load_source(cfg.data)["train"]
    parent = tmp_path / "cache" / encoder.feature_key()
    parent.mkdir(parents=True)
    (parent / ".train.tmp-killed").mkdir()  # what a build killed earlier left
    other = FileLock(str(parent / ".train.lock"))
    other.acquire()  # another run is building
    result, caught = {}, []

    def build():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result["ds"] = feature_cache(encoder, rows, tmp_path / "cache", "train", batch_size=16)
        caught.extend(str(w.message) for w in seen)

    thread = threading.Thread(target=build)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive() and not (parent / "train").exists()  # it waits for the other run
    other.release()
    thread.join(timeout=120)
    assert len(result["ds"]) == len(rows)
    assert any("another process is building the feature cache" in m for m in caught)
    assert sorted(p.name for p in parent.iterdir()) == [".train.lock", "train"]  # the leftover went
