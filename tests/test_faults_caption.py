"""Fault injection for caption.py: kill -9 at named points, full disks, broken pipes, two writers, old parts.

Every test looks at what is on disk afterwards, not only at the exit status. Kills are deterministic: the
named fault points of vision_rwkv._faults (VISION_RWKV_FAULT=caption.batch_written:N) stop the process
with SIGKILL right after its N-th batch is durable.
"""

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_captioner import make_checkpoint, write_images

import caption
from vision_rwkv._fs import AppendLog
from vision_rwkv.caption import writers

REPO = Path(__file__).resolve().parents[1]
FAST = ["sampling.max_new_tokens=6", "num_workers=0", "device=cpu", "batch_size=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def cli(checkpoint, capsys):
    def run(*args):
        code = caption.main([f"checkpoint={checkpoint}", *FAST, *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err.splitlines()

    return run


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def caption_process(checkpoint, *args, fault=None, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "caption.py"), f"checkpoint={checkpoint}", *FAST, *map(str, args)]
    extra = {"VISION_RWKV_FAULT": fault} if fault else {}
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=300, **kwargs)


def jsonl_rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def results(path: Path) -> dict[str, str]:
    """path (or COCO image_id, as a string) -> caption, for any of the file formats."""
    if path.suffix == ".jsonl":
        return {r["path"]: r["caption"] for r in jsonl_rows(path)}
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return {r["path"]: r["caption"] for r in csv.DictReader(f)}
    return {str(r["image_id"]): r["caption"] for r in json.loads(path.read_text())}


def hidden_or_parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".part-" in p.name)


# ---- kill -9, then resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_killed_run_resumes_with_one_row_per_image(checkpoint, cli, tmp_path, suffix):
    images = write_images(tmp_path / "photos", 7)  # 4 batches of 2
    reference = tmp_path / f"reference{suffix}"
    assert cli(tmp_path / "photos", f"out={reference}")[0] == 0

    out = tmp_path / f"out{suffix}"
    killed = caption_process(checkpoint, tmp_path / "photos", f"out={out}", fault="caption.batch_written:2")
    assert killed.returncode == -signal.SIGKILL
    journal = out if suffix == ".jsonl" else writers.journal_path(out)
    assert [r["path"] for r in jsonl_rows(journal)] == [str(p) for p in images[:4]]  # two whole batches
    if suffix != ".jsonl":
        assert not out.exists()  # the whole file comes only at the end

    code, _, err = cli(tmp_path / "photos", f"out={out}")
    assert code == 0
    assert f"caption.py: {journal} already holds 4 rows: 4 of 7 images are done, 3 left" in err
    assert results(out) == results(reference)
    if suffix == ".jsonl":
        assert len(jsonl_rows(out)) == 7
    assert not journal.exists() or journal == out
    assert hidden_or_parts(tmp_path) == []


def test_resume_matches_paths_however_spelt(cli, tmp_path, monkeypatch):
    write_images(tmp_path / "photos", 3)
    out = tmp_path / "o.jsonl"
    assert cli((tmp_path / "photos").resolve(), f"out={out}")[0] == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to("photos")
    for spelling in ("photos", "./photos/../photos", "link"):
        code, _, err = cli(spelling, f"out={out}")
        assert code == 0
        assert f"caption.py: {out} already holds 3 rows: 3 of 3 images are done, 0 left" in err
        assert err[-1] == f"caption.py: captioned 0 images, 0 failed (3 already in {out})"
    assert len(jsonl_rows(out)) == 3


def test_overwrite_starts_afresh(cli, tmp_path):
    images = write_images(tmp_path / "photos", 3)
    out = tmp_path / "o.jsonl"
    assert cli(images[0], f"out={out}")[0] == 0
    assert cli(tmp_path / "photos", f"out={out}", "overwrite=true")[0] == 0
    assert [r["path"] for r in jsonl_rows(out)] == [str(p) for p in images]


# ---- sidecars -----------------------------------------------------------------------------------------------


