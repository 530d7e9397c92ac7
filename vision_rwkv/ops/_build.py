"""The one lazy build of our compiled kernels, shared by every op that has them: the CUDA kernels
(wkv7/cuda.py, wkv4/cuda.py) and the CPU ones (kernels/rwkv7_cpu.cpp: rwkv7/cpu_step.py, wkv7/cpu.py;
kernels/rwkv4_cpu.cpp: lm/engine4.py; both on kernels/cpu_common.h), one library.

Sources are found beside the installed package (a wheel ships them as vision_rwkv/kernels/) or in the
source checkout's kernels/ folder. Each build goes to a cache folder keyed by its sources, torch, and
CUDA with the target architectures (CUDA builds) or the CPU's instruction sets (CPU builds, which are
compiled for the machine that runs them), so it happens once per machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
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


def cpu_flags() -> str:
    """The CPU's model and instruction-set flags (Linux), else the platform's processor name: what a build
    with -march=native depends on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags")]
    return "|".join(dict.fromkeys(keep))  # the first core's lines; the others repeat them


def _cpp_extension_load():
    """torch.utils.cpp_extension.load, imported without the warning the import logs on a machine with a CUDA
    toolkit and no CUDA runtime (which would reach the standard error of every CPU command)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)
    return load


def build_extension(tag: str, sources: tuple[str, ...], headers: tuple[str, ...] = (), cuda: bool = True) -> str | None:
    """Compile and load kernels/<sources> as the library vision_rwkv_<tag>_<hash>, registering its ops.
    cuda: nvcc builds for the CUDA architectures; else a C++ build for this machine's CPU (-march=native,
    OpenMP through torch's own runtime). Returns None on success, or why it failed (one line)."""
    if cuda and torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    src = kernel_dir(sources + headers)
    if src is None:
        return f"the kernel sources (kernels/{sources[-1]}) are not installed with the package"
    if cuda and nvcc() is None:
        return "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    digest = hashlib.sha256()
    for name in sources + headers:
        digest.update((src / name).read_bytes())
    if cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if not arch and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch = f"{major}.{minor}"
        digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch}".encode())
        cflags = ["-O3"]
    else:
        digest.update(f"{torch.__version__}|{cpu_flags()}".encode())
        cflags = ["-O3", "-march=native", "-fopenmp"]
    name = f"vision_rwkv_{tag}_{digest.hexdigest()[:12]}"
    build_dir = cache_root() / name
    library = build_dir / f"{name}.so"
    if library.is_file():  # built before, by this process or another: the name is the hash of what went in
        try:
            torch.ops.load_library(str(library))
            return None
        except OSError:  # a damaged file: build it again
            pass
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        _cpp_extension_load()(
            name=name,
            sources=[str(src / s) for s in sources],
            build_directory=str(build_dir),
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "-Xptxas=-O3", "-lineinfo"],
            extra_ldflags=[] if cuda else ["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("VISION_RWKV_BUILD_VERBOSE") == "1",
        )
    except Exception as e:  # a compiler failure, or no compiler: keep its first error line for the warning
        kind = "CUDA kernel" if cuda else "CPU kernel"
        return f"the {kind} failed to build: {first_error_line(str(e)) or type(e).__name__}"
    return None


CPU_SOURCES = ("rwkv7_cpu.cpp", "rwkv4_cpu.cpp")
CPU_HEADERS = ("cpu_common.h",)
CPU_KERNELS_OFF = "switched off (VISION_RWKV_CPU_KERNELS=0)"
_cpu_lock = threading.Lock()
_cpu_built: list[str | None] = []  # [why the CPU build failed, or None], once tried in this process


def cpu_kernels() -> str | None:
    """Build (once a machine) and load (once a process) the CPU kernels, ops torch.ops.vision_rwkv_cpu.*.
    Returns None when they are loaded, or why they could not be (one line): CPU_KERNELS_OFF when the
    environment switches them off, which their users take without a warning."""
    if os.environ.get("VISION_RWKV_CPU_KERNELS", "1") == "0":
        return CPU_KERNELS_OFF
    with _cpu_lock:
        if not _cpu_built:
            reason = build_extension("cpu", CPU_SOURCES, CPU_HEADERS, cuda=False)
            if reason is None:
                _register_cpu_fakes()
            _cpu_built.append(reason)
        return _cpu_built[0]


def cpu_forward_unavailable(first: torch.Tensor, *others: torch.Tensor | None,
                            dtypes: tuple = (torch.float32,), takes: str = "fp32") -> str | None:
    """Why a forward-only CPU recurrence kernel (wkv7/cpu.py, wkv4/cpu.py) cannot serve these inputs (`first`,
    whose device and dtype stand for all, and the others, None allowed), the build aside, or None. dtypes: the
    input dtypes it serves, `takes` naming them."""
    if first.device.type != "cpu":
        return f"inputs are on {first.device.type}, not the CPU"
    if first.dtype not in dtypes:
        return f"inputs are {first.dtype}; the CPU kernel takes {takes}"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (first, *others)):
        return "gradients are needed, and the CPU kernel is forward only"
    return None


def _register_cpu_fakes() -> None:
    """Shapes-only versions of the CPU ops, so torch.compile can trace a model through them: the in-place
    ops return nothing, wkv7_forward and wkv4_forward what they allocate."""
    if getattr(_register_cpu_fakes, "done", False):
        return
    for name in ("ln_mix_matmul_", "linear_", "wkv_step_", "ln_mix_seq_", "wkv_pre_", "wkv_post_", "relu2_",
                 "lora_act_", "step_fused_", "rwkv4_step_fused_"):
        torch.library.register_fake(f"vision_rwkv_cpu::{name}", lambda *args, **kw: None)

    @torch.library.register_fake("vision_rwkv_cpu::wkv7_forward")
    def _wkv7_forward(r, d, k, v, a, b, s0):
        B, _, H, N = r.shape
        return torch.empty_like(r), r.new_empty((B, H, N, N), dtype=torch.float32)

    @torch.library.register_fake("vision_rwkv_cpu::wkv4_forward")
    def _wkv4_forward(w, u, k, v, num, den, max_, max_init):
        B, _, C = k.shape
        return (torch.empty_like(k),) + tuple(k.new_empty((B, C)) for _ in range(3))

    _register_cpu_fakes.done = True
