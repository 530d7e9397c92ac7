"""eval_coco.py driven in-process through main(argv), as a user would run it."""

import importlib.util
import json
import os
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from vision_rwkv.train import metrics

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "coco_tiny"
KARPATHY = FIXTURE / "dataset_coco.json"
RESULTS = FIXTURE / "results_test.json"
LABELS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@pytest.fixture(scope="module")
def eval_coco():
    spec = importlib.util.spec_from_file_location("eval_coco", ROOT / "eval_coco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_runs(eval_coco, capsys):
    with pytest.raises(SystemExit) as info:
        eval_coco.main(["--help"])
    assert info.value.code == 0
    assert "--results" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
def test_score_existing_results(eval_coco, tmp_path, capsys):
    out = tmp_path / "nested" / "metrics.json"
    rc = eval_coco.main(["--karpathy", str(KARPATHY), "--split", "test", "--results", str(RESULTS),
                         "--metrics-out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    record = json.loads(out.read_text())
    assert record["images_scored"] == record["images_in_split"] == 4
    assert record["failed_images"] == 0 and record["tokenize"] == "ptb" and record["split"] == "test"
    scores = record["metrics"]
    assert list(scores)[:7] == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    lines = {line.split()[0]: line for line in captured.out.splitlines() if line.strip()}
    for label, name in zip(LABELS, scores):
        assert 0 < scores[name] < 10
        assert lines[label] == f"{label:<8} {scores[name]:.4f}"
    if metrics.spice_missing_jars():
        assert lines["SPICE"].startswith("SPICE    skipped: SPICE jars not found (")
        assert record["skipped"]["SPICE"].startswith("SPICE jars not found (")
        assert "SPICE" not in scores
    assert "scored 4 of 4 images of split 'test'" in captured.out


def bad_results(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "results.json"
    path.write_text(content)
    return path


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--results", str(t / "missing.json")], "missing.json does not exist"),
    (lambda t: ["--results", str(bad_results(t, '[{"image_id": 999, "caption": "a cat"}]'))],
     "1 image_id(s) not in split 'test'"),
    (lambda t: ["--results", str(bad_results(t, '{"image_id": 391895, "caption": "a cat"}'))],
     "holds a JSON dict; expected a JSON list"),
    (lambda t: ["--results", str(bad_results(t, '[{"image_id": 391895, "caption": "a cat"'))], "is not valid JSON"),
    (lambda t: ["--results", str(bad_results(t, '[{"image_id": "391895", "caption": "a cat"}]'))],
     'entry 0 is {"image_id": "391895", "caption": "a cat"}; expected'),
    (lambda t: ["--results", str(bad_results(t, '[{"image_id": 391895, "caption": 3}]'))], "entry 0 is"),
    (lambda t: ["--results", str(bad_results(t, '[{"image_id": 391895, "caption": "a"}, '
                                                '{"image_id": 391895, "caption": "b"}]'))],
     "more than one caption for image_id 391895"),
    (lambda t: ["--results", str(RESULTS), "--split", "testing"],
     "has no images in split 'testing'; expected one of test, train, val"),
    (lambda t: ["--results", str(RESULTS), "--karpathy", str(t / "nope.json")], "nope.json does not exist"),
    (lambda t: ["--checkpoint", str(t)], "--image-root is required"),
    (lambda t: ["--image-root", str(t), "--checkpoint", str(t)], "of 4 images listed by"),  # images missing
    (lambda t: ["--image-root", str(t), "--batch-size", "0"], "--batch-size is 0; expected a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(eval_coco, tmp_path, capsys, make_args, message):
    argv = ["--karpathy", str(KARPATHY), "--split", "test", "--metrics-out", str(tmp_path / "m.json")]
    rc = eval_coco.main(argv + make_args(tmp_path))
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert message in err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "m.json").exists()


# ---- captioning mode with a fake captioner --------------------------------------------------------


@dataclass
class FakeResult:
    path: str
    caption: Optional[str]
    score: Optional[float]
    error: Optional[str]


def fixture_images(split: str) -> list[dict]:
    return [im for im in json.loads(KARPATHY.read_text())["images"] if im["split"] == split]


class FakeCaptioner:
    """Captions each image with the fixture's candidate for it; the file names in `fail` cannot be read."""

    calls: list = []
    fail: set = set()

    @classmethod
    def load(cls, checkpoint, device="auto", dtype="auto"):
        cls.calls.append(("load", checkpoint, device))
        return cls()

    interrupt_after: Optional[int] = None  # batches; then KeyboardInterrupt, as a Ctrl-C would

    def caption_batches(self, paths, sampling, batch_size=32, num_workers=0, progress=True):
        self.calls.append(("caption_batches", list(paths), sampling, batch_size, num_workers))
        by_name = {im["filename"]: im["cocoid"] for im in fixture_images("test")}
        candidates = {r["image_id"]: r["caption"] for r in json.loads(RESULTS.read_text())}
        for start in range(0, len(paths), batch_size):
            if self.interrupt_after is not None and start // batch_size == self.interrupt_after:
                raise KeyboardInterrupt
            batch = []
            for path in paths[start:start + batch_size]:
                name = Path(path).name
                if name in self.fail:
                    batch.append(FakeResult(path, None, None, "cannot identify image file"))
                else:
                    batch.append(FakeResult(path, candidates[by_name[name]], -1.5, None))
            yield batch


@pytest.fixture
def fake_captioner(monkeypatch, tmp_path):
    """The fake in place of vision_rwkv.caption.captioner.Captioner, and an image folder holding the test split."""
    try:
        import vision_rwkv.caption.captioner as captioner_module
    except ModuleNotFoundError as e:
        if e.name != "vision_rwkv.caption.captioner":
            raise
        captioner_module = types.ModuleType("vision_rwkv.caption.captioner")  # not written yet: stand in for it
        monkeypatch.setitem(sys.modules, "vision_rwkv.caption.captioner", captioner_module)
    monkeypatch.setattr(captioner_module, "Captioner", FakeCaptioner, raising=False)
    monkeypatch.setattr(FakeCaptioner, "calls", [])
    monkeypatch.setattr(FakeCaptioner, "fail", set())
    monkeypatch.setattr(FakeCaptioner, "interrupt_after", None)
    # These tests are about the captioning plumbing: without Java, METEOR is skipped at once (saves ~6 s).
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    root = tmp_path / "coco"
    for im in fixture_images("test"):
        (root / im["filepath"]).mkdir(parents=True, exist_ok=True)
        (root / im["filepath"] / im["filename"]).write_bytes(b"")
    return root


def test_caption_split_writes_results_and_counts_failures(eval_coco, fake_captioner, tmp_path, capsys):
    images = fixture_images("test")
    failing = images[1]
    FakeCaptioner.fail = {failing["filename"]}
    out = tmp_path / "out" / "res.json"
    rc = eval_coco.main(["--karpathy", str(KARPATHY), "--image-root", str(fake_captioner), "--split", "test",
                         "--checkpoint", "runs/x/ckpt", "--out", str(out), "--beam", "3", "--batch-size", "2",
                         "--num-workers", "0", "--device", "cpu", "--tokenize", "simple"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err

    results = json.loads(out.read_text())
    expected = [im["cocoid"] for im in images if im is not failing]
    assert [r["image_id"] for r in results] == expected
    candidates = {r["image_id"]: r["caption"] for r in json.loads(RESULTS.read_text())}
    assert all(r["caption"] == candidates[r["image_id"]] and set(r) == {"image_id", "caption"} for r in results)

    load, call = FakeCaptioner.calls
    assert load == ("load", "runs/x/ckpt", "cpu")
    _, paths, sampling, batch_size, num_workers = call
    assert [Path(p).name for p in paths] == [im["filename"] for im in images]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths)
    assert (sampling.strategy, sampling.num_beams, batch_size, num_workers) == ("beam", 3, 2, 0)

    record = json.loads((tmp_path / "out" / "res.metrics.json").read_text())  # default: beside the results
    assert (record["failed_images"], record["images_scored"], record["images_in_split"]) == (1, 3, 4)
    assert record["checkpoint"] == "runs/x/ckpt"
    assert record["skipped"]["METEOR"].startswith("java not found")
    assert record["metrics"]["CIDEr"] == pytest.approx(
        metrics.cider({im["cocoid"]: [s["raw"] for s in im["sentences"]] for im in images},
                      {r["image_id"]: r["caption"] for r in results}), abs=1e-12)
    assert f"could not caption {fake_captioner / failing['filepath'] / failing['filename']}" in captured.err
    assert "1 of 4 images failed to caption and are not scored" in captured.err
    assert "scored 3 of 4 images" in captured.out and "1 failed to caption" in captured.out
    assert "METEOR   skipped: java not found" in captured.out


def test_limit_and_greedy_default(eval_coco, fake_captioner, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = eval_coco.main(["--karpathy", str(KARPATHY), "--image-root", str(fake_captioner), "--out", str(out),
                         "--limit", "2", "--tokenize", "simple", "--spice", "off"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert [r["image_id"] for r in json.loads(out.read_text())] == [im["cocoid"] for im in fixture_images("test")[:2]]
    (load, checkpoint, _), call = FakeCaptioner.calls
    assert checkpoint is None and "shipped demo model" in captured.err
    assert call[2].strategy == "greedy"
    assert "SPICE    skipped: turned off" in captured.out


def test_every_image_failing_is_an_error(eval_coco, fake_captioner, tmp_path, capsys):
    FakeCaptioner.fail = {im["filename"] for im in fixture_images("test")}
    rc = eval_coco.main(["--karpathy", str(KARPATHY), "--image-root", str(fake_captioner),
                         "--out", str(tmp_path / "res.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[-1].startswith("error: none of the 4 images could be captioned")
    assert not (tmp_path / "res.json").exists()


def test_the_metrics_record_the_tokenizer_actually_used(eval_coco, tmp_path, capsys, monkeypatch):
    def no_java(refs, cands):
        raise metrics._Unavailable("java not found on PATH (METEOR, SPICE and the PTB tokenizer need it)")

    monkeypatch.setattr(metrics, "_ptb_tokenize", no_java)
    out = tmp_path / "m.json"
    rc = eval_coco.main(["--karpathy", str(KARPATHY), "--split", "test", "--results", str(RESULTS),
                         "--metrics-out", str(out), "--spice", "off"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    record = json.loads(out.read_text())
    assert record["tokenize"] == "simple" and record["tokenize_requested"] == "ptb"
    assert "fell back to simple tokenization" in record["skipped"]["PTBTokenizer"]
    assert "(tokenize simple)" in captured.out


# ---- the journal: a killed or interrupted run resumes ---------------------------------------------------------


def _caption_args(root, out, *extra):
    return ["--karpathy", str(KARPATHY), "--image-root", str(root), "--split", "test", "--checkpoint", "runs/x/ckpt",
            "--out", str(out), "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--tokenize", "simple",
            "--spice", "off", *map(str, extra)]


def _journal(out: Path) -> Path:
    return out.with_name(out.name + ".journal.jsonl")


def test_an_interrupted_run_resumes_from_its_journal_and_tries_failed_images_again(eval_coco, fake_captioner,
                                                                                  tmp_path, capsys):
    images = fixture_images("test")
    clean = tmp_path / "clean.json"
    assert eval_coco.main(_caption_args(fake_captioner, clean)) == 0
    capsys.readouterr()

    out = tmp_path / "res.json"
    FakeCaptioner.fail = {images[1]["filename"]}  # fails in the first run's first batch ...
    FakeCaptioner.interrupt_after = 1  # ... which is durable before the Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        eval_coco.main(_caption_args(fake_captioner, out))
    assert not out.exists()
    entries = [json.loads(line) for line in _journal(out).read_text().splitlines()]
    assert [Path(e["path"]).name for e in entries] == [im["filename"] for im in images[:2]]
    assert entries[1]["error"] == "cannot identify image file"

    FakeCaptioner.fail, FakeCaptioner.interrupt_after = set(), None
    FakeCaptioner.calls.clear()
    assert eval_coco.main(_caption_args(fake_captioner, out)) == 0
    err = capsys.readouterr().err
    assert "1 of 4 images are captioned, 3 left" in err
    (_, paths, *_), = [c for c in FakeCaptioner.calls if c[0] == "caption_batches"]
    assert [Path(p).name for p in paths] == [im["filename"] for im in images[1:]]  # the failed one again
    assert json.loads(out.read_text()) == json.loads(clean.read_text())
    assert not _journal(out).exists()


def test_a_journal_of_other_settings_is_one_line_and_left_alone_until_restart(eval_coco, fake_captioner, tmp_path,
                                                                             capsys):
    out = tmp_path / "res.json"
    FakeCaptioner.interrupt_after = 1
    with pytest.raises(KeyboardInterrupt):
        eval_coco.main(_caption_args(fake_captioner, out, "--beam", "3"))
    FakeCaptioner.interrupt_after = None
    before = _journal(out).read_bytes()
    capsys.readouterr()

    assert eval_coco.main(_caption_args(fake_captioner, out)) == 2  # greedy now
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds captions of another run (" in err[0] and "beam 3" in err[0]
    assert "beam 1" in err[0] and "--restart" in err[0]
    assert _journal(out).read_bytes() == before and not out.exists()

    FakeCaptioner.calls.clear()
    assert eval_coco.main(_caption_args(fake_captioner, out, "--restart")) == 0
    (_, paths, *_), = [c for c in FakeCaptioner.calls if c[0] == "caption_batches"]
    assert len(paths) == 4 and len(json.loads(out.read_text())) == 4 and not _journal(out).exists()


def test_a_second_run_on_the_same_out_is_one_line(eval_coco, fake_captioner, tmp_path, capsys):
    from vision_rwkv._fs import AppendLog

    out = tmp_path / "res.json"
    held = AppendLog(_journal(out))
    try:
        assert eval_coco.main(_caption_args(fake_captioner, out)) == 2
    finally:
        held.close()
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {_journal(out)} is being written by another eval_coco.py run on the same --out (it is "
                   "locked); expected one run per output: wait for it, or choose another output"]
    assert FakeCaptioner.calls == [] and not out.exists()


def test_kill_9_between_batches_then_the_same_command_gives_the_uninterrupted_results(tmp_path):
    """A real (tiny) checkpoint and real images, in a subprocess killed right after its first batch is durable."""
    import subprocess

    from test_captioner import make_checkpoint, write_images

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    names = [f"COCO_val2014_{i:012d}.png" for i in range(5)]
    write_images(tmp_path / "coco" / "val2014", 5, names=names)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": name, "cocoid": i, "split": "test",
         "sentences": [{"raw": "a small red square", "tokens": ["a", "small", "red", "square"]}]}
        for i, name in enumerate(names)]}))

    def run(out, fault=None):
        cmd = [sys.executable, str(ROOT / "eval_coco.py"), "--karpathy", str(karpathy), "--image-root",
               str(tmp_path / "coco"), "--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", "2",
               "--num-workers", "0", "--device", "cpu", "--max-new-tokens", "6", "--tokenize", "simple",
               "--spice", "off"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               **({"VISION_RWKV_FAULT": fault} if fault else {})}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    clean = run(tmp_path / "clean.json")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "res.json"
    killed = run(out, fault="eval.batch_written:1")
    assert killed.returncode == -9 and not out.exists()
    assert len(_journal(out).read_text().splitlines()) == 2
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of 5 images are captioned, 3 left" in resumed.stderr
    assert json.loads(out.read_text()) == json.loads((tmp_path / "clean.json").read_text())
    assert not _journal(out).exists()
