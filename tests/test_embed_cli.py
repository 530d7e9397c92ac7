"""`vision-rwkv embed`: OUT.npy + OUT.jsonl whose rows are the library's, never over existing outputs unless
asked, and bad input is one line with exit status 2 and nothing written."""

import json

import numpy as np
import pytest
import torch

from vision_rwkv.caption.captioner import Captioner
from vision_rwkv.cli import main as vision_rwkv_main
from vision_rwkv.cli.embed import main
from vision_rwkv.lm.embedding import embed_texts
from vision_rwkv.synthetic.shapes import generate_example

TEXTS = ["a small red circle in the top left", "", "a large blue square to the left of a small green triangle",
         "   ", "  there is a large orange square in the center  "]


@pytest.fixture(scope="module")
def demo():
    return Captioner.load(device="cpu", dtype="fp32")


def write_texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def test_texts_become_rows_of_the_library_function(tmp_path, demo, capsys):
    out = tmp_path / "emb" / "texts"
    for pool in ("last", "mean"):
        args = ["--texts", str(write_texts(tmp_path)), "--out", str(out), "--device", "cpu", "--pool", pool,
                "--chunk-len", "3", "--overwrite"]
        assert main(args) == 0
        vectors = np.load(out.with_suffix(".npy"))
        rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
        kept = [t.strip() for t in TEXTS if t.strip()]
        assert rows == [{"index": 0, "text": kept[0], "line": 1}, {"index": 1, "text": kept[1], "line": 3},
                        {"index": 2, "text": kept[2], "line": 5}]
        assert vectors.dtype == np.float32 and vectors.shape == (3, demo.model.decoder.config.n_embd)
        want = embed_texts(demo.model.decoder, demo.model.tokenizer, kept, pool=pool)
        np.testing.assert_allclose(vectors, want.numpy(), rtol=1e-5, atol=1e-5)
    assert "embedded 3 texts" in capsys.readouterr().err


def test_images_become_the_encoders_pooled_vectors(tmp_path, demo):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        image, _, _ = generate_example(__import__("random").Random(i))
        image.save(folder / f"{i}.png")
    out = tmp_path / "images_emb.npy"  # a suffix is taken off: OUT is images_emb
    assert vision_rwkv_main(["embed", str(folder), "--out", str(out), "--device", "cpu", "--no-normalize"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "images_emb.jsonl").read_text().splitlines()]
    paths = [str(folder / f"{i}.png") for i in range(3)]
    assert rows == [{"index": i, "path": p} for i, p in enumerate(paths)]
    want = demo.embed_images(paths, normalize=False)
    np.testing.assert_allclose(np.load(out), want.numpy(), rtol=1e-5, atol=1e-5)


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, capsys):
    texts = write_texts(tmp_path)
    out = tmp_path / "e"
    (tmp_path / "e.jsonl").write_text("keep me\n")
    assert main(["--texts", str(texts), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "e.jsonl exists" in err and "--overwrite" in err and "\n" not in err
    assert (tmp_path / "e.jsonl").read_text() == "keep me\n" and not (tmp_path / "e.npy").exists()
    assert main(["--texts", str(texts), "--out", str(out), "--device", "cpu", "--overwrite"]) == 0
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("make_args, words", [
    (lambda d: ["--out", str(d / "o")], "either --texts FILE or image PATHs"),
    (lambda d: ["--texts", str(d / "t.txt"), str(d), "--out", str(d / "o")], "either --texts FILE or image PATHs"),
    (lambda d: ["--texts", str(d / "missing.txt"), "--out", str(d / "o")], "cannot read --texts"),
    (lambda d: ["--texts", str(d / "blank.txt"), "--out", str(d / "o")], "has no text"),
    (lambda d: ["--texts", str(d / "latin1.txt"), "--out", str(d / "o")], "is not UTF-8"),
    (lambda d: [str(d / "bad"), "--out", str(d / "o")], "broken.png"),
    (lambda d: [str(d / "nowhere"), "--out", str(d / "o")], "does not exist"),
    (lambda d: ["--texts", str(d / "t.txt"), "--out", str(d / "o"), "--pool", "max"], "invalid choice"),
    (lambda d: ["--texts", str(d / "t.txt"), "--out", str(d / "o"), "--chunk-len", "0"], "--chunk-len is 0"),
    (lambda d: ["--texts", str(d / "t.txt")], "--out"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, make_args, words):
    (tmp_path / "t.txt").write_text("a caption\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    assert main(make_args(tmp_path) + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and err.startswith("vision-rwkv embed: ")
    assert not list(tmp_path.glob("o.*"))


def test_help_describes_the_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for words in ("--texts FILE", "OUT.npy", "OUT.jsonl", "--pool {last,mean}", "--overwrite", "--no-normalize",
                  "--chunk-len", "Exit status"):
        assert words in text
    assert vision_rwkv_main(["--help"]) == 0
    assert "embed" in capsys.readouterr().out


def test_rows_are_unit_length_by_default(tmp_path):
    assert main(["--texts", str(write_texts(tmp_path)), "--out", str(tmp_path / "u"), "--device", "cpu"]) == 0
    norms = torch.from_numpy(np.load(tmp_path / "u.npy")).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3))
