"""Turn an image folder with metadata.jsonl or metadata.csv into a datasets folder (save_to_disk).

    python data_prep/folder_to_dataset.py --folder data/my_images --out data/my_images_ds

The metadata format is described in vision_rwkv.train.data.read_image_folder; every listed image is checked to
exist first. The folder is written under a temporary name and renamed. A re-run with unchanged metadata
does nothing unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...errors import VisionRWKVError
from ...train.data import read_image_folder, rows_to_dataset
from .records import PREP_RECORD, fingerprint, metadata_file, read_prep_record, save_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, required=True, help="image folder with metadata.jsonl or metadata.csv")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--force", action="store_true", help="rewrite an output that is already up to date")
    args = ap.parse_args(argv)

    try:
        if not args.folder.is_dir():
            raise VisionRWKVError(f"--folder {args.folder} is not a folder; expected images with metadata.jsonl "
                                  "or metadata.csv")
        record = {"command": "folder_to_dataset", "metadata": fingerprint(metadata_file(args.folder))}
        if not args.force and read_prep_record(args.out / PREP_RECORD) == record:
            print(f"{args.out} is up to date (use --force to rewrite)")
            return 0
        dsd = rows_to_dataset(read_image_folder(args.folder))
        save_dataset(dsd, args.out, record)
    except VisionRWKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{split} {len(ds)} images" for split, ds in dsd.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
