"""Several processes on the CPU, launched by torchrun exactly as a user would launch them (gloo backend).

- train_caption.py with 2 processes x batch B follows the same loss curve as 1 process x batch 2B.
- caption.py with 2 processes captions every image exactly once and merges a complete output.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_captioner import make_checkpoint, write_bad_folder, write_images
from test_train import losses, tiny

import caption
from vision_rwkv.caption import writers
from vision_rwkv.caption.model import load_caption_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def torchrun(nproc: int, script: str, *args, cwd=None, ok=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---- training -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_prep import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    assert make_shapes.main(["--out", str(root), "--train", "48", "--val", "6", "--test", "4", "--size", "32"]) == 0
    return root


def test_two_processes_follow_one_process_with_double_the_batch(shapes, tmp_path):
    """The loss of a step is the token-weighted mean over the global batch, so the two runs compute the same
    function of the same examples; only the order of float sums differs (one gradient vs. two all-reduced
    halves). In fp32 over 8 steps that drifts by ~1e-6 relative; 1e-4 leaves room and still fails on any
    real mismatch (a wrong shard, a mean of per-rank means, a missed all-reduce all move the loss by >1e-2)."""
    common = ["trainer.max_steps=8", "trainer.eval_every=4", "trainer.save_every=4", "trainer.projector_steps=2",
              "trainer.device=cpu", "data.val_subset=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    hydra_dirs = lambda d: [f"hydra.run.dir={d}/hydra", "hydra.output_subdir=null"]  # noqa: E731
    run_one = [a.replace("data.batch_size=8", "data.batch_size=16") for a in tiny(shapes, one, *common)]
    run_two = tiny(shapes, two, *common)
    torchrun(1, "train_caption.py", *run_one, *hydra_dirs(one))
    torchrun(2, "train_caption.py", *run_two, *hydra_dirs(two))
    a, ea = losses(one)
    b, eb = losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    assert [e["val_loss"] for e in eb] == pytest.approx([e["val_loss"] for e in ea], rel=1e-4)
    assert a[8] < a[1]  # it trained
    ma = load_caption_model(one / "checkpoints" / "step-0000008")
    mb = load_caption_model(two / "checkpoints" / "step-0000008")
    for (k, x), y in zip(ma.decoder.state_dict().items(), mb.decoder.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=k)
    # the 2-process checkpoint resumes in one process with the same global batch (1 x 16 = 2 x 8): it continues
    # the data order exactly, and says so
    proc = torchrun(1, "train_caption.py", *run_one, "trainer.max_steps=10", "trainer.resume=true",
                    f"trainer.out_dir={two}", *hydra_dirs(two))
    assert "(2 process(es) x batch 8) with 1 x 16: the same global batch, so the data order continues exactly" \
        in proc.stderr
    c, _ = losses(two)
    assert sorted(c) == list(range(1, 11)) and all(c[s] == b[s] for s in range(1, 9))


# ---- captioning -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


FAST = ["sampling.max_new_tokens=6", "num_workers=0", "device=cpu", "batch_size=3"]


def single(checkpoint, *args) -> None:
    assert caption.main([f"checkpoint={checkpoint}", *FAST, *map(str, args)]) in (0, 1)


def rows_of(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_two_processes_caption_every_image_once_and_merge(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    write_images(folder / "a", 7)
    write_images(folder / "b", 4)
    good, bad = write_bad_folder(folder / "wild")
    reference = tmp_path / "one.jsonl"
    single(checkpoint, folder, f"out={reference}")
    expected = {r["path"]: r for r in rows_of(reference)}

    out = tmp_path / "two.jsonl"
    proc = torchrun(2, "caption.py", folder, f"out={out}", f"checkpoint={checkpoint}", *FAST)
    rows = rows_of(out)
    assert [r["path"] for r in rows] == list(expected)  # one row per input, in input order
    for r in rows:
        want = expected[r["path"]]
        assert (r["caption"], r["error"]) == (want["caption"], want["error"])
        assert r["score"] == pytest.approx(want["score"], rel=1e-5, abs=1e-5) if want["score"] is not None else True
    assert not list(tmp_path.glob("two.jsonl.part-*"))
    n_good = sum(r["error"] is None for r in rows)
    assert n_good == 11 + len(good)
    assert f"captioned {n_good} images, {len(bad)} failed with 2 processes" in proc.stderr
    for name in bad:  # each bad file is reported once, by the process that had it
        assert sum(f"/{name}:" in line for line in proc.stderr.splitlines()) == 1, name


def test_a_killed_sharded_run_resumes_without_duplicates(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    images = [str(p) for p in write_images(folder, 9)]
    out = tmp_path / "caps.jsonl"
    single(checkpoint, *images[:2], f"out={out}")  # an earlier run wrote two rows
    # ...then a 3-process run was killed: its parts hold finished rows, one of them a duplicate of out,
    # and one a half-written line
    single(checkpoint, *images[2:5], f"out={tmp_path / 'p.jsonl'}")
    lines = (tmp_path / "p.jsonl").read_text().splitlines(keepends=True)
    first = out.read_text().splitlines(keepends=True)[0]
    writers.part_path(out, 0, 3).write_text(lines[0] + first)
    writers.part_path(out, 2, 3).write_text(lines[1] + lines[2][:20])
    torchrun(2, "caption.py", folder, f"out={out}", f"checkpoint={checkpoint}", *FAST)
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(images)  # all nine, each once
    assert [r["path"] for r in rows[:4]] == [*images[:2], images[2], images[3]]  # kept rows come first
    assert not list(tmp_path.glob("caps.jsonl.part-*"))


def test_sharded_whole_file_format(checkpoint, tmp_path):
    images = [str(p) for p in write_images(tmp_path / "photos", 5)]
    single(checkpoint, *images, f"out={tmp_path / 'one.csv'}")
    torchrun(2, "caption.py", *images, f"out={tmp_path / 'two.csv'}", f"checkpoint={checkpoint}", *FAST)
    one = (tmp_path / "one.csv").read_text().splitlines()
    two = (tmp_path / "two.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in two] == [line.split(",")[:2] for line in one]
    assert not list(tmp_path.glob("two.csv.part-*"))


def test_sharded_run_needs_an_output_file(checkpoint, tmp_path, monkeypatch, capsys):
    [image] = write_images(tmp_path, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert caption.main([f"checkpoint={checkpoint}", *FAST, str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out=FILE" in err[0]


def test_a_sharded_run_with_a_missing_path_says_so_once(checkpoint, tmp_path):
    proc = torchrun(2, "caption.py", tmp_path / "nothing", f"out={tmp_path / 'x.jsonl'}",
                    f"checkpoint={checkpoint}", *FAST, ok=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("caption.py:")]
    assert ours == [f"caption.py: {tmp_path / 'nothing'} does not exist; expected an image file or a folder"]
    assert "[rank" not in proc.stderr  # no process died with a traceback (torchrun reports the exit itself)
    assert not (tmp_path / "x.jsonl").exists()
