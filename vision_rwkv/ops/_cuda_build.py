"""The one lazy build of our CUDA kernels, shared by every op that has one (wkv7/cuda.py, wkv4/cuda.py).

Sources are found beside the installed package (a wheel ships them as vision_rwkv/kernels/) or in the
source checkout's kernels/ folder. Each build goes to a cache folder keyed by its sources, torch, CUDA
and the target architectures, so it happens once per machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch


def kernel_dir(files: tuple[str, ...]) -> Path | None:
    """The folder that holds every one of these kernel files, or None."""
    package = Path(__file__).resolve().parents[1]  # .../vision_rwkv
    for candidate in (package / "kernels", package.parent / "kernels"):
        if all((candidate / f).is_file() for f in files):
            return candidate
    return None


def nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cache_root() -> Path:
    root = os.environ.get("VISION_RWKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vision_rwkv")
    return Path(root) / "torch_extensions"


def first_error_line(log: str) -> str:
    """The compiler's first 'error' line in a build log (torch's own summary line last)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    compiler = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("Error building extension")]
    return (compiler or lines or [""])[0]


def build_extension(tag: str, sources: tuple[str, ...], headers: tuple[str, ...] = ()) -> str | None:
    """Compile and load kernels/<sources> as the library vision_rwkv_<tag>_<hash>, registering its ops.
    Returns None on success, or why it failed (one line)."""
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    src = kernel_dir(sources + headers)
    if src is None:
        return f"the kernel sources (kernels/{sources[-1]}) are not installed with the package"
    if nvcc() is None:
        return "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256()
    for name in sources + headers:
        digest.update((src / name).read_bytes())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not arch and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch}".encode())
    name = f"vision_rwkv_{tag}_{digest.hexdigest()[:12]}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=name,
            sources=[str(src / s) for s in sources],
            build_directory=str(build_dir),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-Xptxas=-O3", "-lineinfo"],
            is_python_module=False,
            verbose=os.environ.get("VISION_RWKV_BUILD_VERBOSE") == "1",
        )
    except Exception as e:  # a compiler failure: keep its first error line for the warning
        return f"the CUDA kernel failed to build: {first_error_line(str(e)) or type(e).__name__}"
    return None
