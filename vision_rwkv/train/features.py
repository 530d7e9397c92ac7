"""From data rows to training batches: image loading or cached encoder features, caption tokens.

Rows (a `datasets.Dataset` with image, image_id, captions) become (image, caption) pairs. Each pair
yields either the preprocessed image (the encoder runs in the training step) or, with a feature cache,
the frozen encoder's patch tokens and pooled vector, computed once with `datasets.map` and stored on
disk under `<cache>/<encoder feature key>/<split>`.

`PairSampler` fixes the order: a permutation per epoch from (seed, epoch), cut into global batches, each
rank taking its slice. The position (epoch, batches done) is all that resuming needs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import numpy as np
import torch
from filelock import FileLock, Timeout

from .._fs import atomic_folder, remove_leftovers, write_failed
from ..caption.images import load_image
from ..errors import VisionRWKVError


def caption_pairs(ds: datasets.Dataset) -> list[tuple[int, int]]:
    """(row, caption index) for every caption of every image."""
    return [(row, j) for row, caps in enumerate(ds["captions"]) for j in range(len(caps))]


class PairDataset(torch.utils.data.Dataset):
    """Item i -> {"image": (3,H,W)} or {"tokens": (P,Dt), "pooled": (Dp,)}, plus "caption": token ids.

    Captions are tokenized once, up front (`truncated` counts those longer than max_tokens, which are
    cut). With a feature cache, the DataLoader fetches a whole batch of features in one Arrow read
    (`__getitems__`).
    """

    def __init__(self, rows: datasets.Dataset, pairs, tokenizer, max_tokens: int, preprocess=None, features=None):
        self.rows, self.pairs, self.tokenizer, self.max_tokens = rows, pairs, tokenizer, max_tokens
        self.preprocess, self.features = preprocess, features
        captions = rows["captions"]
        ids = tokenizer.encode_batch([captions[row][j] for row, j in pairs])
        self.truncated = sum(len(x) > max_tokens for x in ids)
        self.ids = [x[:max_tokens] for x in ids]
        if features is not None:
            features.set_format("numpy", columns=["tokens", "pooled"])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list[dict]:
        rows = [self.pairs[i][0] for i in indices]
        items = [{"caption": self.ids[i], "row": row} for i, row in zip(indices, rows)]
        if self.features is not None:
            f = self.features[rows]
            tokens = torch.from_numpy(np.asarray(f["tokens"], dtype=np.float32))
            pooled = torch.from_numpy(np.asarray(f["pooled"], dtype=np.float32))
            for k, item in enumerate(items):
                item["tokens"], item["pooled"] = tokens[k], pooled[k]
        else:
            for item, row in zip(items, rows):
                item["image"] = self.preprocess(load_image(self.rows[row]["image"]))
        return items


def collate(items: list[dict]) -> dict:
    lengths = torch.tensor([len(it["caption"]) for it in items], dtype=torch.long)
    captions = torch.zeros(len(items), max(1, int(lengths.max())), dtype=torch.long)
    for i, it in enumerate(items):
        captions[i, : len(it["caption"])] = torch.tensor(it["caption"], dtype=torch.long)
    batch = {"captions": captions, "lengths": lengths, "rows": torch.tensor([it["row"] for it in items])}
    for key in ("image", "tokens", "pooled"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    return batch


class PairSampler(torch.utils.data.Sampler):
    """Deterministic, resumable order over n pairs: batches of `batch_size` per rank, `world` ranks.

    Epoch e uses the permutation drawn from seed + e; global batch g holds positions
    [g*B*W, (g+1)*B*W) of it, rank r takes [r*B, (r+1)*B) within that. Incomplete global batches at the
    end of an epoch are dropped, so every rank sees the same number of batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.batches_per_epoch = n // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise VisionRWKVError(
                f"{n} training captions cannot fill one batch of {batch_size} x {world} rank(s); "
                "lower data.batch_size or add data"
            )
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batches_done: int) -> None:
        self.epoch, self.start = epoch, batches_done

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        span = self.batch_size * self.world
        for b in range(self.start, self.batches_per_epoch):
            base = b * span + self.rank * self.batch_size
            yield perm[base: base + self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


# ---- the feature cache ----------------------------------------------------------------------------


@torch.no_grad()
def feature_cache(encoder, rows: datasets.Dataset, root, split: str, *, batch_size: int = 64,
                  device=None, num_workers: int = 0) -> datasets.Dataset:
    """The encoder's features for every row (columns tokens (P,Dt) and pooled (Dp,), float16), computed
    once with datasets.map and kept under <root>/<encoder key>/<split>; later calls load them. num_workers:
    DataLoader processes decoding the images (0: in this process).

    Runs that share a cache take turns: the build holds a file lock beside the folder, and a run that
    finds it held waits, then uses what the other one built. The folder appears whole (atomic_folder).
    """
    folder = Path(root) / encoder.feature_key() / split
    cached = _cached(folder, rows)
    if cached is not None:
        return cached
    if len(rows) == 0:
        raise VisionRWKVError(f"split {split!r} has no images; nothing to encode")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(folder.parent, e) from None
    lock = FileLock(str(folder.parent / f".{split}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        warnings.warn(f"vision_rwkv: another process is building the feature cache {folder}; waiting for it",
                      stacklevel=2)
        lock.acquire()
    try:
        cached = _cached(folder, rows)  # built by the process we waited for
        if cached is not None:
            return cached
        remove_leftovers(folder.parent, split)  # what a killed build left
        mapped = _encode(encoder, rows, split, batch_size, device or next(encoder.parameters()).device,
                         num_workers)
        with atomic_folder(folder) as tmp:
            mapped.save_to_disk(str(tmp))
    finally:
        lock.release()
    return datasets.load_from_disk(str(folder))


def _cached(folder: Path, rows: datasets.Dataset) -> datasets.Dataset | None:
    """The cache in folder when it is complete and holds exactly these images, else None."""
    if not (folder / "dataset_info.json").is_file():
        return None
    cached = datasets.load_from_disk(str(folder))
    fixed = isinstance(cached.features.get("tokens"), datasets.Array2D)  # older caches: nested lists
    if fixed and len(cached) == len(rows) and cached["image"] == rows["image"]:
        return cached
    return None


def _encode(encoder, rows: datasets.Dataset, split: str, batch_size: int, device,
            num_workers: int = 0) -> datasets.Dataset:
    """rows.map over the encoder's outputs. The images are decoded and resized by a DataLoader's num_workers
    workers (Captioner's image-file loading, full-size decode), in the order and batches map walks the rows
    (each batch checked), as uint8 pixels where the preprocess splits (normalised on the device: the same
    floats, a quarter of the bytes to move). An image that cannot be read stops it in one line."""
    from ..caption.captioner import _collate, _ImageFiles

    pre = encoder.preprocess
    splits = hasattr(pre, "pixels") and hasattr(pre, "normalize")
    paths = rows["image"]
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, pre.pixels if splits else pre), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate,
                                         pin_memory=torch.device(device).type == "cuda")
    batches = iter(loader)
    done = [0]

    def encode(batch):
        files = next(batches)
        if files.errors:  # the first unreadable image of the batch, as load_image names it
            i = min(files.errors)
            raise VisionRWKVError(f"{paths[i]}: {files.errors[i]}")
        n = len(batch["image"])
        if files.good != list(range(done[0], done[0] + n)):  # map and the loader walked apart: a bug
            raise RuntimeError(f"feature cache: images {files.good[:3]}... decoded for rows {done[0]}..")
        done[0] += n
        images = files.images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = pre.normalize(images)
        tokens, pooled = encoder(images)
        return {"tokens": tokens.half().cpu().numpy(), "pooled": pooled.half().cpu().numpy()}

    probe_tokens, probe_pooled = encoder(encoder.preprocess(load_image(rows[0]["image"]))[None].to(device))
    schema = rows.features.copy()  # fixed-shape arrays: a batch reads back as one numpy array, no nested lists
    schema["tokens"] = datasets.Array2D(tuple(probe_tokens.shape[1:]), "float16")
    schema["pooled"] = datasets.Sequence(datasets.Value("float16"), length=probe_pooled.shape[-1])
    return rows.map(encode, batched=True, batch_size=batch_size, desc=f"encoding {split} images", features=schema,
                    new_fingerprint=f"{encoder.feature_key()}-{split}-{len(rows)}", load_from_cache_file=False)
