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


def unavailable_reason(r: torch.Tensor, *inputs: torch.Tensor | None) -> str | None:
    """Why the kernel cannot serve these inputs (r and the others, with the state if any), or None when it can."""
    return _build.cpu_forward_unavailable(r, *inputs) or _built()


# torch.compile takes the answer at trace time, not the build's file I/O. Applied here, on this module's import
# (a kernel's first use), not in _build: the decorator imports torch._dynamo, which `import vision_rwkv` must
# not (with torch._dynamo imported first, the Triton kernels' tests under Triton's interpreter fail)
@torch.compiler.assume_constant_result
def _built() -> str | None:
    return _build.cpu_kernels()


def wkv7_cpu(r, w, k, v, a, b, state=None):
    """wkv7's contract (see __init__.py) for fp32 CPU inputs without gradients."""
    decay = torch.exp(log_decay(w))  # fp32
    inputs = [t.float().contiguous() for t in (r, decay, k, v, a, b)]
    s0 = None if state is None else state.float().contiguous()
    return torch.ops.vision_rwkv_cpu.wkv7_forward(*inputs, s0)
