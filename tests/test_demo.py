"""The shipped demo model and examples/: what a user gets from `python caption.py examples/<file>`."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vision_rwkv.caption.captioner import DEMO_DIR
from vision_rwkv.synthetic.shapes import render, sample_objects, score_caption

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("shapes_test_*.png"))


def true_objects(example: Path) -> list[dict]:
    """examples/shapes_test_<i>.png is test image i of `make_shapes.py --seed 0 --size 64`."""
    index = int(example.stem.rsplit("_", 1)[1])
    return sample_objects(random.Random(f"shapes/0/test/{index}"))


def test_the_demo_model_is_small_and_half_precision():
    files = {p.name: p.stat().st_size for p in DEMO_DIR.iterdir()}
    assert {"config.yaml", "model.safetensors", "tokenizer.json"} <= set(files)
    assert sum(files.values()) <= 15 * 2**20
    with safe_open(str(DEMO_DIR / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert any(k.startswith("encoder.") for k in f.keys())  # the frozen encoder ships with it
    assert dtypes <= {"BF16", "F16", "I64"}, dtypes


def test_examples_are_the_held_out_images_they_claim_to_be():
    assert len(EXAMPLES) >= 3
    for example in EXAMPLES:
        shipped = np.asarray(Image.open(example).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(render(true_objects(example), 64).convert("RGB"))), example
    assert {len(true_objects(e)) for e in EXAMPLES} == {1, 2, 3}


def caption_py(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "caption.py"), *map(str, args), "device=cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_caption_py_on_an_example_prints_a_correct_caption():
    example = EXAMPLES[-1]
    proc = caption_py(example.relative_to(REPO))
    caption = proc.stdout.strip()
    assert "\n" not in caption and score_caption(caption, true_objects(example))["exact"], caption
    assert "shipped demo model" in proc.stderr and "Warning" not in proc.stderr


@pytest.mark.slow
def test_caption_py_on_the_examples_folder_gets_every_attribute_right():
    proc = caption_py("examples")
    lines = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert sorted(lines) == [str(p.relative_to(REPO)) for p in EXAMPLES]
    for path, caption in lines.items():
        assert score_caption(caption, true_objects(REPO / path))["exact"], (path, caption)


def examples_captioned(device: str, dtype: str):
    """(the set of weight dtypes, whether autocast is on, the captions of the examples)"""
    from vision_rwkv import Captioner, SamplingConfig

    captioner = Captioner.load(device=device, dtype=dtype)
    weights = {p.dtype for p in captioner.model.parameters()}
    results = list(captioner.caption_paths(EXAMPLES, SamplingConfig(), batch_size=len(EXAMPLES)))
    assert all(r.error is None for r in results)
    return weights, captioner.bf16, [r.caption for r in results]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_demo_in_fp32_and_in_bf16_on_the_cpu(dtype):
    weights, autocast, captions = examples_captioned("cpu", dtype)
    assert weights == ({torch.float32} if dtype == "fp32" else {torch.bfloat16})
    assert autocast == (dtype == "bf16")
    for example, caption in zip(EXAMPLES, captions):
        assert score_caption(caption, true_objects(example))["exact"], (example.name, caption)


def test_a_bad_dtype_is_one_line():
    from vision_rwkv import Captioner
    from vision_rwkv.errors import VisionRWKVError

    with pytest.raises(VisionRWKVError, match="dtype is 'half'; expected one of auto, bf16, fp32"):
        Captioner.load(device="cpu", dtype="half")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_on_cuda_loads_bf16_weights_by_default():
    weights, autocast, captions = examples_captioned("cuda", "auto")
    assert weights == {torch.bfloat16} and autocast
    for example, caption in zip(EXAMPLES, captions):
        assert score_caption(caption, true_objects(example))["exact"], (example.name, caption)
