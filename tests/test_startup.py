"""Start-up: captioning imports none of the heavy packages (measured with python -X importtime, whatever of
them is installed), and the commands exit as soon as they are done."""

import subprocess
import sys
from pathlib import Path

import pytest
from test_captioner import make_checkpoint, write_images

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes_test_3.png"
# open_clip pulls in torchvision's models, timm and transformers (2.6 s); the rest belong to training and eval
HEAVY = {"open_clip", "timm", "transformers", "torchvision", "datasets", "tensorboard", "pycocoevalcap"}


def imported(*args, cwd=ROOT) -> set[str]:
    """The top-level packages a command imports, read off -X importtime."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    assert "torch" in names  # the measurement worked
    return names


def test_captioning_with_the_demo_model_imports_no_heavy_package():
    assert imported(ROOT / "caption.py", EXAMPLE) & HEAVY == set()
    assert imported("-m", "vision_rwkv", "caption", EXAMPLE) & HEAVY == set()


def test_captioning_with_a_checkpoint_imports_no_heavy_package(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    [image] = write_images(tmp_path, 1)
    names = imported(ROOT / "caption.py", image, f"checkpoint={checkpoint}", "sampling.max_new_tokens=4",
                     "num_workers=0")
    assert names & HEAVY == set()


def test_the_library_imports_no_heavy_package():
    assert imported("-c", "import vision_rwkv") & HEAVY == set()


def test_the_library_leaves_torch_compile_and_triton_unimported():
    """torch._dynamo (which imports Triton) loads on first use only: imported first, it makes the Triton
    kernels' tests under Triton's interpreter fail (tests/ops/test_rwkv7_step.py; seen when a module-level
    torch.compiler decorator in ops/_build.py imported it with the package)."""
    assert "triton" not in imported("-c", "import vision_rwkv, vision_rwkv.lm.graphs, vision_rwkv.lm.engine4")


@pytest.mark.parametrize("package", sorted(HEAVY))
def test_heavy_packages_are_really_there_to_be_avoided(package):
    """The budget means something only where they are installed, as in CI (pip install -e .[dev])."""
    import importlib.util

    assert importlib.util.find_spec(package) is not None
