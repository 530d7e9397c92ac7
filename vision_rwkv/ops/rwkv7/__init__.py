"""The fused RWKV-7 layer operations, for RNN mode and GPT mode: Triton kernels, C++ kernels for the CPU
step, and the PyTorch references beside them (reference.py; train.py has GPT mode's op with a backward,
for training).

    ops = step_ops(device, head_size, n_embd, dtype)   # triton_step on CUDA, cpu_step on the CPU, when
    ops.ln_mix_(x, dx, w, b, shift, mix, out)           # they can run; else reference
    ops.wkv_step_(...); ...

The modules have the same functions with the same in-place contract (see reference.py). `step_ops` returns
the reference, with one warning per reason, when the kernels cannot serve a decoder: on CUDA, Triton missing
or an unsupported shape; on the CPU, a failed build (products in another dtype than fp32 or bf16, and
VISION_RWKV_CPU_KERNELS=0, take the reference without a warning). Set TRITON_INTERPRET=1 to run the Triton
kernels on CPU tensors, as the tests do.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

from .. import _build
from . import reference

__all__ = ["step_ops", "unavailable_reason", "reference"]

_warned: set[str] = set()


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (slowly): how the tests check them without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        from . import triton_step  # noqa: F401
    except Exception as e:  # ImportError, or a Triton too old for these kernels
        return f"Triton cannot be used ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def unavailable_reason(device: torch.device, head_size: int, n_embd: int) -> str | None:
    """Why the Triton kernels cannot serve a decoder of this shape on this device, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"the decoder is on {device.type}, not CUDA"
    if head_size & (head_size - 1) or not 4 <= head_size <= 128:
        return f"head size {head_size} is not a power of two from 4 to 128"
    if n_embd % 16:
        return f"n_embd {n_embd} is not a multiple of 16 (the kernels' products take columns 16 at a time)"
    if n_embd > 16384:
        return f"n_embd {n_embd} is above the kernels' 16384 (one row per program)"
    return _import_error()


def step_ops(device, head_size: int, n_embd: int, dtype: torch.dtype | None = None) -> ModuleType:
    """The module whose functions run the step: triton_step (CUDA), cpu_step (the CPU, products in fp32 or
    bf16: dtype None means fp32), or reference when the kernels cannot."""
    device = torch.device(device)
    if device.type == "cpu" and not interpreting():
        from . import cpu_step

        dtype = torch.float32 if dtype is None else dtype
        reason = cpu_step.unavailable_reason(dtype)
        if reason is None:
            return cpu_step
        # a failed build says so once; other dtypes, and the kernels switched off, take the reference quietly
        if dtype in cpu_step.WEIGHT_DTYPES and reason != _build.CPU_KERNELS_OFF:
            _warn_once(f"the RNN step runs its PyTorch reference ops on the CPU: {reason}")
        return reference
    reason = unavailable_reason(device, head_size, n_embd)
    if reason is None:
        from . import triton_step

        return triton_step
    if device.type == "cuda":
        _warn_once(f"the RNN step runs its PyTorch reference ops: {reason}")
    return reference


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"vision_rwkv: {message}", stacklevel=3)
