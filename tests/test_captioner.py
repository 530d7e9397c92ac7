"""Captioner: batched = one by one, bad files become error results in place, arguments and devices checked."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from vision_rwkv.caption import captioner as captioner_module
from vision_rwkv.caption.captioner import Captioner, CaptionResult
from vision_rwkv.caption.model import build_caption_model, save_caption_model
from vision_rwkv.config import CaptionConfig, EncoderConfig, ProjectorConfig, RWKV7Config, SamplingConfig
from vision_rwkv.errors import VisionRWKVError

CAPTIONS = [
    "a small red circle in the top left",
    "a large blue square to the left of a small green triangle",
    "a small yellow triangle above a large purple circle",
    "a large orange square in the center",
] * 5
GREEDY = SamplingConfig(strategy="greedy", max_new_tokens=8)


def make_checkpoint(folder: Path, projector: str = "mlp") -> Path:
    """A tiny caption checkpoint (random weights, BPE tokenizer) saved the way training saves one."""
    cfg = CaptionConfig(
        encoder=EncoderConfig(model="vrwkv-ViT-tiny"),
        projector=ProjectorConfig(kind=projector),
        decoder=RWKV7Config(n_layer=2, n_embd=64, head_size=16, wkv_impl="chunked"),
        tokenizer="train",
        tokenizer_vocab_size=100,
    )
    torch.manual_seed(0)
    model = build_caption_model(cfg, captions_for_bpe=CAPTIONS)
    randomize_(model.decoder)  # the official init zeroes output projections: every image would get one caption
    return save_caption_model(model, folder)


def noise_image(seed: int, size=(40, 48), mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write_images(folder: Path, n: int, names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / (names[i] if names else f"img{i}.png")
        noise_image(i, size=(32 + 7 * i, 40)).save(path)
        paths.append(path)
    return paths


def png_bomb(width=20000, height=20000) -> bytes:
    """A real, complete 1-bit PNG of width x height black pixels: a few kB on disk, 400M pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 500) for _ in range(height // 500)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_bytes(seed=0, mode="RGB") -> bytes:
    buf = io.BytesIO()
    noise_image(seed, (64, 64), mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_bad_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Good images of every awkward mode, and every kind of bad file: returns (good names, bad names)."""
    folder.mkdir(parents=True)
    (folder / "good.jpg").write_bytes(jpeg_bytes(1))
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(2, "CMYK"))
    noise_image(3, mode="L").save(folder / "gray.png")
    noise_image(4, mode="RGBA").save(folder / "rgba.png")
    noise_image(5).convert("P").save(folder / "palette.png")
    Image.fromarray(np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).save(folder / "gray16.png")
    good = ["good.jpg", "cmyk.jpg", "gray.png", "rgba.png", "palette.png", "gray16.png"]

    (folder / "truncated.jpg").write_bytes(jpeg_bytes(6)[:1500])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    (folder / "text.jpg").write_text("this is a text file, not a picture\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_bomb())
    (folder / "loop.jpg").symlink_to("loop.jpg")  # a link to itself
    (folder / "again").symlink_to(".")  # a folder loop: find_images must enter the folder once
    bad = ["truncated.jpg", "corrupt.jpg", "text.jpg", "empty.jpg", "bomb.png", "loop.jpg"]
    unreadable = folder / "unreadable.jpg"
    unreadable.write_bytes(jpeg_bytes(7))
    unreadable.chmod(0)
    if can_read(unreadable):  # root (or CAP_DAC_OVERRIDE) reads it anyway: leave that case out
        unreadable.unlink()
    else:
        bad.append(unreadable.name)
    return good, bad


def can_read(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except PermissionError:
        return False


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def captioner(checkpoint) -> Captioner:
    return Captioner.load(str(checkpoint), device="cpu")


def test_batched_equals_one_by_one(captioner, tmp_path):
    paths = write_images(tmp_path, 6)
    one = list(captioner.caption_paths(paths, GREEDY, batch_size=1))
    batched = list(captioner.caption_paths(paths, GREEDY, batch_size=4, num_workers=2))
    assert [r.path for r in one] == [r.path for r in batched] == [str(p) for p in paths]
    assert [r.caption for r in one] == [r.caption for r in batched]
    assert [r.score for r in one] == pytest.approx([r.score for r in batched], abs=1e-4)
    assert all(r.error is None and isinstance(r.caption, str) and r.score < 0 for r in one)
    assert len({r.caption for r in one}) > 1, "every image got the same caption: the test would prove nothing"


def test_score_is_the_best_hypothesis_logprob(captioner, tmp_path):
    from vision_rwkv.caption.generate import caption_features

    paths = write_images(tmp_path, 2)
    beam = SamplingConfig(strategy="beam", num_beams=3, max_new_tokens=8)
    results = list(captioner.caption_paths(paths, beam, batch_size=2))
    model = captioner.model
    x = torch.stack([model.encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    hyps = caption_features(model, *model.encode(x), beam)
    for r, h in zip(results, hyps):
        assert r.score == pytest.approx(h[0].logprob, abs=1e-4)
        assert r.caption == " ".join(model.tokenizer.decode(h[0].ids).split())


def test_loaders_hand_over_uint8_pixels_that_the_device_normalises(captioner, tmp_path):
    """caption_paths' workers resize and crop only; model_input normalises: the preprocessed floats exactly.
    An encoder whose preprocess does not split (open_clip's) gets float tensors, and uint8 is refused."""
    paths = [str(p) for p in write_images(tmp_path, 3)]
    files = captioner.image_files(paths)
    pixels = torch.stack([files[i][1] for i in range(3)])
    assert pixels.dtype == torch.uint8
    preprocess = captioner.model.encoder.preprocess
    want = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(captioner.model_input(pixels), want) and torch.equal(captioner.model_input(want), want)
    other = Captioner(captioner.model, "cpu")
    other.model.encoder.preprocess = lambda image: preprocess(image)  # a transform with no pixels/normalize
    try:
        assert other.image_files(paths)[0][1].dtype == torch.float32
        with pytest.raises(VisionRWKVError, match="uint8 pixels need an encoder preprocess with normalize"):
            other.model_input(pixels)
    finally:
        other.model.encoder.preprocess = preprocess


def test_bad_files_become_error_results_in_their_places(captioner, tmp_path):
    good, bad = write_bad_folder(tmp_path / "mixed")
    names = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3], bad[5], good[4], good[5]]
    paths = [tmp_path / "mixed" / n for n in names]
    results = list(captioner.caption_paths(paths, GREEDY, batch_size=3, num_workers=2))
    assert [r.path for r in results] == [str(p) for p in paths]
    for name, r in zip(names, results):
        if name in good:
            assert r.error is None and r.caption is not None, (name, r.error)
        else:
            assert r.caption is None and r.score is None and r.error, name
            assert "\n" not in r.error and str(r.path) not in r.error  # the reason alone; the path is r.path
    reasons = {n: r.error for n, r in zip(names, results)}
    assert "pixels" in reasons["bomb.png"] and "symlink loop" in reasons["loop.jpg"]
    assert "empty" in reasons["empty.jpg"]


def test_a_batch_of_only_bad_files(captioner, tmp_path):
    (tmp_path / "a.jpg").write_text("no")
    (tmp_path / "b.jpg").write_bytes(b"")
    results = list(captioner.caption_paths([tmp_path / "a.jpg", tmp_path / "b.jpg"], GREEDY, batch_size=4))
    assert [r.error is not None for r in results] == [True, True]


def test_unexpected_decoder_exceptions_become_error_results(captioner, tmp_path, monkeypatch):
    paths = write_images(tmp_path, 2)

    def broken(path, **options):  # load_image(path, draft_size=...)
        if str(path).endswith("img1.png"):
            raise ZeroDivisionError("a decoder bug")
        return Image.open(path).convert("RGB")

    monkeypatch.setattr(captioner_module, "load_image", broken)
    results = list(captioner.caption_paths(paths, GREEDY, batch_size=2))
    assert results[0].error is None
    assert "ZeroDivisionError: a decoder bug" in results[1].error


def test_arguments_are_checked_at_the_call(captioner):
    with pytest.raises(VisionRWKVError, match="batch_size"):
        captioner.caption_paths(["x.png"], GREEDY, batch_size=0)
    with pytest.raises(VisionRWKVError, match="num_workers"):
        captioner.caption_paths(["x.png"], GREEDY, num_workers=-1)
    with pytest.raises(VisionRWKVError, match="max_new_tokens"):
        captioner.caption_paths(["x.png"], SamplingConfig(max_new_tokens=0))
    assert list(captioner.caption_paths([], GREEDY)) == []


def test_progress_bar_counts_images_per_second(captioner, tmp_path, capsys):
    paths = write_images(tmp_path, 3)
    list(captioner.caption_paths(paths, GREEDY, batch_size=2, progress=True))
    err = capsys.readouterr().err
    assert "3/3" in err and "img/s" in err


def test_missing_demo_model_says_how_to_pass_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(captioner_module, "DEMO_DIR", tmp_path / "no-demo")
    with pytest.raises(VisionRWKVError, match="demo model is not installed.*checkpoint"):
        Captioner.load(None, device="cpu")


def test_demo_model_is_loaded_when_no_checkpoint_is_given(checkpoint, monkeypatch):
    monkeypatch.setattr(captioner_module, "DEMO_DIR", checkpoint)
    assert isinstance(Captioner.load(device="cpu").model.decoder, torch.nn.Module)


def test_devices(checkpoint):
    assert Captioner.load(str(checkpoint), device="auto").device.type == ("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    with pytest.raises(VisionRWKVError, match="not a device name"):
        Captioner.load(str(checkpoint), device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(VisionRWKVError, match="no CUDA device"):
            Captioner.load(str(checkpoint), device="cuda")


def test_a_bad_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(VisionRWKVError, match="does not exist"):
        Captioner.load(str(tmp_path / "missing"), device="cpu")


def test_caption_result_fields():
    r = CaptionResult("a.jpg", "a cat", -1.5, None)
    assert (r.path, r.caption, r.score, r.error) == ("a.jpg", "a cat", -1.5, None)


def test_jpeg_draft_decoding_gives_the_demo_the_same_captions(tmp_path):
    """Large JPEG photos of shapes scenes (512 px, the demo reads 64): decoded at 1/8 scale by default, or in
    full with jpeg_draft=False, the captions agree."""
    import random

    from vision_rwkv.synthetic.shapes import render, sample_objects

    paths = []
    for i in range(6):
        objects = sample_objects(random.Random(f"draft/{i}"))
        path = tmp_path / f"scene{i}.jpg"
        render(objects, 512).save(path, quality=92)
        paths.append(path)
    fast = Captioner.load(device="cpu", dtype="fp32")
    full = Captioner(fast.model, jpeg_draft=False)
    assert fast.draft_size == 64 and full.draft_size is None
    greedy = SamplingConfig(max_new_tokens=40)
    drafted = [r.caption for r in fast.caption_paths(paths, greedy)]
    assert drafted == [r.caption for r in full.caption_paths(paths, greedy)] and all(drafted)
