"""Data sources and data_prep commands: same columns everywhere, one-line errors, re-runs that do nothing."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vision_rwkv
from vision_rwkv.config import DataConfig
from vision_rwkv.errors import VisionRWKVError
from vision_rwkv.synthetic.shapes import score_caption
from vision_rwkv.train.data import (
    COLUMNS,
    get_split,
    load_source,
    read_disk,
    read_image_folder,
    read_karpathy,
    read_shapes_objects,
    rows_to_dataset,
)

DATA_PREP = Path(__file__).resolve().parents[1] / "data_prep"


def command(name):
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", DATA_PREP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def one_line_error(match, fn, *args, **kwargs) -> str:
    with pytest.raises(VisionRWKVError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- Karpathy --------------------------------------------------------------------------------------


def sentences(*texts):
    return [{"raw": t, "tokens": t.split()} for t in texts]


@pytest.fixture
def karpathy(tmp_path):
    """A COCO-style split file (filepath + cocoid) over five images, and its image root."""
    root = tmp_path / "coco"
    items = [
        ("train2014", "a.jpg", 0, 101, "train", ["a cat on a mat ", "a cat"]),
        ("val2014", "b.jpg", 1, 102, "restval", ["a dog"]),
        ("val2014", "c.jpg", 2, 103, "val", ["a bird", "a small bird"]),
        ("val2014", "d.jpg", 3, 104, "test", ["a fish"]),
        ("val2014", "e.jpg", 4, 105, "test", ["a cow"]),
    ]
    images = []
    for filepath, filename, imgid, cocoid, split, texts in items:
        tiny_png(root / filepath / filename)
        images.append({"filepath": filepath, "filename": filename, "imgid": imgid, "cocoid": cocoid,
                       "split": split, "sentences": sentences(*texts), "sentids": [0]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, root


def test_read_karpathy_coco(karpathy):
    path, root = karpathy
    rows = read_karpathy(path, root)
    assert [r["image_id"] for r in rows] == [101, 102, 103, 104, 105]  # cocoid wins over imgid
    assert [r["split"] for r in rows] == ["train", "train", "val", "test", "test"]  # restval -> train
    assert rows[0]["captions"] == ["a cat on a mat", "a cat"]
    assert rows[1]["image"] == str((root / "val2014" / "b.jpg").resolve())
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert [r["image_id"] for r in read_karpathy(path, root, splits=["train"])] == [101, 102]


def test_read_karpathy_flickr_without_filepath_or_cocoid(tmp_path):
    tiny_png(tmp_path / "imgs" / "1000.jpg")
    data = {"images": [{"filename": "1000.jpg", "imgid": 7, "split": "test", "sentences": sentences("two men")}],
            "dataset": "flickr30k"}
    (tmp_path / "f.json").write_text(json.dumps(data))
    (row,) = read_karpathy(tmp_path / "f.json", tmp_path / "imgs")
    assert row["image_id"] == 7 and row["image"].endswith("imgs/1000.jpg") and row["split"] == "test"


def test_karpathy_errors(karpathy, tmp_path):
    path, root = karpathy
    one_line_error("does not exist.*Karpathy split JSON", read_karpathy, tmp_path / "missing.json", root)
    (tmp_path / "other.json").write_text(json.dumps({"annotations": []}))
    one_line_error('no "images" list', read_karpathy, tmp_path / "other.json", root)
    (tmp_path / "broken.json").write_text('{"images": [')
    one_line_error("not valid JSON", read_karpathy, tmp_path / "broken.json", root)
    one_line_error("image_root .* is not a folder", read_karpathy, path, tmp_path / "nowhere")
    message = one_line_error("5 of 5 images .* are missing", read_karpathy, path, tmp_path)  # wrong root
    assert "train2014/a.jpg" in message
    data = json.loads(path.read_text())
    del data["images"][2]["sentences"]
    path.write_text(json.dumps(data))
    one_line_error(r"images\[2\] \(c.jpg\) has no \"sentences\"", read_karpathy, path, root)


# ---- image folders ---------------------------------------------------------------------------------


def test_image_folder_jsonl(tmp_path):
    for name in ("x.png", "sub/y.png", "z.png"):
        tiny_png(tmp_path / name)
    lines = [{"file_name": "x.png", "caption": "a red square"},
             {"file_name": "sub/y.png", "captions": ["one", "two"], "split": "val"},
             {"file_name": "x.png", "caption": "a red box"},
             {"file_name": "z.png", "caption": "zed", "image_id": 42}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_image_folder(tmp_path)
    assert [(Path(r["image"]).name, r["image_id"], r["captions"], r["split"]) for r in rows] == [
        ("x.png", 0, ["a red square", "a red box"], "train"),
        ("y.png", 1, ["one", "two"], "val"),
        ("z.png", 42, ["zed"], "train"),
    ]
    assert Path(rows[1]["image"]).is_absolute()


def test_image_folder_csv_groups_rows(tmp_path):
    tiny_png(tmp_path / "x.png")
    tiny_png(tmp_path / "y.png")
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["file_name", "caption", "split"], ["x.png", "a red square, seen from above", "test"],
                     ["y.png", "another", ""], ["x.png", "a square", "test"]])
    rows = read_image_folder(tmp_path)
    assert [(Path(r["image"]).name, r["captions"], r["split"]) for r in rows] == [
        ("x.png", ["a red square, seen from above", "a square"], "test"), ("y.png", ["another"], "train")]


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"file_name": "x.png", "caption": "ok"}', "{not json"], "metadata.jsonl line 2 is not valid JSON"),
        (['{"file_name": "x.png"}'], r"line 1 \(x.png\) has no caption"),
        (['{"caption": "no file"}'], 'line 1 has no "file_name"'),
        (['["x.png", "a list"]'], "line 1 is a JSON list"),
        (['{"file_name": "x.png", "captions": []}'], "line 1 .* has no caption"),
        (['{"file_name": "x.png", "caption": "a", "split": "val"}', "",
          '{"file_name": "x.png", "caption": "b", "split": "test"}'], "line 3: x.png is in split 'test'"),
        (['{"file_name": "missing.png", "caption": "a"}'], "1 of 1 images .* missing, e.g. .*missing.png"),
    ],
)
def test_image_folder_bad_jsonl_names_the_line(tmp_path, lines, match):
    tiny_png(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    one_line_error(match, read_image_folder, tmp_path)


def test_image_folder_bad_csv(tmp_path):
    tiny_png(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png,hello\n")
    one_line_error("no caption column", read_image_folder, tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,caption\nx.png,hello\nx.png,\n")
    one_line_error(r"metadata.csv line 3 \(x.png\) has no caption", read_image_folder, tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,caption\nx.png,hello,extra\n")
    one_line_error("line 2 has more fields than the header", read_image_folder, tmp_path)


def test_image_folder_without_metadata(tmp_path):
    one_line_error("no metadata.jsonl or metadata.csv", read_image_folder, tmp_path)
    one_line_error("is not a folder", read_image_folder, tmp_path / "nope")


# ---- load_source and the data_prep commands --------------------------------------------------------


def test_load_source_karpathy_and_limit(karpathy):
    path, root = karpathy
    dsd = load_source(DataConfig(source="karpathy", path=str(path), image_root=str(root)))
    assert {k: len(v) for k, v in dsd.items()} == {"train": 2, "val": 1, "test": 2}
    assert dsd["val"][0] == {"image": str(root.resolve() / "val2014" / "c.jpg"), "image_id": 103,
                             "captions": ["a bird", "a small bird"], "split": "val"}
    limited = load_source(DataConfig(source="karpathy", path=str(path), image_root=str(root), limit=1))
    assert len(limited["train"]) == 1 and len(limited["test"]) == 2


def test_load_source_errors(tmp_path):
    one_line_error("data.source is 'coco'; expected one of karpathy, folder, shapes, disk", DataConfig, source="coco")
    one_line_error("data.path is empty", load_source, DataConfig(source="folder"))
    one_line_error("make_shapes.py", load_source, DataConfig(source="shapes", path=str(tmp_path / "none")))
    one_line_error("datasets.load_from_disk", load_source, DataConfig(source="disk", path=str(tmp_path)))
    one_line_error("no split 'val'; expected one of test, train", get_split, {"train": [], "test": []}, "val")


def test_make_shapes_load_and_score(tmp_path, capsys):
    out = tmp_path / "shapes"
    make_shapes = command("make_shapes")
    assert make_shapes(["--out", str(out), "--train", "12", "--val", "3", "--test", "2", "--seed", "1"]) == 0
    assert "17 written" in capsys.readouterr().out
    dsd = load_source(DataConfig(source="shapes", path=str(out)))
    assert {k: len(v) for k, v in dsd.items()} == {"train": 12, "val": 3, "test": 2}
    assert dsd["train"].column_names == list(COLUMNS)
    ids = [i for split in dsd.values() for i in split["image_id"]]
    assert len(set(ids)) == len(ids)
    objects = read_shapes_objects(out)
    row = dsd["val"][0]
    assert Image.open(row["image"]).size == (64, 64)
    assert all(score_caption(c, objects[row["image_id"]])["exact"] for c in row["captions"])


def test_make_coco_synthetic_is_read_by_karpathy_to_dataset_and_resumes(tmp_path, capsys):
    """COCO-shaped stand-in data: JPEGs of the asked size, five captions each, the real preparation reads
    it; a re-run writes nothing, a lost image comes back identical, other settings are refused."""
    out = tmp_path / "synth"
    make = command("make_coco_synthetic")
    args = ["--out", str(out), "--train", "4", "--val", "1", "--test", "2", "--width", "160", "--height", "120"]
    assert make(args) == 0
    assert "7 written" in capsys.readouterr().out
    rows = read_karpathy(out / "dataset_coco.json", out / "images")
    assert [r["split"] for r in rows] == ["train"] * 4 + ["val"] + ["test"] * 2
    assert all(len(r["captions"]) == 5 for r in rows)
    assert len({r["image_id"] for r in rows}) == 7
    image = Image.open(rows[0]["image"])
    assert image.format == "JPEG" and image.size == (160, 120)
    assert np.asarray(image).std() > 20  # textured, not a flat background
    assert command("karpathy_to_dataset")(["--json", str(out / "dataset_coco.json"), "--image-root",
                                           str(out / "images"), "--out", str(tmp_path / "ds")]) == 0
    assert "train 4 images, val 1 images, test 2 images" in capsys.readouterr().out

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert make(args) == 0
    assert "0 written, 7 already there" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    lost = Path(rows[2]["image"])
    lost_bytes = lost.read_bytes()
    lost.unlink()
    assert make(args) == 0 and lost.read_bytes() == lost_bytes
    assert make(args[:-1] + ["100"]) == 2
    assert "holds images made with" in capsys.readouterr().err
    assert make(["--out", str(tmp_path / "x"), "--quality", "0"]) == 2
    assert "--quality is 0; expected 1 to 95" in capsys.readouterr().err


def test_make_shapes_rerun_is_a_no_op_and_resumes(tmp_path, capsys):
    out = tmp_path / "shapes"
    make_shapes = command("make_shapes")
    args = ["--out", str(out), "--train", "6", "--val", "2", "--test", "0", "--size", "32"]
    assert make_shapes(args) == 0
    metadata = out / "metadata.jsonl"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    first = metadata.read_text()
    capsys.readouterr()

    assert make_shapes(args) == 0
    assert "0 written, 8 already there" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # An interrupted run: one image and the metadata missing. Only that image is redrawn, identically.
    lost = out / "images" / "train" / "3.png"
    lost_bytes = lost.read_bytes()
    lost.unlink()
    metadata.unlink()
    assert make_shapes(args) == 0
    assert "1 written, 7 already there" in capsys.readouterr().out
    assert lost.read_bytes() == lost_bytes and metadata.read_text() == first

    assert make_shapes(args[:3] + ["9"] + args[4:]) == 0  # a larger set keeps the first six examples
    assert metadata.read_text().splitlines()[:6] == first.splitlines()[:6]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_make_shapes_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "shapes"
    make_shapes = command("make_shapes")
    assert make_shapes(["--out", str(out), "--train", "2", "--val", "0", "--test", "0"]) == 0
    assert make_shapes(["--out", str(out), "--train", "2", "--val", "0", "--test", "0", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "seed" in err
    assert make_shapes(["--out", str(out), "--train", "0", "--val", "0", "--test", "0"]) == 2


def test_karpathy_to_dataset_then_disk(karpathy, tmp_path, capsys):
    path, root = karpathy
    out = tmp_path / "coco_ds"
    to_dataset = command("karpathy_to_dataset")
    args = ["--json", str(path), "--image-root", str(root), "--out", str(out)]
    assert to_dataset(args) == 0
    stamp = (out / "dataset_dict.json").stat().st_mtime_ns
    capsys.readouterr()
    assert to_dataset(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "dataset_dict.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    disk = load_source(DataConfig(source="disk", path=str(out)))
    direct = load_source(DataConfig(source="karpathy", path=str(path), image_root=str(root)))
    assert {k: v.to_list() for k, v in disk.items()} == {k: v.to_list() for k, v in direct.items()}

    assert to_dataset(args + ["--force"]) == 0  # replacing a finished output works too
    assert read_disk(out)["test"]["image_id"] == [104, 105]
    capsys.readouterr()

    assert to_dataset(["--json", str(tmp_path / "nope.json"), "--image-root", str(root), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_folder_to_dataset_and_disk_with_a_split_column(tmp_path, capsys):
    tiny_png(tmp_path / "imgs" / "x.png")
    tiny_png(tmp_path / "imgs" / "y.png")
    (tmp_path / "imgs" / "metadata.jsonl").write_text(
        '{"file_name": "x.png", "caption": "ex"}\n{"file_name": "y.png", "caption": "why", "split": "val"}\n')
    folder_to_dataset = command("folder_to_dataset")
    out = tmp_path / "ds"
    assert folder_to_dataset(["--folder", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert folder_to_dataset(["--folder", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert load_source(DataConfig(source="disk", path=str(out)))["val"]["captions"] == [["why"]]

    # A single Dataset with a split column (saved by hand) is split on the way in.
    flat = rows_to_dataset(read_image_folder(tmp_path / "imgs"))
    from datasets import concatenate_datasets

    concatenate_datasets(list(flat.values())).save_to_disk(str(tmp_path / "flat"))
    again = read_disk(tmp_path / "flat")
    assert sorted(again) == ["train", "val"] and again["train"]["captions"] == [["ex"]]
    assert not [p for p in (tmp_path / "flat").rglob("cache-*")]  # the user's folder is left as it was


def test_train_tokenizer_from_each_kind_of_source(karpathy, tmp_path, capsys):
    from vision_rwkv.lm.tokenizer import HFTokenizer

    shapes = tmp_path / "shapes"
    assert command("make_shapes")(["--out", str(shapes), "--train", "30", "--val", "0", "--test", "0"]) == 0
    train_tokenizer = command("train_tokenizer")
    out = tmp_path / "tok" / "tokenizer.json"
    args = ["--data", str(shapes), "--vocab-size", "300", "--out", str(out)]
    assert train_tokenizer(args) == 0
    tk = HFTokenizer(out)
    assert tk.eos_id == 0 and tk.vocab_size <= 300
    text = "a small red circle to the left of a large blue square"
    assert tk.decode(tk.encode(text)) == text
    assert len(tk.encode(text)) < len(text) // 2  # the caption words were learned as tokens
    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    assert train_tokenizer(args) == 0
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp
    assert train_tokenizer(args[:3] + ["280"] + args[4:]) == 0  # other settings retrain
    assert out.stat().st_mtime_ns != stamp

    path, _ = karpathy  # no --image-root needed: only captions are read
    assert train_tokenizer(["--data", str(path), "--vocab-size", "270", "--min-frequency", "1",
                            "--out", str(tmp_path / "k.json")]) == 0
    assert "3 train captions" in capsys.readouterr().out  # train + restval
    assert train_tokenizer(["--data", str(path), "--split", "nope", "--out", str(tmp_path / "k2.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no captions in split 'nope'" in err


def test_make_shapes_compositional_split_holds_compositions_out_of_training(tmp_path, capsys):
    from vision_rwkv.cli.prep.shapes_accuracy import accuracy
    from vision_rwkv.synthetic.shapes import COMPOSITIONAL

    out = tmp_path / "comp"
    make_shapes = command("make_shapes")
    args = ["--out", str(out), "--train", "60", "--val", "5", "--test", "40", "--seed", "2", "--split", "compositional"]
    assert make_shapes(args) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert not any(COMPOSITIONAL.shown(r["objects"]) for r in rows if r["split"] != "test")
    test = [r for r in rows if r["split"] == "test"]
    assert all(r["heldout"] == COMPOSITIONAL.shown(r["objects"]) for r in test)
    assert 0 < sum(bool(r["heldout"]) for r in test) < len(test)
    assert make_shapes(args[:-1] + ["standard"]) == 2  # one folder, one kind of split
    assert "holds images made with" in capsys.readouterr().err

    result = accuracy(Path(vision_rwkv.__file__).parent / "assets" / "demo", out, limit=40, with_cider=False)
    assert result["images_seen"] + result["images_heldout"] == 40
    assert 0.0 <= result["exact_heldout"] <= 1.0 and result["exact_seen"] > 0.5
