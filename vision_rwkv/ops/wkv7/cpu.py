"""The WKV-7 recurrence on the CPU, forward only: kernels/rwkv7_cpu.cpp's wkv7_forward, built on first use
for this machine (../_build.py, with the CPU step's kernels).

GPT mode's inference on the CPU (a prefill, a prompt, an image prefix) runs it: one head per thread task,
on a transposed copy of its state so that every product runs down contiguous columns; 5.4 to 10.3x the
chunked PyTorch form's speed at H=8 and 12, N=64 on 2 cores (bench/wkv7_cpu.py, BENCHMARKS.md, 2026-12-05).
fp32 inputs and no gradients; the chunked form serves the rest.
"""

from __future__ import annotations

import torch

from .. import _build
from .reference import log_decay


def unavailable_reason(r: torch.Tensor, *inputs: torch.Tensor) -> str | None:
    """Why the kernel cannot serve these inputs (r and the others, with the state if any), or None when it can."""
    if r.device.type != "cpu":
        return f"inputs are on {r.device.type}, not the CPU"
    if r.dtype != torch.float32:
        return f"inputs are {r.dtype}; the CPU kernel takes fp32"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (r, *inputs)):
        return "gradients are needed, and the CPU kernel is forward only"
    return _built()


@torch.compiler.assume_constant_result  # torch.compile takes the answer at trace time, not the build's file I/O
def _built() -> str | None:
    return _build.cpu_kernels()


def wkv7_cpu(r, w, k, v, a, b, state=None):
    """wkv7's contract (see __init__.py) for fp32 CPU inputs without gradients."""
    decay = torch.exp(log_decay(w))  # fp32
    inputs = [t.float().contiguous() for t in (r, decay, k, v, a, b)]
    s0 = None if state is None else state.float().contiguous()
    return torch.ops.vision_rwkv_cpu.wkv7_forward(*inputs, s0)
