"""Image loading: every kind of good file decodes to the right RGB pixels, every bad one to one clear line."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_rwkv.caption.images import IMAGE_EXTENSIONS, find_images, load_image, to_rgb
from vision_rwkv.errors import VisionRWKVError


def noise_jpeg_bytes(size=64, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def expect_error(path, *words):
    with pytest.raises(VisionRWKVError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for word in words:
        assert word in message, message
    return message


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


# ---- good files ------------------------------------------------------------------------------------


def test_rgb_jpeg_round_trip(tmp_path):
    path = write(tmp_path / "photo.JPG", noise_jpeg_bytes())
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (64, 64)
    with Image.open(path) as ref:
        assert np.array_equal(np.asarray(im), np.asarray(ref.convert("RGB")))


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I;16")  # the case Pillow's own convert("RGB") clips to white
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_thirty_two_bit_int_holding_sixteen_bit_values(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)).save(tmp_path / "g32.tif")
    assert np.asarray(load_image(tmp_path / "g32.tif"))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "mode, colour, suffix, expected",
    [
        ("L", 77, "png", (77, 77, 77)),
        ("1", 1, "png", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), "tif", (255, 0, 0)),
        ("RGBA", (10, 20, 30, 0), "png", (255, 255, 255)),  # fully transparent -> white, not the hidden colour
        ("RGBA", (10, 20, 30, 255), "png", (10, 20, 30)),
        ("LA", (0, 0), "png", (255, 255, 255)),
    ],
)
def test_colour_modes(tmp_path, mode, colour, suffix, expected):
    path = tmp_path / f"x.{suffix}"
    Image.new(mode, (3, 2), colour).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (3, 2)
    assert im.getpixel((1, 1)) == expected


def test_half_transparent_rgba_blends_with_white(tmp_path):
    Image.new("RGBA", (2, 2), (0, 0, 0, 128)).save(tmp_path / "half.png")
    r, g, b = load_image(tmp_path / "half.png").getpixel((0, 0))
    assert r == g == b and 125 <= r <= 129


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_with_transparency(tmp_path, suffix):
    im = Image.new("P", (2, 1), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / f"p.{suffix}", transparency=0)
    out = load_image(tmp_path / f"p.{suffix}")
    assert out.getpixel((0, 0)) == (255, 255, 255)  # index 0 is transparent: white, not black
    assert out.getpixel((1, 0)) == (200, 10, 10)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (4, 2), (0, 0, 255))
    im.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100, subsampling=0)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (2, 4)
    r, g, b = out.getpixel((1, 0))  # the red corner moves to the top right
    assert r > 200 and b < 60


def test_to_rgb_always_returns_a_new_image():
    im = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(im) is not im


# ---- bad files -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.jpg", "not found")


def test_empty_file(tmp_path):
    expect_error(write(tmp_path / "empty.jpg", b""), "empty")


def test_text_file_named_jpg(tmp_path):
    expect_error(write(tmp_path / "notes.jpg", b"this is not an image\n"), "not an image")


def test_truncated_jpeg(tmp_path):
    data = noise_jpeg_bytes()
    expect_error(write(tmp_path / "cut.jpg", data[: len(data) // 2]), "truncated")


def test_corrupt_jpeg(tmp_path):
    data = bytearray(noise_jpeg_bytes())
    dht = data.find(b"\xff\xc4")  # wipe the Huffman tables: the header still says JPEG
    data[dht + 4: dht + 40] = bytes(36)
    expect_error(write(tmp_path / "bad.jpg", bytes(data)), "corrupt")


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    expect_error(write(tmp_path / "cut.png", buf.getvalue()[:600]), "truncated")


def test_folder_named_like_an_image(tmp_path):
    (tmp_path / "dir.png").mkdir()
    expect_error(tmp_path / "dir.png", "folder")


def test_decompression_bomb_over_pillows_limit(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400M pixels in a few tens of KB
    assert path.stat().st_size < 200_000
    expect_error(path, "decompression bomb")


def test_image_over_our_limit_refused_from_the_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(path)  # 81M pixels: under Pillow's limits, over ours
    expect_error(path, "9000x9000", "limit")
    assert load_image(path, max_pixels=10**8).size == (9000, 9000)


def test_pillows_bomb_warning_is_an_error_too(tmp_path):
    path = tmp_path / "warn.png"
    Image.new("1", (10000, 10000)).save(path)  # 100M pixels: Pillow only warns, and we allow it here
    with pytest.raises(VisionRWKVError, match="decompression bomb"):
        load_image(path, max_pixels=10**9)


def test_permission_error_is_one_line(tmp_path, monkeypatch):
    # The chmod test below cannot fail for root, so the path is also driven directly.
    path = write(tmp_path / "secret.jpg", noise_jpeg_bytes())

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", deny)
    expect_error(path, "permission denied")


def test_unreadable_file(tmp_path):
    path = write(tmp_path / "secret.jpg", noise_jpeg_bytes())
    path.chmod(0)
    try:
        if readable(path):
            pytest.skip("this user can read a chmod 000 file (root, usually)")
        expect_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def readable(path) -> bool:
    # Probing beats checking os.geteuid(): root without CAP_DAC_OVERRIDE cannot read the file either.
    try:
        with open(path, "rb"):
            return True
    except PermissionError:
        return False


def test_symlink_loop(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop.name)
    expect_error(loop, "symlink loop")


def test_broken_symlink(tmp_path):
    (tmp_path / "dangling.jpg").symlink_to("gone.jpg")
    expect_error(tmp_path / "dangling.jpg", "not found")


def test_no_file_handles_left_open(tmp_path):
    good = write(tmp_path / "good.jpg", noise_jpeg_bytes())
    bad = write(tmp_path / "bad.jpg", noise_jpeg_bytes()[:300])
    text = write(tmp_path / "t.png", b"hello")
    load_image(good)  # warm up lazy imports that may open files once
    before = open_fds()
    for _ in range(20):
        load_image(good)
        for path in (bad, text):
            with pytest.raises(VisionRWKVError):
                load_image(path)
    assert open_fds() == before


# ---- finding ---------------------------------------------------------------------------------------


def make_messy_tree(root: Path) -> set[str]:
    """A folder of good, bad and looping entries; returns the image-named files find_images must list."""
    (root / "sub" / "deeper").mkdir(parents=True)
    write(root / "a.jpg", noise_jpeg_bytes())
    write(root / "B.PNG", b"not really a png")
    write(root / "empty.webp", b"")
    write(root / "sub" / "c.jpeg", noise_jpeg_bytes(seed=2))
    write(root / "sub" / "deeper" / "d.TIFF", b"")
    write(root / "notes.txt", b"ignore me")
    write(root / "sub" / "readme.md", b"ignore me")
    (root / "sub" / "deeper" / "up").symlink_to("../..", target_is_directory=True)  # loops to root
    (root / "self").symlink_to(".", target_is_directory=True)
    (root / "loop.gif").symlink_to("loop.gif")
    (root / "dangling.bmp").symlink_to("missing.bmp")
    return {"a.jpg", "B.PNG", "empty.webp", "sub/c.jpeg", "sub/deeper/d.TIFF", "loop.gif", "dangling.bmp"}


def test_find_images_terminates_on_loops_and_lists_each_once(tmp_path):
    expected = make_messy_tree(tmp_path)
    found = find_images(tmp_path)
    assert len(found) == len(set(found))
    assert sorted(str(p.relative_to(tmp_path)) for p in found) == sorted(expected)
    assert found == sorted(found, key=str)
    assert find_images([tmp_path, tmp_path / "sub", tmp_path / "a.jpg"]) == found  # overlaps are merged


def test_every_found_file_loads_or_fails_with_one_line(tmp_path):
    make_messy_tree(tmp_path)
    outcomes = {}
    for path in find_images(str(tmp_path)):
        try:
            outcomes[path.name] = load_image(path).size
        except VisionRWKVError as e:
            assert "\n" not in str(e)
            outcomes[path.name] = "error"
    assert outcomes == {"a.jpg": (64, 64), "B.PNG": "error", "empty.webp": "error", "c.jpeg": (64, 64),
                        "d.TIFF": "error", "loop.gif": "error", "dangling.bmp": "error"}


def test_explicit_file_kept_whatever_its_extension(tmp_path):
    odd = write(tmp_path / "scan.image", noise_jpeg_bytes())
    assert find_images([odd]) == [odd]
    assert load_image(odd).size == (64, 64)


def test_find_images_errors(tmp_path):
    with pytest.raises(VisionRWKVError, match="does not exist; expected an image file or a folder"):
        find_images([tmp_path / "missing"])
    write(tmp_path / "notes.txt", b"")
    with pytest.raises(VisionRWKVError, match=r"no images found in .*expected files ending in .*\.jpg"):
        find_images(tmp_path)


def test_extensions_cover_the_common_formats():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS


def test_a_draft_size_decodes_jpegs_at_the_smallest_scale_that_covers_it(tmp_path):
    """PIL's draft mode: a 640x480 JPEG asked for 224 comes back at 1/2 scale (both sides still >= 224), for 64
    at 1/4 (160x120, as 1/8 would give 60 rows); a PNG, and a JPEG smaller than a scale, decode in full; the
    EXIF orientation still applies; and the small decode looks like the full one shrunk."""
    rng = np.random.default_rng(3)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((40, 40, 1))).astype(np.uint8)  # 480x640 blocks
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "big.png")
    Image.fromarray(smooth[:150, :200]).save(tmp_path / "small.jpg", quality=95)
    assert load_image(tmp_path / "big.jpg", draft_size=224).size == (320, 240)
    assert load_image(tmp_path / "big.jpg", draft_size=64).size == (160, 120)
    assert load_image(tmp_path / "big.jpg").size == (640, 480)
    assert load_image(tmp_path / "big.png", draft_size=64).size == (640, 480)
    assert load_image(tmp_path / "small.jpg", draft_size=224).size == (200, 150)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "rot.jpg", draft_size=224).size == (240, 320)
    full = np.asarray(load_image(tmp_path / "big.jpg").resize((160, 120), Image.Resampling.BOX), dtype=float)
    draft = np.asarray(load_image(tmp_path / "big.jpg", draft_size=64), dtype=float)
    assert np.abs(full - draft).mean() < 3.0  # out of 255: the JPEG's own scaling, not another picture
