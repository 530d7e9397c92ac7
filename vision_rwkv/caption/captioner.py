"""Caption image files: a loaded CaptionModel, batched decoding, one result per path in input order.

    captioner = Captioner.load("runs/x/checkpoints/step-0001000")   # or Captioner.load() for the demo model
    for result in captioner.caption_paths(paths, SamplingConfig(strategy="beam", num_beams=5)):
        print(result.path, result.caption if result.error is None else result.error)

Images are decoded and preprocessed in DataLoader workers. A file that cannot be decoded becomes an
error result instead of stopping the run; the good images of each batch are encoded together and
decoded together, and the batch's results come out in input order with the errors in their places.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import SamplingConfig
from ..errors import VisionRWKVError
from ..hub import resolve
from .generate import caption_features
from .images import load_image
from .model import CaptionModel, load_caption_model

DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"


@dataclass
class CaptionResult:
    """One input path's outcome: a caption and its score, or an error (the reason, without the path)."""

    path: str
    caption: str | None
    score: float | None  # the caption's total log-probability under the model (see Captioner)
    error: str | None


DTYPES = ("auto", "bf16", "fp32")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise VisionRWKVError(f"dtype is {dtype!r}; expected one of {', '.join(DTYPES)}")


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when available, else CPU; otherwise any torch device name (cpu, cuda, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise VisionRWKVError(f"device {name!r} is not a device name; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VisionRWKVError(f"device is {name!r} but no CUDA device is available; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VisionRWKVError(
                f"device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


class Captioner:
    """Captions image files with a CaptionModel.

    The score of a result is the best hypothesis' log-probability: the sum over its tokens, and over the
    end-of-text when the caption ended rather than being cut at max_new_tokens. The same quantity for
    every strategy, so scores from greedy, sampling and beam runs compare (beam search ranks by
    logprob / length ** length_penalty, but reports the plain sum here). Captions are the decoded text
    with runs of whitespace collapsed to one space, so a caption is always one line.

    Precision: Captioner.load(dtype=auto) gives the model bf16 weights and runs it under bf16 autocast on
    CUDA, and keeps fp32 without autocast on the CPU; dtype=fp32 is fp32 without autocast anywhere. A
    Captioner made from a model runs under bf16 autocast when the model is on CUDA or has bf16 weights,
    unless autocast= says otherwise. With
    sampling.seed set, draws come from one generator seeded once per caption_paths call, so they depend
    on the batch size too.
    """

    def __init__(self, model: CaptionModel, device: torch.device | str | None = None, *, autocast: bool | None = None,
                 jpeg_draft: bool = True):
        """autocast: bf16 autocast on or off; None: on when the model is on CUDA or its weights are bf16.
        jpeg_draft: decode JPEGs at the smallest DCT scale that still covers the encoder's input size
        (images.load_image's draft_size), rather than in full; False decodes every file in full."""
        self.jpeg_draft = jpeg_draft
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        bf16_weights = self.model.decoder.emb.weight.dtype == torch.bfloat16
        self.bf16 = (self.device.type == "cuda" or bf16_weights) if autocast is None else autocast

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto") -> Captioner:
        """A captioner for a checkpoint folder; None loads the demo model shipped in vision_rwkv/assets/demo.

        dtype: auto (bf16 weights and autocast on CUDA, fp32 on the CPU) | bf16 | fp32 (fp32 weights, no
        autocast: slower, and the reference the others are compared with)."""
        dev = resolve_device(device)
        check_dtype(dtype)
        bf16 = dtype == "bf16" or (dtype == "auto" and dev.type == "cuda")
        if checkpoint is None:
            if not (DEMO_DIR / "config.yaml").is_file():
                raise VisionRWKVError(
                    f"no checkpoint was given and the demo model is not installed ({DEMO_DIR} is missing); "
                    "pass a caption checkpoint folder, e.g. caption.py checkpoint=runs/x/checkpoints/step-0001000"
                )
            checkpoint = DEMO_DIR
        model = load_caption_model(checkpoint, device=dev, dtype=torch.bfloat16 if bf16 else torch.float32)
        return cls(model, dev, autocast=bf16)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str = "auto", dtype: str = "auto", *,
                        revision: str | None = None, cache_dir=None,
                        local_files_only: bool | None = None) -> Captioner:
        """A captioner for a Hugging Face Hub model ("org/name", "org/name@revision") or a local folder.

        Downloads go through huggingface_hub's cache (cache_dir, HF_HUB_CACHE) and follow its offline mode
        (HF_HUB_OFFLINE=1, or local_files_only=True: the cache only)."""
        folder = resolve(name_or_path, "a caption checkpoint folder or a Hugging Face Hub model", revision=revision,
                         cache_dir=cache_dir, local_files_only=local_files_only)
        return cls.load(folder, device=device, dtype=dtype)

    @property
    def draft_size(self) -> int | None:
        """The side JPEGs are decoded down to (at least), or None for full decodes."""
        return max(self.model.encoder.image_size) if self.jpeg_draft else None

    # ---- loading images ----------------------------------------------------------------------------------

    def image_files(self, paths: list[str]) -> Dataset:
        """The images as a Dataset for DataLoader workers (collate with _collate): each JPEG decoded at
        draft_size, and preprocessed up to uint8 pixels where the encoder's preprocess splits (the project's
        own ViT transform: the workers resize and crop, model_input normalises on the device, and a loader
        moves a quarter of the bytes), or in full otherwise."""
        preprocess = self.model.encoder.preprocess
        return _ImageFiles(paths, getattr(preprocess, "pixels", preprocess), self.draft_size)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """A batch from image_files, or preprocessed images, on the model's device: uint8 pixels are
        normalised there by the encoder's preprocess."""
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            normalize = getattr(self.model.encoder.preprocess, "normalize", None)
            if normalize is None:
                raise VisionRWKVError("uint8 pixels need an encoder preprocess with normalize(); this encoder's "
                                      "(built by open_clip) takes preprocessed float images")
            images = normalize(images)
        return images

    # ---- captioning ------------------------------------------------------------------------------------

    def caption_paths(self, paths: Iterable[str | os.PathLike], sampling: SamplingConfig, batch_size: int = 32,
                      num_workers: int = 0, progress: bool = False) -> Iterator[CaptionResult]:
        """One CaptionResult per path, in input order. Arguments are checked now, not at the first next()."""
        batches = self.caption_batches(paths, sampling, batch_size, num_workers, progress)
        return (result for batch in batches for result in batch)

    def caption_batches(self, paths: Iterable[str | os.PathLike], sampling: SamplingConfig, batch_size: int = 32,
                        num_workers: int = 0, progress: bool = False) -> Iterator[list[CaptionResult]]:
        """Like caption_paths, but one list per batch of batch_size paths (the last may be shorter), so a
        writer can flush exactly at batch boundaries."""
        paths = [str(p) for p in paths]
        sampling.validate()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise VisionRWKVError(f"batch_size is {batch_size!r}; expected a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise VisionRWKVError(f"num_workers is {num_workers!r}; expected 0 (decode in this process) or more")
        return self._batches(paths, sampling, batch_size, num_workers, progress)

    def _batches(self, paths, sampling, batch_size, num_workers, progress) -> Iterator[list[CaptionResult]]:
        from tqdm.auto import tqdm

        if not paths:
            return
        loader = DataLoader(
            self.image_files(paths),
            batch_size=batch_size,
            shuffle=False,
            num_workers=min(num_workers, -(-len(paths) // batch_size)),  # no more workers than batches
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        generator = None
        if sampling.strategy == "sample" and sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        try:
            for batch in loader:
                results = self._caption_batch(paths, batch, sampling, generator)
                bar.update(len(results))
                yield results
        finally:
            bar.close()

    @torch.no_grad()
    def _caption_batch(self, paths: list[str], batch: _Batch, sampling: SamplingConfig,
                       generator) -> list[CaptionResult]:
        results = {i: CaptionResult(paths[i], None, None, reason) for i, reason in batch.errors.items()}
        if batch.images is not None:
            for i, captions in zip(batch.good, self.caption_images(batch.images, sampling, generator)):
                text, score = captions[0]
                results[i] = CaptionResult(paths[i], text, score, None)
        return [results[i] for i in sorted(results)]

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, sampling: SamplingConfig,
                       generator: torch.Generator | None = None) -> list[list[tuple[str, float]]]:
        """Preprocessed images (B,3,H,W) -> per image, num_return_sequences (caption, score) pairs, best
        first. Images come from self.model.encoder.preprocess, or are its uint8 pixels (see model_input);
        the server calls this from its one worker."""
        images = self.model_input(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            tokens, pooled = self.model.encode(images)
            hyps = caption_features(self.model, tokens, pooled, sampling, generator)
        return [[(self.text(h.ids), float(h.logprob)) for h in row] for row in hyps]

    # ---- embeddings and image-text matching -------------------------------------------------------------

    @torch.no_grad()
    def embed_images(self, paths: Iterable[str | os.PathLike], batch_size: int = 32, num_workers: int = 0,
                     normalize: bool = True) -> torch.Tensor:
        """Image files -> the encoder's pooled vectors (N, D), float32 on the CPU, in input order; normalize:
        L2-normalise each row (the default). An image that cannot be read stops the call with one line
        naming it (a matrix has no place for an error row; caption_paths is the call that goes on)."""
        paths = [str(p) for p in paths]
        out = torch.zeros(len(paths), self.model.encoder.pooled_dim)
        for batch in self._image_batches(paths, batch_size, num_workers):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                _, pooled = self.model.encode(self.model_input(batch.images))
            out[batch.good] = pooled.float().cpu()
        return torch.nn.functional.normalize(out, dim=1) if normalize else out

    @torch.no_grad()
    def score(self, paths: Iterable[str | os.PathLike], captions: Iterable[str], normalize: bool = False,
              batch_size: int = 32, num_workers: int = 0) -> torch.Tensor:
        """log p(caption | image) for each (path, caption) pair: (N,) float32 on the CPU.

        The sum over the caption's tokens and its end-of-text, as training reads captions (see
        vision_rwkv.caption.scoring); normalize=True divides by that count (the mean log-probability per
        token, which compares captions of different lengths). Each distinct image is read, encoded and
        prefilled once, however many pairs name it. An image that cannot be read stops the call with one
        line naming it."""
        from .scoring import caption_ids, score_captions

        paths = [str(p) for p in paths]
        ids = caption_ids(self.model.tokenizer, captions)  # checks each caption (and that it is not one string)
        if len(ids) != len(paths):
            raise VisionRWKVError(f"score takes one caption per path: got {len(paths)} paths and {len(ids)} captions")
        images = list(dict.fromkeys(paths))  # distinct paths, in order of first use
        pairs_of: dict[str, list[int]] = {}
        for i, path in enumerate(paths):
            pairs_of.setdefault(path, []).append(i)
        sums, counts = torch.zeros(len(paths)), torch.ones(len(paths))
        for batch in self._image_batches(images, batch_size, num_workers):
            pairs = [(row, i) for row, k in enumerate(batch.good) for i in pairs_of[images[k]]]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                tokens, pooled = self.model.encode(self.model_input(batch.images))
                s, c = score_captions(self.model, tokens, pooled, [ids[i] for _, i in pairs],
                                      [row for row, _ in pairs], batch_size)
            index = torch.tensor([i for _, i in pairs], dtype=torch.long)
            sums[index], counts[index] = s, c
        return sums / counts if normalize else sums

    def _image_batches(self, paths: list[str], batch_size: int, num_workers: int) -> Iterator[_Batch]:
        """Preprocessed batches of the images, in order; the first image that cannot be read raises one line."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise VisionRWKVError(f"batch_size is {batch_size!r}; expected a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise VisionRWKVError(f"num_workers is {num_workers!r}; expected 0 (decode in this process) or more")
        if not paths:
            return
        files = self.image_files(paths)
        loader = DataLoader(files, batch_size=batch_size, shuffle=False,
                            num_workers=min(num_workers, -(-len(paths) // batch_size)), collate_fn=_collate)
        for batch in loader:
            if batch.errors:
                i = min(batch.errors)
                raise VisionRWKVError(f"{paths[i]}: {batch.errors[i]}")
            yield batch

    def text(self, ids: list[int]) -> str:
        """Token ids -> a caption: the decoded text with runs of whitespace collapsed to one space."""
        return " ".join(self.model.tokenizer.decode(ids).split())


# ---- loading images (in DataLoader workers) ---------------------------------------------------------------


class _ImageFiles(Dataset):
    """Item i: (i, preprocess(image), None) or (i, None, one-line reason it could not be read)."""

    def __init__(self, paths: list[str], preprocess, draft_size: int | None = None):
        self.paths = paths
        self.preprocess = preprocess
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            return i, self.preprocess(load_image(path, draft_size=self.draft_size)), None
        except VisionRWKVError as e:
            return i, None, _without_path(str(e), path)
        except Exception as e:  # a decoder or transform failing in a way images.py did not foresee
            return i, None, f"cannot decode or preprocess the image ({type(e).__name__}: {_first_line(e)})"


@dataclass
class _Batch:
    good: list[int]  # input indices of the images, in order
    images: torch.Tensor | None  # (len(good),3,H,W), or None when every item of the batch failed
    errors: dict[int, str]  # input index -> reason

    def pin_memory(self) -> _Batch:  # called by the DataLoader's pin_memory thread
        images = self.images.pin_memory() if self.images is not None else None
        return _Batch(self.good, images, self.errors)


def _collate(items) -> _Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    errors = {i: reason for i, x, reason in items if x is None}
    images = torch.stack([x for _, x in good]) if good else None
    return _Batch([i for i, _ in good], images, errors)


def _without_path(message: str, path: str) -> str:
    # load_image says "<path>: <reason>"; the result carries the path already.
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"
