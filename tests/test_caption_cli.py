"""caption.py, driven in-process through main(argv) exactly as a user would run it."""

import csv
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
from test_captioner import GREEDY, make_checkpoint, write_bad_folder, write_images

import caption
from vision_rwkv.caption.captioner import Captioner
from vision_rwkv.caption.writers import coco_image_id
from vision_rwkv.config import CaptionJobConfig, OutputFormat

FAST = ["sampling.max_new_tokens=8", "num_workers=0", "device=cpu"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """path -> caption, straight from the library, for comparing every format against."""
    captioner = Captioner.load(str(checkpoint), device="cpu")

    def captions(paths):
        return {r.path: r.caption for r in captioner.caption_paths(paths, GREEDY, batch_size=1)}

    return captions


@pytest.fixture
def cli(checkpoint, capsys):
    def run(*args):
        code = caption.main([f"checkpoint={checkpoint}", *FAST, *map(str, args)])  # args last: they may hold --
        out, err = capsys.readouterr()
        return code, out, err.splitlines()

    return run


def is_summary(line: str, captioned: int, failed: int) -> bool:
    """caption.py's last stderr line: the counts, then the time and rate of the captioning itself."""
    return re.fullmatch(rf"caption\.py: captioned {captioned} images, {failed} failed in \d+\.\d s "
                        r"\(\d+\.\d images/s\)", line) is not None


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---- formats -------------------------------------------------------------------------------------------------


def test_text_one_image_prints_just_the_caption(cli, reference, tmp_path):
    [image] = write_images(tmp_path, 1)
    code, out, err = cli(image)
    assert code == 0
    assert out == reference([image])[str(image)] + "\n"
    assert len(err) == 1 and is_summary(err[0], 1, 0)


def test_text_several_images_prints_path_tab_caption(cli, reference, tmp_path):
    images = write_images(tmp_path / "photos", 3)
    extra = write_images(tmp_path / "more", 1)
    code, out, _ = cli(tmp_path / "photos", extra[0], "batch_size=2")
    assert code == 0
    expected = reference(images + extra)
    ordered = sorted(images + extra, key=str)  # find_images sorts the whole input
    assert out.splitlines() == [f"{p}\t{expected[str(p)]}" for p in ordered]


def test_jsonl_rows(cli, reference, tmp_path):
    images = write_images(tmp_path / "photos", 3)
    out = tmp_path / "out" / "captions.jsonl"  # the folder is created
    code, stdout, _ = cli(tmp_path / "photos", f"out={out}", "batch_size=2")
    assert code == 0 and stdout == ""
    rows = read_jsonl(out)
    expected = reference(images)
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert [r["caption"] for r in rows] == [expected[str(p)] for p in images]
    assert all(r["error"] is None and isinstance(r["score"], float) for r in rows)


def test_text_into_a_file(cli, reference, tmp_path):
    images = write_images(tmp_path / "photos", 2)
    out = tmp_path / "captions.txt"
    code, stdout, _ = cli(f"paths=[{tmp_path / 'photos'}]", f"out={out}")  # paths as a Hydra list work too
    assert code == 0 and stdout == ""
    expected = reference(images)
    assert out.read_text().splitlines() == [f"{p}\t{expected[str(p)]}" for p in images]


def test_jsonl_on_stdout_with_format_jsonl(cli, tmp_path):
    images = write_images(tmp_path, 2)
    code, out, _ = cli(*images, "format=jsonl")
    assert code == 0
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(p) for p in images]


def test_csv(cli, reference, tmp_path):
    images = write_images(tmp_path / "photos", 3)
    (tmp_path / "photos" / "bad.png").write_text("not a png")
    out = tmp_path / "captions.csv"
    code, _, err = cli(tmp_path / "photos", f"out={out}")
    assert code == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "caption", "score", "error"]
    expected = reference(images)
    assert {r["path"]: r["caption"] for r in rows if not r["error"]} == expected
    [bad] = [r for r in rows if r["error"]]
    assert bad["path"].endswith("bad.png") and bad["caption"] == "" and bad["score"] == ""
    assert len(rows) == 4 and all(float(r["score"]) < 0 for r in rows if not r["error"])
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_coco_results_image_ids(cli, reference, tmp_path):
    names = ["000000000042.jpg", "COCO_val2014_000000000007.jpg", "cat.png", "17.png"]
    images = write_images(tmp_path / "val", 4, names=names)
    out = tmp_path / "results.json"
    code, _, _ = cli(tmp_path / "val", f"out={out}")
    assert code == 0
    results = json.loads(out.read_text())
    expected = reference(images)
    # find_images sorts: 000000000042.jpg, 17.png, COCO_val2014_..., cat.png; cat.png gets its position, 3
    by_id = {r["image_id"]: r["caption"] for r in results}
    assert by_id == {42: expected[str(images[0])], 17: expected[str(images[3])], 7: expected[str(images[1])],
                     3: expected[str(images[2])]}
    assert coco_image_id("COCO_train2014_000000581929.jpg", 0) == 581929
    assert coco_image_id("dog_photo.jpg", 5) == 5


