"""A wheel carries every module and the CUDA sources, so the lazy kernel build works after pip install."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module_and_the_kernel_sources(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("vision_rwkv-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "vision_rwkv").rglob("*.py")}
    missing = sorted(m for m in modules if m not in names)
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"
    from vision_rwkv.ops.wkv7.cuda import HEADERS, SOURCES

    for source in SOURCES + HEADERS:
        assert f"vision_rwkv/kernels/{source}" in names
    for asset in ("config.yaml", "model.safetensors", "tokenizer.json"):  # caption.py's default model
        assert f"vision_rwkv/assets/demo/{asset}" in names
