"""What `pip install .` gives: every module, the CUDA sources, Hydra's configs and the demo model in the wheel,
and a `vision-rwkv` command that works from any folder."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes_test_3.png"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("vision_rwkv-*.whl"))


def test_wheel_contains_every_module_config_and_the_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "vision_rwkv").rglob("*.py")}
    missing = sorted(m for m in modules if m not in names)
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"
    from vision_rwkv.ops.wkv4.cuda import SOURCES as WKV4_SOURCES
    from vision_rwkv.ops.wkv7.cuda import HEADERS, SOURCES

    for source in SOURCES + HEADERS + WKV4_SOURCES:
        assert f"vision_rwkv/kernels/{source}" in names
    for asset in ("config.yaml", "model.safetensors", "tokenizer.json"):  # caption.py's default model
        assert f"vision_rwkv/assets/demo/{asset}" in names
    assert "vision_rwkv/serve/static/index.html" in names  # the server's page
    confs = {str(p.relative_to(ROOT)) for p in (ROOT / "vision_rwkv" / "cli" / "conf").rglob("*.yaml")}
    assert confs and not sorted(c for c in confs if c not in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vision-rwkv = vision_rwkv.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_the_installed_command_works_from_any_folder(wheel, tmp_path):
    """The wheel in a fresh venv (its dependencies from this environment's site-packages), run from elsewhere."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    if install.returncode != 0 and "no such option: --python" in install.stderr:
        pytest.skip("pip older than 22.3 cannot install into another interpreter")
    assert install.returncode == 0, install.stderr[-2000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import vision_rwkv; print(vision_rwkv.__file__)"], cwd=away, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(env_dir)), where.stdout + where.stderr  # the installed copy, not the checkout
    for cmd in ([str(env_dir / "bin" / "vision-rwkv"), "caption", str(EXAMPLE)],
                [str(python), "-m", "vision_rwkv", "caption", str(EXAMPLE)]):
        proc = subprocess.run(cmd, cwd=away, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "triangle" in proc.stdout or "circle" in proc.stdout or "square" in proc.stdout
    composed = subprocess.run([str(env_dir / "bin" / "vision-rwkv"), "train", "--cfg", "job", "experiment=shapes_demo"],
                              cwd=away, env=env, capture_output=True, text=True, timeout=300)
    assert composed.returncode == 0 and "vrwkv-ViT-shapes" in composed.stdout, composed.stderr[-2000:]
    assert sorted(p.name for p in away.iterdir()) == []  # nothing written where it ran (no outputs/ folder)