def test_a_hand_written_sidecar_is_left_alone(cli, tmp_path):
    images = write_images(tmp_path / "photos", 3)
    mine = images[1].with_suffix(".txt")
    mine.write_text("my own careful caption\n")
    code, _, err = cli(tmp_path / "photos", "format=txt")
    assert code == 0
    assert mine.read_text() == "my own careful caption\n"
    assert images[0].with_suffix(".txt").exists() and images[2].with_suffix(".txt").exists()
    assert ("caption.py: 1 of 3 images already have a NAME.txt beside them, and it was left alone "
            "(overwrite=true replaces them)") in err
    assert err[-1].startswith("caption.py: captioned 2 images, 0 failed")

    assert cli(tmp_path / "photos", "format=txt", "overwrite=true")[0] == 0
    assert mine.read_text() != "my own careful caption\n"


# ---- the parts of a killed torchrun run ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_single_process_takes_the_parts_of_a_killed_torchrun_run(cli, tmp_path, suffix):
    images = [str(p) for p in write_images(tmp_path / "photos", 6)]
    done = tmp_path / "done.jsonl"
    assert cli(*images[:3], f"out={done}")[0] == 0
    rows = done.read_text().splitlines(keepends=True)
    out = tmp_path / f"out{suffix}"
    journal = out if suffix == ".jsonl" else writers.journal_path(out)
    writers.part_path(out, 1, 2).write_text(rows[1] + rows[2][:30])  # a torn last line
    writers.part_path(out, 0, 2).write_text(rows[0])

    code, _, err = cli(tmp_path / "photos", f"out={out}")
    assert code == 0
    assert f"caption.py: took 2 rows from 2 part file(s) of an earlier multi-process run into {journal}" in err
    assert f"caption.py: {journal} already holds 2 rows: 2 of 6 images are done, 4 left" in err
    assert hidden_or_parts(tmp_path) == []  # the parts were taken in, then removed
    got = results(out)
    assert sorted(got) == images
    assert got[images[0]] == json.loads(rows[0])["caption"]


# ---- write failures -----------------------------------------------------------------------------------------


