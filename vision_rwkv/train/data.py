"""Caption data sources, all read into Hugging Face `datasets` with the same four columns.

    image     absolute path of the image file (str); pixels are decoded later, by vision_rwkv.caption.images
    image_id  int, unique within a source (COCO ids for COCO)
    captions  the reference captions (list[str], at least one)
    split     "train", "val", "test", or whatever a folder's metadata names

Sources (DataConfig.source):
    karpathy  the Karpathy split JSON of COCO or Flickr30k, plus the folder holding its images
    folder    an image folder with metadata.jsonl or metadata.csv (the shapes set is one of these)
    shapes    a folder written by data_prep/make_shapes.py
    disk      a folder written by datasets' save_to_disk (data_prep/karpathy_to_dataset.py, folder_to_dataset.py)

Every image path is checked to exist when a source is read, so a wrong image_root fails at once,
not an hour into training.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets

from ..config import DataConfig
from ..errors import VisionRWKVError

COLUMNS = ("image", "image_id", "captions", "split")
FEATURES = datasets.Features({
    "image": datasets.Value("string"),
    "image_id": datasets.Value("int64"),
    "captions": datasets.Sequence(datasets.Value("string")),
    "split": datasets.Value("string"),
})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

_PATH_HELP = {
    "karpathy": "the Karpathy split JSON (dataset_coco.json or dataset_flickr30k.json)",
    "folder": "an image folder with metadata.jsonl or metadata.csv",
    "shapes": "a folder written by data_prep/make_shapes.py",
    "disk": "a folder written by data_prep/karpathy_to_dataset.py or folder_to_dataset.py",
}


def load_source(cfg: DataConfig) -> datasets.DatasetDict:
    """The source named by cfg, as a DatasetDict keyed by split name.

    cfg.limit (smoke runs) keeps only the first `limit` rows of cfg.train_split.
    """
    if not cfg.path:
        raise VisionRWKVError(f"data.path is empty; expected {_PATH_HELP[cfg.source]}")
    if cfg.source == "karpathy":
        dsd = rows_to_dataset(read_karpathy(cfg.path, cfg.image_root))
    elif cfg.source == "disk":
        dsd = read_disk(cfg.path)
    else:
        if cfg.source == "shapes" and not (Path(cfg.path) / METADATA_FILES[0]).is_file():
            raise VisionRWKVError(f"{cfg.path} has no {METADATA_FILES[0]} (missing, or an unfinished run); make it "
                                  f"with: python data_prep/make_shapes.py --out {cfg.path}")
        dsd = rows_to_dataset(read_image_folder(cfg.path))
    if cfg.limit is not None and cfg.train_split in dsd:
        train = dsd[cfg.train_split]
        dsd[cfg.train_split] = train.select(range(min(cfg.limit, len(train))))
    return dsd


def get_split(dsd: datasets.DatasetDict, name: str) -> datasets.Dataset:
    """One split, or a one-line error listing those that exist."""
    if name not in dsd:
        raise VisionRWKVError(f"the data has no split {name!r}; expected one of {', '.join(sorted(dsd)) or '(none)'}")
    return dsd[name]


def rows_to_dataset(rows: list[dict]) -> datasets.DatasetDict:
    """Rows with the four COLUMNS -> a DatasetDict keyed by their split, in first-seen order of splits."""
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append({c: row[c] for c in COLUMNS})
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(part, features=FEATURES) for split, part in by_split.items()}
    )


# ---- Karpathy splits -------------------------------------------------------------------------------


def read_karpathy(json_path, image_root, splits: Iterable[str] | None = None, check_images: bool = True) -> list[dict]:
    """Rows from a Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json).

    image = image_root / filepath (COCO: train2014 or val2014; absent for Flickr30k) / filename.
    image_id = cocoid when present, else imgid.
    "restval" is read as "train": the standard Karpathy practice (COCO: 82,783 train + 30,504 restval =
    113,287 training images, 5,000 val, 5,000 test). splits keeps only the named splits (after that mapping).
    check_images=False skips the image folder checks, for readers that only want the captions.
    """
    json_path, image_root = Path(json_path), Path(image_root) if image_root else None
    images = _read_karpathy_images(json_path)
    if not check_images:
        image_root = image_root or Path(".")
    elif image_root is None or not image_root.is_dir():
        raise VisionRWKVError(f"data.image_root {str(image_root or '')!r} is not a folder; expected the folder holding "
                              f"the images of {json_path.name} (for COCO, the one with train2014/ and val2014/)")
    wanted = set(splits) if splits is not None else None
    rows = []
    for i, item in enumerate(images):
        row = _karpathy_row(item, i, json_path, image_root)
        if wanted is None or row["split"] in wanted:
            rows.append(row)
    if check_images:
        check_images_exist(rows, f"{json_path} with image_root {image_root}")
    return rows


def _read_karpathy_images(json_path: Path) -> list:
    data = _read_json(json_path, "the Karpathy split JSON (dataset_coco.json or dataset_flickr30k.json)")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise VisionRWKVError(f"{json_path} has no \"images\" list; expected the Karpathy split JSON "
                              "(dataset_coco.json or dataset_flickr30k.json)")
    return images


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise VisionRWKVError(f"{path} does not exist or is not a file; expected {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise VisionRWKVError(f"cannot read {path} ({e}); expected {what}") from None
    except json.JSONDecodeError as e:
        raise VisionRWKVError(f"{path} is not valid JSON ({e}); expected {what}") from None


def _karpathy_row(item, index: int, json_path: Path, image_root: Path) -> dict:
    where = f"{json_path} images[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
        raise VisionRWKVError(f"{where} has no \"filename\"; expected an object with filename, imgid, split, "
                              "sentences")
    image_id = item.get("cocoid", item.get("imgid"))
    if not isinstance(image_id, int):
        raise VisionRWKVError(f"{where} ({item['filename']}) has no integer \"cocoid\" or \"imgid\"")
    sentences = item.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise VisionRWKVError(f"{where} ({item['filename']}) has no \"sentences\"; expected a list of {{\"raw\": ...}}")
    captions = [_sentence_text(s, where) for s in sentences]
    split = item.get("split")
    if not isinstance(split, str):
        raise VisionRWKVError(f"{where} ({item['filename']}) has no \"split\"; expected train, val, test or restval")
    path = image_root / item.get("filepath", "") / item["filename"]
    return {"image": os.path.abspath(path), "image_id": image_id, "captions": captions,
            "split": "train" if split == "restval" else split}


def _sentence_text(sentence, where: str) -> str:
    text = sentence.get("raw") if isinstance(sentence, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise VisionRWKVError(f"{where} has a sentence without \"raw\" text")
    return text.strip()


# ---- image folders ---------------------------------------------------------------------------------


def read_image_folder(folder, check_images: bool = True) -> list[dict]:
    """Rows from <folder>/metadata.jsonl (preferred) or <folder>/metadata.csv.

    jsonl: one object per line, {"file_name": ..., "caption": "..."} or {"file_name": ..., "captions": [...]},
    with optional "split" (default "train") and "image_id" (int; default: order of first appearance).
    csv: columns file_name, caption, optional split and image_id; several rows for one file add captions.
    file_name is relative to the folder. Lines for the same file are merged. check_images=False skips the
    check that every listed image exists, for readers that only want the captions.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VisionRWKVError(f"{folder} is not a folder; expected an image folder with "
                              f"{' or '.join(METADATA_FILES)}")
    jsonl, csv_path = folder / METADATA_FILES[0], folder / METADATA_FILES[1]
    if jsonl.is_file():
        records = _jsonl_records(jsonl)
    elif csv_path.is_file():
        records = _csv_records(csv_path)
    else:
        raise VisionRWKVError(f"{folder} has no {' or '.join(METADATA_FILES)}; expected one line per image "
                              "with file_name and caption")
    rows = _merge_records(records, folder)
    if not rows:
        raise VisionRWKVError(f"{jsonl if jsonl.is_file() else csv_path} lists no images")
    if check_images:
        check_images_exist(rows, str(folder))
    return rows


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line; where is "<path> line <n>"."""
    for number, line in _numbered_lines(path):
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise VisionRWKVError(f"{where} is not valid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(obj, dict):
            raise VisionRWKVError(f"{where} is a JSON {type(obj).__name__}; expected an object with file_name "
                                  "and caption")
        captions = obj.get("captions", obj.get("caption"))
        if isinstance(captions, str):
            captions = [captions]
        yield where, dict(obj, captions=captions)


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
    except (OSError, UnicodeDecodeError) as e:
        raise VisionRWKVError(f"cannot read {path} ({e}); expected UTF-8 text") from None


def _csv_records(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("file_name", "caption") if c not in (reader.fieldnames or [])]
            if missing:
                raise VisionRWKVError(f"{path} has no {' or '.join(missing)} column; expected a header row "
                                      "file_name,caption[,split]")
            for record in reader:
                where = f"{path} line {reader.line_num}"
                if None in record:
                    raise VisionRWKVError(f"{where} has more fields than the header; quote captions holding commas")
                if record.get("image_id") not in (None, ""):
                    record["image_id"] = _int_or_error(record["image_id"], where)
                else:
                    record.pop("image_id", None)
                if not record.get("split"):
                    record.pop("split", None)
                yield where, dict(record, captions=[record["caption"]] if record["caption"] is not None else None)
    except (OSError, UnicodeDecodeError) as e:
        raise VisionRWKVError(f"cannot read {path} ({e}); expected UTF-8 CSV text") from None
    except csv.Error as e:
        raise VisionRWKVError(f"{path} is not valid CSV ({e})") from None


def _int_or_error(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise VisionRWKVError(f"{where} has image_id {text!r}; expected an integer") from None


def _merge_records(records: Iterable[tuple[str, dict]], folder: Path) -> list[dict]:
    rows: dict[str, dict] = {}
    for where, record in records:
        name, captions, split, image_id = _checked_fields(record, where)
        row = rows.get(name)
        if row is None:
            path = os.path.abspath(folder / name)
            rows[name] = {"image": path, "image_id": len(rows) if image_id is None else image_id,
                          "captions": list(captions), "split": split}
        elif row["split"] != split:
            raise VisionRWKVError(f"{where}: {name} is in split {split!r} here but {row['split']!r} on an "
                                  "earlier line; expected one split per image")
        else:
            row["captions"].extend(captions)
    _check_unique_ids(rows.values(), folder)
    return list(rows.values())


def _checked_fields(record: dict, where: str) -> tuple[str, list[str], str, int | None]:
    name = record.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise VisionRWKVError(f"{where} has no \"file_name\"; expected the image path relative to the folder")
    captions = record.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise VisionRWKVError(f"{where} ({name}) has no caption; expected \"caption\": a non-empty string, or "
                              "\"captions\": a list of them")
    split = record.get("split", "train")
    if not isinstance(split, str) or not split:
        raise VisionRWKVError(f"{where} ({name}) has split {split!r}; expected a name such as train, val or test")
    image_id = record.get("image_id")
    if image_id is not None and (not isinstance(image_id, int) or isinstance(image_id, bool)):
        raise VisionRWKVError(f"{where} ({name}) has image_id {image_id!r}; expected an integer")
    return name.strip(), [c.strip() for c in captions], split, image_id


def _check_unique_ids(rows: Iterable[dict], folder: Path) -> None:
    seen: dict[int, str] = {}
    for row in rows:
        other = seen.setdefault(row["image_id"], row["image"])
        if other != row["image"]:
            raise VisionRWKVError(f"{folder}: image_id {row['image_id']} is given to both {other} and "
                                  f"{row['image']}; expected unique ids")


# ---- checks and saved datasets ---------------------------------------------------------------------


def check_images_exist(rows: list[dict], where: str) -> None:
    """One stat per image, so a wrong image root fails now with a count and an example."""
    missing = [row["image"] for row in rows if not os.path.exists(row["image"])]
    if missing:
        raise VisionRWKVError(f"{len(missing)} of {len(rows)} images listed by {where} are missing, "
                              f"e.g. {missing[0]}; expected them to exist")


def read_disk(path) -> datasets.DatasetDict:
    """A DatasetDict (or a Dataset with a split column) written by save_to_disk, checked for COLUMNS."""
    path = Path(path)
    if not path.is_dir():
        raise VisionRWKVError(f"{path} is not a folder; expected {_PATH_HELP['disk']}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise VisionRWKVError(f"cannot load {path} with datasets.load_from_disk ({first}); expected "
                              f"{_PATH_HELP['disk']}") from None
    if isinstance(loaded, datasets.Dataset):
        _check_columns(loaded, path)
        # select, not filter: filter would write cache files into the user's dataset folder.
        splits = loaded["split"]
        loaded = datasets.DatasetDict(
            {s: loaded.select([i for i, x in enumerate(splits) if x == s]) for s in sorted(set(splits))}
        )
    for split in loaded.values():
        _check_columns(split, path)
    return loaded


def _check_columns(ds: datasets.Dataset, path: Path) -> None:
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise VisionRWKVError(f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")


def read_shapes_objects(folder) -> dict[int, list[dict]]:
    """image_id -> objects, from a make_shapes.py folder: what vision_rwkv.synthetic.shapes.score_caption needs."""
    path = Path(folder) / METADATA_FILES[0]
    if not path.is_file():
        raise VisionRWKVError(f"{path} does not exist; expected a folder written by data_prep/make_shapes.py")
    out = {}
    for number, line in _numbered_lines(path):
        obj = json.loads(line)
        if "objects" not in obj:
            raise VisionRWKVError(f"{path} line {number} has no \"objects\"; expected a folder written by "
                                  "data_prep/make_shapes.py")
        out[obj["image_id"]] = obj["objects"]
    if not out:
        raise VisionRWKVError(f"{path} is empty; expected a folder written by data_prep/make_shapes.py")
    return out
