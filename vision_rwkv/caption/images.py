"""Image files: find them, and decode any of them to RGB or fail with one clear line.

A folder of images from the wild holds every kind of surprise: grayscale, CMYK, transparency, 16-bit
PNGs, rotated phone photos, truncated downloads, text files named .jpg, decompression bombs and
symlink loops. `load_image` turns each good file into an 8-bit RGB image and each bad one into a
VisionRWKVError "<path>: <reason>", so a captioning run can record the bad row and go on.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import VisionRWKVError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_PIXELS = 8192 * 8192  # a 67M-pixel RGB image is 200 MB decoded; anything larger is refused
WHITE = (255, 255, 255)



class TooManyPixels(VisionRWKVError):
    """An image over the pixel limit (a possible decompression bomb): the server answers 413 for it."""


# What Pillow's decoders raise on damaged data. Anything else escaping a decoder is a bug worth a traceback.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in one of IMAGE_EXTENSIONS (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# ---- loading ---------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode an image file fully into an 8-bit RGB image, upright according to its EXIF orientation.

    Transparent pixels are composited on white; 16-bit images are scaled (not clipped) to 8 bits.
    Raises VisionRWKVError("<path>: <reason>") for anything that is not a readable, sane image.

    draft_size: for a consumer that shrinks the image to about this side anyway (an encoder's preprocess),
    a JPEG is decoded at the smallest of its own DCT scales (1/2, 1/4, 1/8: PIL's draft mode) whose width
    and height both stay at least draft_size; less to decode and less to resize. Other formats, and JPEGs
    too small for a scale, decode in full.
    """
    path = Path(path)
    _check_regular_file(path)
    try:
        with open(path, "rb") as f:
            return _decode(f, path, max_pixels, draft_size)
    except OSError as e:  # open() itself: permission, a link that changed since the stat, ...
        raise VisionRWKVError(f"{path}: {_os_reason(e)}") from None


def decode_image_bytes(data: bytes, name: str, max_pixels: int = MAX_PIXELS,
                       draft_size: int | None = None) -> Image.Image:
    """Like load_image, for an image held in memory (an upload): nothing touches the disk. name stands in
    for the path in the messages; an image over max_pixels raises TooManyPixels; draft_size as load_image's."""
    if not data:
        raise VisionRWKVError(f"{name}: empty file (0 bytes); expected an image")
    return _decode(io.BytesIO(data), Path(name), max_pixels, draft_size)


def _check_regular_file(path: Path) -> None:
    # stat before open: opening a FIFO named x.jpg would block forever.
    try:
        st = os.stat(path)
    except OSError as e:
        raise VisionRWKVError(f"{path}: {_os_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VisionRWKVError(f"{path}: is a folder; expected an image file")
    if not stat.S_ISREG(st.st_mode):
        raise VisionRWKVError(f"{path}: is not a regular file; expected an image file")
    if st.st_size == 0:
        raise VisionRWKVError(f"{path}: empty file (0 bytes); expected an image")


def _os_reason(e: OSError) -> str:
    reasons = {
        errno.ENOENT: "file not found (or a broken symlink)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "symlink loop; expected a link that ends at an image file",
        errno.ENAMETOOLONG: "path too long",
        errno.EISDIR: "is a folder; expected an image file",
    }
    return reasons.get(e.errno, f"cannot read ({e.strerror or e})")


def _decode(f, path: Path, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    # Pillow warns (rather than fails) between its own limit and twice it; make that an error here only.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(f) as im:
                _check_pixels(im, path, max_pixels)
                if draft_size and im.format == "JPEG":
                    im.draft(None, (draft_size, draft_size))
                im.load()  # a full decode, so truncation shows up now rather than as grey rows later
                return to_rgb(_upright(im))
        except UnidentifiedImageError:
            raise VisionRWKVError(f"{path}: not an image (or a format Pillow cannot read)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise TooManyPixels(f"{path}: too many pixels, a possible decompression bomb ({e})") from None
        except VisionRWKVError:
            raise
        except _DECODE_ERRORS as e:
            raise VisionRWKVError(f"{path}: corrupt, truncated or unsupported image ({_first_line(e)})") from None


def _upright(im: Image.Image) -> Image.Image:
    # Damaged EXIF is common in photos whose pixels are fine: then keep the stored orientation.
    try:
        return ImageOps.exif_transpose(im)
    except _DECODE_ERRORS:
        return im


def _check_pixels(im: Image.Image, path: Path, max_pixels: int) -> None:
    # The header alone gives the size, so a bomb is refused before a single pixel is decompressed.
    w, h = im.size
    if w <= 0 or h <= 0:
        raise VisionRWKVError(f"{path}: image has size {w}x{h}; expected a positive width and height")
    if w * h > max_pixels:
        raise TooManyPixels(
            f"{path}: image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
            "(a possible decompression bomb)"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (a new image): alpha over white, high bit depths scaled to 8 bits."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(im), mode="L").convert("RGB")
    if im.mode == "P" and "transparency" not in im.info:
        return im.convert("RGB")
    if "A" in im.getbands() or im.mode in ("P", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Single-channel high-bit-depth pixels -> uint8 by scaling, since Pillow's convert("L") clips at 255."""
    a = np.asarray(im)
    if a.dtype.kind == "f":
        # Float images are usually in [0, 1]; otherwise assume they already use the 8-bit range.
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    a = a.astype(np.int64)
    if im.mode.startswith("I;16") or (a.min(initial=0) >= 0 and a.max(initial=0) <= 65535):
        # 16-bit data (mode "I" is how older Pillow and TIFF hand over 16-bit gray): 65535 -> 255.
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    lo, hi = int(a.min()), int(a.max())  # 32-bit integer data of unknown range: stretch what is there
    return ((a - lo) * 255 // max(hi - lo, 1)).astype(np.uint8)


# ---- finding ---------------------------------------------------------------------------------------


def find_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image files under the given files and folders, sorted and without duplicates.

    A folder is searched recursively for IMAGE_EXTENSIONS files, following symlinks but entering each
    real folder once, so a link to an ancestor cannot loop. A file named explicitly is kept whatever its
    extension. Broken or looping file links are kept too, so the caller reports them as bad rows.
    Paths keep the form they were given in (relative stays relative).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    found: dict[str, Path] = {}
    seen_dirs: set[tuple[int, int]] = set()
    for root in paths:
        if _is_dir(root):
            candidates = _walk(root, seen_dirs)
        elif os.path.lexists(root):
            candidates = [root]
        else:
            raise VisionRWKVError(f"{root} does not exist; expected an image file or a folder")
        for p in candidates:
            found.setdefault(os.path.abspath(p), p)
    if not found:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise VisionRWKVError(f"no images found in {where}; expected files ending in {_extension_list()}")
    return sorted(found.values(), key=str)


def _extension_list() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:  # missing, broken link, symlink loop: not a folder
        return False


def _walk(root: Path, seen_dirs: set[tuple[int, int]]) -> list[Path]:
    """Image files under root, depth first in sorted order; each real folder is entered once."""
    out: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            continue
        seen_dirs.add(key)
        subdirs, files = _list_folder(folder)
        out.extend(files)
        stack.extend(reversed(subdirs))
    return out


def _list_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        warnings.warn(f"{folder}: cannot list this folder ({_os_reason(e)}); skipped", stacklevel=3)
        return [], []
    subdirs, files = [], []
    for entry in entries:
        p = folder / entry.name
        if _is_dir(p):
            subdirs.append(p)
        elif is_image_path(p):
            files.append(p)
    return subdirs, files