def fail_writes_to(monkeypatch, target: Path, after: int = 0):
    """os.write to the file `target` fails with ENOSPC after `after` successful writes: a disk that fills."""
    real, calls = os.write, []

    def write(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(target):
            calls.append(1)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_mid_run_keeps_the_rows_written_and_resumes(cli, tmp_path, monkeypatch):
    images = write_images(tmp_path / "photos", 7)
    out = tmp_path / "o.jsonl"
    with monkeypatch.context() as m:
        fail_writes_to(m, out, after=2)
        code, _, err = cli(tmp_path / "photos", f"out={out}")
    assert code == 3
    assert err == [f"caption.py: cannot write {out} (no space left on the device); the 4 rows written before are "
                   "kept, and the same command resumes after them"]
    assert [r["path"] for r in jsonl_rows(out)] == [str(p) for p in images[:4]]
    code, _, err = cli(tmp_path / "photos", f"out={out}")
    assert code == 0 and len(jsonl_rows(out)) == 7


def test_a_failed_final_write_keeps_every_caption_in_the_journal(cli, tmp_path, monkeypatch):
    write_images(tmp_path / "photos", 5)
    out = tmp_path / "o.csv"
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        code, _, err = cli(tmp_path / "photos", f"out={out}")
    journal = writers.journal_path(out)
    assert code == 3 and len(err) == 1
    assert err[0] == (f"caption.py: cannot write {out} (no space left on the device); it was left as it was before; "
                      f"the 5 captions are kept in {journal}, and the same command writes {out} from them")
    assert not out.exists() and len(jsonl_rows(journal)) == 5
    code, _, err = cli(tmp_path / "photos", f"out={out}")
    assert code == 0 and err[-1] == f"caption.py: captioned 0 images, 0 failed (5 already in {out})"
    assert len(results(out)) == 5 and not journal.exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_standard_output_on_a_full_device(checkpoint, tmp_path):
    [image] = write_images(tmp_path, 1)
    cmd = [sys.executable, str(REPO / "caption.py"), f"checkpoint={checkpoint}", *FAST, str(image)]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(cmd, env=env(), stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == ["caption.py: cannot write to standard output (no space left on the device); "
                                        "the lines printed before stand"]


def test_an_output_that_only_looks_writable_fails_before_any_work(cli, tmp_path):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    [image] = write_images(tmp_path, 1)
    code, out, err = cli(image, "out=/proc/o.jsonl")
    assert code == 2 and out == "" and len(err) == 1 and "cannot write files in /proc" in err[0]


# ---- pipes and neighbours -----------------------------------------------------------------------------------


def test_a_closed_pipe_ends_the_run_quietly(checkpoint, tmp_path):
    write_images(tmp_path / "photos", 6)
    cmd = [sys.executable, str(REPO / "caption.py"), f"checkpoint={checkpoint}", *FAST, str(tmp_path / "photos")]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # what `| head -1` reads, then it goes
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert first.startswith(str(tmp_path / "photos"))
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_a_second_run_on_the_same_output_is_refused(cli, tmp_path):
    [image] = write_images(tmp_path, 1)
    out = tmp_path / "o.jsonl"
    out.write_text('{"path": "x.png", "caption": "c", "score": -1.0, "error": null}\n')
    other = AppendLog(out)  # another run holds it
    try:
        code, _, err = cli(image, f"out={out}")
    finally:
        other.close()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"caption.py: {out} is being written by another caption.py run")
    assert len(jsonl_rows(out)) == 1


def test_two_real_runs_on_one_output_write_each_row_once(checkpoint, tmp_path):
    write_images(tmp_path / "photos", 12)
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, str(REPO / "caption.py"), f"checkpoint={checkpoint}", *FAST, str(tmp_path / "photos"),
           f"out={out}", "batch_size=1"]
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.05)  # the first run holds the output once it has written a row
    first.send_signal(signal.SIGSTOP)  # ...and keeps holding it, paused, while the second one starts
    try:
        second = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2 and "is being written by another caption.py run" in second.stderr
    assert sorted(r["path"] for r in jsonl_rows(out)) == sorted(str(p) for p in (tmp_path / "photos").iterdir())


# ---- torchrun's agent stopped -------------------------------------------------------------------------------


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_torchrun_agent_stops_its_workers_and_a_single_process_resumes(checkpoint, cli, tmp_path, sig):
    images = [str(p) for p in write_images(tmp_path / "photos", 9)]
    out = tmp_path / "run-out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "caption.py"), str(tmp_path / "photos"), f"out={out}", f"checkpoint={checkpoint}", *FAST]
    # each worker hangs after its first durable batch: the agent is then stopped with the rows on disk
    log = open(tmp_path / "agent.log", "w")  # a file, not a pipe: nothing blocks on a full pipe, or waits for EOF
    agent = subprocess.Popen(cmd, env=env(VISION_RWKV_FAULT="caption.batch_written:1=hang"), stdout=log,
                             stderr=subprocess.STDOUT)
    parts = [writers.part_path(out, r, 2) for r in range(2)]
    deadline = time.time() + 180
    while time.time() < deadline and not all(p.exists() and p.read_text().count("\n") >= 2 for p in parts):
        time.sleep(0.1)
    workers = [pid for pid in processes_mentioning(str(out)) if pid != agent.pid]
    assert len(workers) == 2, workers
    agent.send_signal(sig)
    agent.wait(timeout=60)
    log.close()
    deadline = time.time() + 30
    while time.time() < deadline and processes_mentioning(str(out)):
        time.sleep(0.2)
    orphans = processes_mentioning(str(out))
    for pid in orphans:  # leave nothing behind when this fails
        os.kill(pid, signal.SIGKILL)
    assert orphans == []  # no orphan keeps captioning (kill -9: they follow their agent)

    code, _, err = cli(tmp_path / "photos", f"out={out}")
    assert code == 0
    assert f"caption.py: took 4 rows from 2 part file(s) of an earlier multi-process run into {out}" in err
    assert sorted(r["path"] for r in jsonl_rows(out)) == images
    assert hidden_or_parts(tmp_path) == []
