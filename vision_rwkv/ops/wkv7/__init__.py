"""The single door to the WKV-7 recurrence: ``wkv7(r, w, k, v, a, b, state) -> (y, state)``.

Shapes: r, w, k, v, a, b are (B, T, H, N); state is (B, H, N, N) in fp32, indexed [value, key].
w is the raw decay logit (decay = exp(-exp(-0.5) * sigmoid(w))); a and b are the model's -kk and kk*a.
y comes back in r's dtype and the final state in fp32 (fp64 for fp64 inputs).

Implementations: "reference" (per step), "chunked" (fast PyTorch, differentiable), "cuda" (the custom
kernel, the default for CUDA tensors once it is available) and "cpu" (a C++ kernel, forward only, the
default for fp32 CPU inputs that need no gradients). "auto" picks the fastest that runs.
"""

from __future__ import annotations

import warnings

import torch

from ...errors import VisionRWKVError
from .chunked import wkv7_chunked
from .reference import log_decay, wkv7_reference, wkv7_step

__all__ = ["wkv7", "wkv7_reference", "wkv7_chunked", "wkv7_step", "log_decay", "cuda_unavailable_reason",
           "cpu_unavailable_reason"]

_warned: set[str] = set()


def cuda_unavailable_reason(r: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot serve these inputs, or None when it can."""
    if r.device.type != "cuda":
        return f"inputs are on {r.device.type}, not CUDA"
    from . import cuda as cuda_impl

    return cuda_impl.unavailable_reason() or cuda_impl.unsupported(r)


def _check(r, w, k, v, a, b, state):
    shape = r.shape
    if r.dim() != 4:
        raise VisionRWKVError(f"wkv7 expects r, w, k, v, a, b of shape (B, T, H, N), got r of shape {tuple(shape)}")
    for name, x in zip("wkvab", (w, k, v, a, b)):
        if x.shape != shape:
            raise VisionRWKVError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} like r")
    B, _, H, N = shape
    if state is not None and tuple(state.shape) != (B, H, N, N):
        raise VisionRWKVError(f"wkv7: state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")


def _note_fallback(reason: str, device_type: str) -> None:
    """CPU inputs are the caller's choice: no news. CUDA inputs the kernel cannot serve: one warning per reason."""
    if device_type == "cuda" and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"vision_rwkv: WKV-7 runs on the slower PyTorch path: {reason}", stacklevel=3)


def cpu_unavailable_reason(r, w, k, v, a, b, state=None) -> str | None:
    """Why the CPU kernel cannot serve these inputs, or None when it can."""
    from . import cpu as cpu_impl

    return cpu_impl.unavailable_reason(r, w, k, v, a, b, state)


def wkv7(r, w, k, v, a, b, state=None, *, impl: str = "auto"):
    """Run the recurrence over T steps. See the module docstring for shapes and meaning."""
    _check(r, w, k, v, a, b, state)
    reason = None  # why the kernel asked for (or the device's own, for "auto") cannot run
    if impl in ("auto", "cpu", "cuda"):
        kernel = impl if impl != "auto" else "cpu" if r.device.type == "cpu" else "cuda"
        reason = cpu_unavailable_reason(r, w, k, v, a, b, state) if kernel == "cpu" else cuda_unavailable_reason(r)
        if impl == "auto":
            impl = kernel if reason is None else "chunked"
            if reason is not None:
                _note_fallback(reason, r.device.type)
        elif reason is not None:
            raise VisionRWKVError(f"wkv7 impl {impl!r} was asked for but cannot run: {reason}")
    if impl == "cpu":
        from . import cpu as cpu_impl

        return cpu_impl.wkv7_cpu(r, w, k, v, a, b, state)
    if impl == "chunked":
        return wkv7_chunked(r, w, k, v, a, b, state)
    if impl == "reference":
        return wkv7_reference(r, w, k, v, a, b, state)
    if impl == "cuda":
        from . import cuda as cuda_impl

        return cuda_impl.wkv7_cuda(r, w, k, v, a, b, state)
    raise VisionRWKVError(f"wkv7 impl is {impl!r}; expected auto, cuda, cpu, chunked or reference")
