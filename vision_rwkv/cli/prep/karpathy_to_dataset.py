"""Turn a Karpathy split JSON (COCO or Flickr30k) into a datasets folder (save_to_disk) for data.source=disk.

    python data_prep/karpathy_to_dataset.py --json data/dataset_coco.json --image-root data/coco --out data/coco_ds

Columns: image (absolute path), image_id (cocoid, else imgid), captions, split; "restval" becomes "train"
(see vision_rwkv.train.data.read_karpathy). Every image path is checked to exist first.
The folder is written under a temporary name and renamed. A re-run with the same inputs (unchanged JSON,
same image root) does nothing unless --force.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ...errors import VisionRWKVError
from ...train.data import read_karpathy, rows_to_dataset
from .records import PREP_RECORD, fingerprint, read_prep_record, save_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True, help="dataset_coco.json or dataset_flickr30k.json")
    ap.add_argument("--image-root", type=Path, required=True,
                    help="folder holding the images (COCO: the one with train2014/ and val2014/)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--force", action="store_true", help="rewrite an output that is already up to date")
    args = ap.parse_args(argv)

    try:
        if not args.json.is_file():
            raise VisionRWKVError(f"--json {args.json} does not exist; expected the Karpathy split JSON")
        record = {"command": "karpathy_to_dataset", "json": fingerprint(args.json),
                  "image_root": os.path.abspath(args.image_root)}
        if not args.force and read_prep_record(args.out / PREP_RECORD) == record:
            print(f"{args.out} is up to date (use --force to rewrite)")
            return 0
        dsd = rows_to_dataset(read_karpathy(args.json, args.image_root))
        save_dataset(dsd, args.out, record)
    except VisionRWKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{split} {len(ds)} images" for split, ds in dsd.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
