"""The single door to the WKV-4 recurrence: ``wkv4(w, u, k, v, state) -> (y, state)``.

Shapes: w and u are (C,) (w = -exp(time_decay), the per-channel log decay; u = time_first, the bonus of
the current token); k and v are (B, T, C); the state is the triple (num, den, max), each (B, C) in fp32
(see reference.py for the math). y comes back in k's dtype, the final state in fp32.

Implementations: "reference" (per step, in PyTorch), "cuda" (the custom kernel, the default for CUDA
tensors once it builds) and "cpu" (a C++ kernel, forward only, computing in fp32 as the reference does: the
default for fp32, bf16 and fp16 CPU inputs that need no gradients, GPT mode's inference). "auto" picks the
fastest that runs.
"""

from __future__ import annotations

import warnings

import torch

from ...errors import VisionRWKVError
from .reference import MAX_INIT, fresh_state, wkv4_reference, wkv4_step

__all__ = ["wkv4", "wkv4_reference", "wkv4_step", "fresh_state", "MAX_INIT", "cuda_unavailable_reason",
           "cpu_unavailable_reason"]

IMPLS = ("auto", "cuda", "cpu", "reference")
_warned: set[str] = set()


def cuda_unavailable_reason(k: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot serve these inputs, or None when it can."""
    if k.device.type != "cuda":
        return f"inputs are on {k.device.type}, not CUDA"
    from . import cuda as cuda_impl

    return cuda_impl.unavailable_reason() or cuda_impl.unsupported(k)


def cpu_unavailable_reason(k: torch.Tensor, *inputs) -> str | None:
    """Why the CPU kernel cannot serve these inputs (k, and the others with the state's tensors), or None."""
    from . import cpu as cpu_impl

    return cpu_impl.unavailable_reason(k, *inputs)


def _check(w, u, k, v, state):
    if k.dim() != 3:
        raise VisionRWKVError(f"wkv4 expects k and v of shape (B, T, C), got k of shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise VisionRWKVError(f"wkv4: v has shape {tuple(v.shape)}, expected {tuple(k.shape)} like k")
    B, _, C = k.shape
    for name, x in (("w", w), ("u", u)):
        if tuple(x.shape) != (C,):
            raise VisionRWKVError(f"wkv4: {name} has shape {tuple(x.shape)}, expected ({C},)")
    if state is not None:
        if len(state) != 3 or any(tuple(x.shape) != (B, C) for x in state):
            got = [tuple(x.shape) for x in state]
            raise VisionRWKVError(f"wkv4: the state must be (num, den, max), each of shape {(B, C)}; got {got}")


def _note_fallback(reason: str, device_type: str) -> None:
    """CPU inputs are the caller's choice: no news. CUDA inputs the kernel cannot serve: one warning per reason."""
    if device_type == "cuda" and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"vision_rwkv: WKV-4 runs on the slower PyTorch path: {reason}", stacklevel=3)


def wkv4(w, u, k, v, state=None, *, impl: str = "auto"):
    """Run the recurrence over T steps. See the module docstring for shapes and meaning."""
    _check(w, u, k, v, state)
    if impl in ("auto", "cpu", "cuda"):  # the kernel asked for, or the device's own for "auto": checked once
        kernel = impl if impl != "auto" else "cpu" if k.device.type == "cpu" else "cuda"
        reason = cpu_unavailable_reason(k, w, u, v, *(state or ())) if kernel == "cpu" else cuda_unavailable_reason(k)
        if impl == "auto":
            impl = kernel if reason is None else "reference"
            if reason is not None:
                _note_fallback(reason, k.device.type)
        elif reason is not None:
            raise VisionRWKVError(f"wkv4 impl {impl!r} was asked for but cannot run: {reason}")
    if impl == "reference":
        return wkv4_reference(w, u, k, v, state)
    if impl == "cpu":
        from . import cpu as cpu_impl

        return cpu_impl.wkv4_cpu(w, u, k, v, state)
    if impl == "cuda":
        from . import cuda as cuda_impl

        return cuda_impl.wkv4_cuda(w, u, k, v, state)
    raise VisionRWKVError(f"wkv4 impl is {impl!r}; expected one of {', '.join(IMPLS)}")