def test_txt_sidecars(cli, reference, tmp_path):
    images = write_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"")
    code, out, err = cli(tmp_path / "photos", "format=txt")
    assert code == 0 and out == ""
    expected = reference(images)
    for image in images:
        assert image.with_suffix(".txt").read_text() == expected[str(image)] + "\n"
    assert not (tmp_path / "photos" / "broken.txt").exists()
    assert is_summary(err[-1], 2, 1)


def test_format_from_an_unknown_suffix_is_an_error(cli, tmp_path):
    [image] = write_images(tmp_path, 1)
    code, _, err = cli(image, f"out={tmp_path / 'captions.xml'}")
    assert code == 2 and len(err) == 1 and "format" in err[0]


@pytest.mark.parametrize("dtype,ok", [("fp32", True), ("bf16", True), ("half", False)])
def test_dtype(cli, reference, tmp_path, dtype, ok):
    [image] = write_images(tmp_path, 1)
    code, out, err = cli(image, f"dtype={dtype}")
    if not ok:
        assert code == 2 and out == "" and err == ["caption.py: dtype is 'half'; expected one of auto, bf16, fp32"]
        return
    assert code == 0 and len(out.splitlines()) == 1
    if dtype == "fp32":  # the CPU default: the reference caption (one image: the caption alone)
        assert out.rstrip("\n") == reference([image])[str(image)]


# ---- resume --------------------------------------------------------------------------------------------------


def test_jsonl_resume_skips_done_images_and_drops_a_partial_line(cli, reference, tmp_path):
    images = write_images(tmp_path / "photos", 5)
    out = tmp_path / "captions.jsonl"
    assert cli(tmp_path / "photos", f"out={out}", "batch_size=2")[0] == 0
    full = read_jsonl(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:25])  # two rows, and the third cut mid-write by a kill

    code, _, err = cli(tmp_path / "photos", f"out={out}", "batch_size=2")
    assert code == 0
    rows = read_jsonl(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images)  # one row per image
    assert rows[:2] == full[:2]  # kept as they were
    assert {r["path"]: r["caption"] for r in rows} == reference(images)
    assert any("partial last line" in line for line in err)
    assert f"caption.py: {out} already holds 2 rows: 2 of 5 images are done, 3 left" in err

    code, _, err = cli(tmp_path / "photos", f"out={out}")  # everything done: nothing to caption
    assert code == 0 and read_jsonl(out) == rows
    assert err[-1] == f"caption.py: captioned 0 images, 0 failed (5 already in {out})"


def test_jsonl_resume_refuses_a_file_that_is_not_caption_rows(cli, tmp_path):
    [image] = write_images(tmp_path, 1)
    out = tmp_path / "captions.jsonl"
    out.write_text('{"path": "a.jpg"}\nhello\n')
    code, _, err = cli(image, f"out={out}")
    assert code == 2 and len(err) == 1 and "line 2" in err[0]


# ---- bad input -----------------------------------------------------------------------------------------------


