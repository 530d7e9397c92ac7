"""Precompute the frozen encoder's features for a training config, so training reads them from disk.

    python data_prep/cache_features.py experiment=coco_vitl14_rwkv7_0.4b init_decoder=/models/x.pth
    python data_prep/cache_features.py --splits train,val --device cuda experiment=shapes_demo

The arguments after the options are the same Hydra overrides train_caption.py takes: the cache lands
where that training run will look for it (data.feature_cache, one folder per encoder and split), so a
later `python train_caption.py <same overrides>` starts training at once. Built with datasets.map,
written under a temporary name and renamed; a split already cached for this encoder and these images
is skipped, so a re-run after an interruption redoes only the unfinished split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ...caption.captioner import resolve_device
from ...caption.encoder import ClipEncoder
from ...errors import VisionRWKVError, one_line
from ...train.data import get_split, load_source
from ...train.features import feature_cache
from ...train.trainer import seed_everything
from ..train import compose, to_caption_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", default=None,
                    help="comma-separated splits to encode (default: the config's training split, the one "
                         "training reads)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes decoding the images (default: the config's data.num_workers; 0: this one)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train_caption.py")
    args = ap.parse_args(argv)
    try:
        cfg = to_caption_config(compose(args.overrides))
        if not cfg.data.feature_cache:
            raise VisionRWKVError("data.feature_cache is not set in this config; expected a folder, e.g. "
                                  "data.feature_cache=data/features")
        if args.batch_size < 1:
            raise VisionRWKVError(f"--batch-size is {args.batch_size}; expected a positive integer")
        workers = cfg.data.num_workers if args.workers is None else args.workers
        if workers < 0:
            raise VisionRWKVError(f"--workers is {workers}; expected 0 (decode in this process) or more")
        device = resolve_device(args.device)
        data = load_source(cfg.data)
        splits = args.splits.split(",") if args.splits else [cfg.data.train_split]
        seed_everything(cfg.trainer.seed)  # as the trainer does: a random tower gets the same weights (and key)
        encoder = ClipEncoder(cfg.encoder).to(device).eval()
        for split in splits:
            rows = get_split(data, split)
            cached = feature_cache(encoder, rows, cfg.data.feature_cache, split, batch_size=args.batch_size,
                                   device=device, num_workers=workers)
            folder = Path(cfg.data.feature_cache) / encoder.feature_key() / split
            print(f"{split}: {len(cached)} images -> {folder}")
    except (VisionRWKVError, HydraException, OmegaConfBaseException) as e:  # one line, as train_caption.py
        print(f"cache_features.py: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
