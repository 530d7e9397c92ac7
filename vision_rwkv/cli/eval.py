"""Caption a split of a Karpathy JSON (COCO or Flickr30k) and score it with the COCO caption metrics.

    python eval_coco.py --karpathy dataset_coco.json --image-root /data/coco --split test --checkpoint runs/x/ckpt
    python eval_coco.py --karpathy dataset_coco.json --split test --results coco_test_results.json

The first form captions every image of the split, writes a COCO results file (a JSON list of
{"image_id": int, "caption": str}) and scores it; the second scores an existing results file.
Captions go to a journal beside the results file (<results>.journal.jsonl) one batch at a time, so a killed
run loses at most the batch in flight: the same command resumes after the images already captioned (and
tries again those that failed), then writes the results file whole and removes the journal. A journal made
with another checkpoint or other decoding settings is never mixed in: that is an error, and --restart
discards it.
Metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D, as in pycocoevalcap) and SPICE when its jars are
installed. With --tokenize ptb (the default, the published protocol) captions go through the Stanford
PTB tokenizer, which needs Java like METEOR does; a scorer that cannot run is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .._faults import fault_point
from .._fs import atomic_write, check_writable
from ..config import SamplingConfig
from ..errors import OutputError, VisionRWKVError
from ..train.metrics import coco_scores

METRIC_LABELS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
ENTRY_FORMAT = '{"image_id": int, "caption": str}'
RESULTS_FORMAT = f"a JSON list of {ENTRY_FORMAT} (COCO results format)"
MAX_FAILURES_SHOWN = 10


def main(argv=None, prog: str | None = None) -> int:
    args = _parser(prog).parse_args(argv)
    try:
        return _run(args)
    except VisionRWKVError as e:  # OutputError (a write failed after captioning began) exits 3
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--karpathy", required=True, type=Path, help="dataset_coco.json or dataset_flickr30k.json")
    ap.add_argument("--image-root", type=Path, help="folder of the images (COCO: the one holding val2014/)")
    ap.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ap.add_argument("--checkpoint", help="checkpoint folder to caption with (default: the shipped demo model)")
    ap.add_argument("--results", type=Path, help="score this results file instead of captioning")
    ap.add_argument("--out", type=Path, help="results file to write (default: coco_<split>_results.json)")
    ap.add_argument("--metrics-out", type=Path, help="metrics JSON to write (default: <results>.metrics.json)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=4, help="image decoding workers")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="weights: auto = bf16 (with autocast) on CUDA, fp32 on the CPU")
    ap.add_argument("--limit", type=int, help="caption only the first N images of the split (smoke runs)")
    ap.add_argument("--beam", type=int, default=1, help="beam width; 1 decodes greedily")
    ap.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    ap.add_argument("--tokenize", choices=["ptb", "simple"], default="ptb",
                    help="ptb: Stanford PTB tokenizer (Java, the published protocol); simple: pure Python")
    ap.add_argument("--spice", choices=["auto", "on", "off"], default="auto",
                    help="auto: SPICE when its jars are installed; on: fail without it; off: never")
    ap.add_argument("--restart", action="store_true",
                    help="discard the journal an interrupted run left beside the results file and caption every "
                         "image again (without it, the same command resumes from the journal)")
    return ap


def _run(args) -> int:
    captioning = args.results is None
    if captioning and args.image_root is None:
        raise VisionRWKVError("--image-root is required to caption images; expected the image folder "
                              "(or --results FILE to score captions already made)")
    for flag in ("batch_size", "num_workers", "limit", "beam", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or (value == 0 and flag != "num_workers")):
            raise VisionRWKVError(f"--{flag.replace('_', '-')} is {value}; expected a positive integer")
    results_path = args.results if not captioning else (args.out or Path(f"coco_{args.split}_results.json"))
    metrics_path = args.metrics_out or results_path.with_suffix(".metrics.json")
    for path in ([results_path] if captioning else []) + [metrics_path]:
        check_writable(path, "--out" if path == results_path and captioning else "--metrics-out")

    rows = _split_rows(args.karpathy, args.image_root, args.split, check_images=captioning)
    failed = 0
    if captioning:
        if args.limit is not None:
            rows = rows[: args.limit]
        results, failed = _caption(rows, args, results_path)
        print(f"wrote {results_path}: {len(results)} captions")
    else:
        results = read_results(results_path)

    gts = {row["image_id"]: row["captions"] for row in rows}
    res = {item["image_id"]: [item["caption"]] for item in results}
    unknown = [image_id for image_id in res if image_id not in gts]
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise VisionRWKVError(f"{results_path} has captions for {len(unknown)} image_id(s) not in split {args.split!r} "
                              f"of {args.karpathy}: {shown}; expected ids of that split")
    spice = {"auto": None, "on": True, "off": False}[args.spice]
    scores = coco_scores(gts, res, tokenize=args.tokenize, spice=spice)
    skipped = scores.pop("skipped")
    tokenize = scores.pop("tokenize")  # "simple" when the PTB tokenizer could not run

    print(f"scored {len(res)} of {len(gts)} images of split {args.split!r} (tokenize {tokenize})"
          + (f"; {failed} failed to caption and are not scored" if failed else ""))
    for name, label in METRIC_LABELS.items():
        if name in scores:
            print(f"{label:<8} {scores[name]:.4f}")
    for name, reason in skipped.items():
        label = "BLEU-1..4" if name == "BLEU" else METRIC_LABELS.get(name, name)
        print(f"{label:<8} skipped: {reason}")
    record = {
        "split": args.split,
        "karpathy": str(args.karpathy),
        "checkpoint": args.checkpoint if captioning else None,
        "results": str(results_path),
        "images_in_split": len(gts),
        "images_scored": len(res),
        "failed_images": failed,
        "tokenize": tokenize,
        "tokenize_requested": args.tokenize,
        "metrics": scores,
        "skipped": skipped,
    }
    _write_json(metrics_path, record)
    print(f"wrote {metrics_path}")
    return 0


def _split_rows(karpathy: Path, image_root, split: str, check_images: bool) -> list[dict]:
    from ..train.data import read_karpathy

    rows = read_karpathy(karpathy, image_root, splits=[split], check_images=check_images)
    if not rows:
        present = sorted({row["split"] for row in read_karpathy(karpathy, image_root, check_images=False)})
        raise VisionRWKVError(f"{karpathy} has no images in split {split!r}; expected one of {', '.join(present)}")
    return rows


def _caption(rows: list[dict], args, results_path: Path) -> tuple[list[dict], int]:
    """Caption rows through the journal beside results_path, resuming what it holds; write the COCO results
    (in the rows' order) whole, then remove the journal. Returns the results and the number of images that
    failed (reported on stderr)."""
    from ..caption.writers import RowStore, _key, journal_path

    store = RowStore(journal_path(results_path), holder="another eval_coco.py run on the same --out")
    try:
        captions = _journal_captions(store, rows, args)
        results, failures = [], []
        for row in rows:
            entry = captions[_key(row["image"])]
            if _captioned(entry):
                results.append({"image_id": row["image_id"], "caption": entry["caption"]})
            else:
                failures.append((row["image"], entry.get("error") or "no caption was produced"))
        for path, error in failures[:MAX_FAILURES_SHOWN]:
            print(f"warning: could not caption {path}: {error}", file=sys.stderr)
        if failures:
            more = f" ({len(failures) - MAX_FAILURES_SHOWN} not shown)" if len(failures) > MAX_FAILURES_SHOWN else ""
            print(f"warning: {len(failures)} of {len(rows)} images failed to caption and are not scored{more}",
                  file=sys.stderr)
        if not results:
            raise VisionRWKVError(f"none of the {len(rows)} images could be captioned (first error: "
                                  f"{failures[0][1]}); expected readable images and a working checkpoint")
        try:
            _write_json(results_path, results)
        except OutputError as e:
            raise OutputError(f"{e}; the captions are kept in {store.path}, and the same command writes "
                              f"{results_path} from them") from None
        store.remove()
        return results, len(failures)
    finally:
        store.close()


def _run_identity(args) -> dict:
    """What the captions depend on: a journal made with anything else is not this run's."""
    checkpoint = "the shipped demo model" if args.checkpoint is None else os.path.realpath(args.checkpoint)
    return {"checkpoint": checkpoint, "beam": args.beam, "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype, "device": args.device}


def _journal_captions(store, rows: list[dict], args) -> dict[str, dict]:
    """Every row's journal entry (path key -> the latest row for it), captioning what the journal lacks: images
    not in it, and those whose entry is an error (tried again)."""
    from ..caption.writers import _key, _row

    run = _run_identity(args)
    if args.restart:
        store.clear()
    elif store.torn:
        print(f"dropped a partial last line of {store.path} (an interrupted write)", file=sys.stderr)
    captions: dict[str, dict] = {}
    for entry in store.rows():
        if entry.get("run") != run:
            theirs = entry.get("run") if isinstance(entry.get("run"), dict) else "unknown settings"
            raise VisionRWKVError(f"{store.path} holds captions of another run ({_settings(theirs)}); expected "
                                  f"this run's ({_settings(run)}): pass --restart to discard them, or choose "
                                  "another --out")
        captions[_key(entry["path"])] = entry
    todo = [row["image"] for row in rows if not _captioned(captions.get(_key(row["image"])))]
    if len(todo) < len(rows):
        print(f"resuming from {store.path}: {len(rows) - len(todo)} of {len(rows)} images are captioned, "
              f"{len(todo)} left", file=sys.stderr)
    if not todo:
        return captions
    if args.beam > 1:
        sampling = SamplingConfig(strategy="beam", num_beams=args.beam, max_new_tokens=args.max_new_tokens)
    else:
        sampling = SamplingConfig(strategy="greedy", max_new_tokens=args.max_new_tokens)
    sampling.validate()
    from ..caption.captioner import Captioner

    if args.checkpoint is None:
        print("no --checkpoint given: captioning with the shipped demo model", file=sys.stderr)
    captioner = Captioner.load(args.checkpoint, device=args.device, dtype=args.dtype)
    answered = 0
    for batch in captioner.caption_batches(todo, sampling, batch_size=args.batch_size, num_workers=args.num_workers,
                                           progress=sys.stderr.isatty()):
        entries = [{**_row(result), "run": run} for result in batch]
        store.append(entries)
        fault_point("eval.batch_written")
        for entry in entries:
            captions[_key(entry["path"])] = entry
        answered += len(batch)
    if answered != len(todo):
        raise RuntimeError(f"the captioner answered for {answered} of {len(todo)} images")
    return captions


def _settings(run: dict | str) -> str:
    if not isinstance(run, dict):
        return run
    return ", ".join(f"{k} {v}" for k, v in run.items())


def _captioned(entry: dict | None) -> bool:
    return entry is not None and entry.get("error") is None and isinstance(entry.get("caption"), str)


def read_results(path: Path) -> list[dict]:
    """A COCO results file, checked: a list of {"image_id": int, "caption": str}, one entry per image."""
    if not path.is_file():
        raise VisionRWKVError(f"{path} does not exist or is not a file; expected {RESULTS_FORMAT}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise VisionRWKVError(f"cannot read {path} ({e}); expected {RESULTS_FORMAT}") from None
    except json.JSONDecodeError as e:
        raise VisionRWKVError(f"{path} is not valid JSON ({e}); expected {RESULTS_FORMAT}") from None
    if not isinstance(data, list):
        raise VisionRWKVError(f"{path} holds a JSON {type(data).__name__}; expected {RESULTS_FORMAT}")
    seen = set()
    for i, item in enumerate(data):
        image_id = item.get("image_id") if isinstance(item, dict) else None
        caption = item.get("caption") if isinstance(item, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(caption, str):
            raise VisionRWKVError(f"{path} entry {i} is {_short(item)}; expected {ENTRY_FORMAT}")
        if image_id in seen:
            raise VisionRWKVError(f"{path} has more than one caption for image_id {image_id}; expected one per image")
        seen.add(image_id)
    return data


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_json(path: Path, data) -> None:
    """The whole file or nothing (vision_rwkv._fs): a crash never leaves half a file."""
    atomic_write(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