def test_a_folder_of_bad_files(cli, tmp_path):
    folder = tmp_path / "wild"
    good, bad = write_bad_folder(folder)
    out = tmp_path / "captions.jsonl"
    code, _, err = cli(folder, f"out={out}", "batch_size=4", "num_workers=2")
    assert code == 0
    rows = read_jsonl(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(good + bad)  # exactly one row per input
    for r in rows:
        name = Path(r["path"]).name
        assert (r["error"] is None) == (name in good), (name, r["error"])
        assert (r["caption"] is None) == (name in bad)
    for name in bad:
        mentions = [line for line in err if f"/{name}:" in line]
        assert len(mentions) == 1, (name, err)
    assert is_summary(err[-1], len(good), len(bad))
    assert len(err) == len(bad) + 1
    assert not any("Traceback" in line for line in err)


def test_every_image_failing_exits_1(cli, tmp_path):
    (tmp_path / "a.jpg").write_text("not an image")
    code, out, err = cli(tmp_path / "a.jpg")
    assert code == 1
    assert out == "[error] not an image (or a format Pillow cannot read)\n"
    assert is_summary(err[-1], 0, 1)


@pytest.mark.parametrize("what", ["missing", "empty folder"])
def test_nothing_to_caption_is_a_one_line_error(cli, tmp_path, what):
    path = tmp_path / "nothing"
    if what == "empty folder":
        path.mkdir()
    code, out, err = cli(path)
    assert code == 2 and out == ""
    assert len(err) == 1 and str(path) in err[0]


def test_no_paths_at_all(cli):
    code, _, err = cli()
    assert code == 2 and len(err) == 1 and "no images given" in err[0]


def test_paths_with_spaces_commas_brackets_and_equals(cli, reference, tmp_path):
    folder = tmp_path / "my photos, [2024]"
    images = write_images(folder, 3, names=["a b.png", "x,y=[1].png", "it's {ok}.png"])
    dashed = write_images(tmp_path / "other", 1, names=["-dash.png"])
    code, out, _ = cli(images[0], images[1], "format=jsonl", "--", dashed[0], images[2])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["path"]: r["caption"] for r in rows} == reference(sorted(images + dashed, key=str))


# ---- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("batch_sise=2", ["batch_sise"]),
    ("sampling.num_beam=3", ["num_beam"]),
    ("batch_size=many", ["batch_size", "many"]),
    ("format=xml", ["xml", "jsonl"]),
    ("sampling=nope", ["sampling/nope"]),
])
def test_a_bad_option_fails_at_compose_time(cli, tmp_path, override, words):
    [image] = write_images(tmp_path, 1)
    code, out, err = cli(image, override)
    assert code == 2 and out == ""
    assert len(err) == 1 and all(w in err[0] for w in words), err


@pytest.mark.parametrize("fields, preset", [
    (["sampling.top_p=0.9", "sampling.temperature=0.7"], "sampling=nucleus"),
    (["sampling.num_beams=5"], "sampling=beam"),
    (["sampling.top_a=0.2"], "sampling=nucleus"),
])
def test_a_sampling_field_the_preset_ignores_is_an_error(cli, tmp_path, fields, preset):
    [image] = write_images(tmp_path, 1)
    code, out, err = cli(image, *fields)
    assert code == 2 and out == "" and len(err) == 1
    assert "has no effect with strategy greedy" in err[0] and preset in err[0]
    code, out, _ = cli(image, preset, *fields)  # with the preset that uses it, it runs
    assert code == 0 and out.strip()


def test_a_dash_option_is_refused(cli, tmp_path):
    code, _, err = cli("--out", "x.jsonl")
    assert code == 2 and len(err) == 1 and "--out" in err[0]


def test_help_describes_every_option_and_format(capsys):
    assert caption.main(["--help"]) == 0
    text = capsys.readouterr().out
    for f in fields(CaptionJobConfig):
        assert f"{f.name}=" in text, f.name
    for fmt in OutputFormat:
        assert f"  {fmt.value}" in text or f"{fmt.value} " in text, fmt
    assert caption.main(["photo.jpg", "-h"]) == 0


def test_cfg_prints_the_composed_config(capsys):
    assert caption.main(["--cfg", "sampling=beam", "batch_size=3"]) == 0
    text = capsys.readouterr().out
    assert "batch_size: 3" in text and "strategy: beam" in text


def test_library_warnings_show_as_one_line(capsys):
    import warnings

    from vision_rwkv.errors import short_warnings

    with warnings.catch_warnings():  # restores the usual display afterwards
        warnings.simplefilter("always")
        short_warnings("caption.py")
        warnings.warn("vision_rwkv: the kernel failed to build: nvcc: boom", UserWarning, stacklevel=1)
        warnings.warn("another library's warning", UserWarning, stacklevel=1)
    err = capsys.readouterr().err.splitlines()
    # the other warning took Python's own path (under pytest: its recorder), not ours
    assert err == ["caption.py: warning: the kernel failed to build: nvcc: boom"]
