"""The WKV-4 recurrence on the CPU, forward only: kernels/rwkv4_cpu.cpp's wkv4_forward, built on first use
for this machine (../_build.py, with the CPU step's kernels).

GPT mode's inference on the CPU (an RWKV-4 decoder's image prefix or prompt) runs it: each row's channels
in blocks of 64 through every position, 16 at a time with their state in registers, where the reference
launches a dozen PyTorch operations a position. Inputs in fp32, bf16 or fp16 (computed in fp32, as the
reference computes them) that need no gradients; the reference serves the rest (fp64, gradients).
"""

from __future__ import annotations

import torch

from .. import _build
from .reference import MAX_INIT

# what it serves: the reference computes every one of these in fp32 (fp64 inputs, in fp64, stay with it)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(k: torch.Tensor, *inputs: torch.Tensor | None) -> str | None:
    """Why the kernel cannot serve these inputs (k and the others, the state's tensors included), or None."""
    return _build.cpu_forward_unavailable(k, *inputs, dtypes=DTYPES, takes="fp32, bf16 or fp16") or _built()


# torch.compile takes the answer at trace time, not the build's file I/O. Applied here, on this module's import
# (a kernel's first use), not in _build: the decorator imports torch._dynamo, which `import vision_rwkv` must
# not (with torch._dynamo imported first, the Triton kernels' tests under Triton's interpreter fail)
@torch.compiler.assume_constant_result
def _built() -> str | None:
    return _build.cpu_kernels()


def wkv4_cpu(w, u, k, v, state=None):
    """wkv4's contract (see __init__.py) for CPU inputs in DTYPES without gradients: computed in fp32, as the
    reference computes them, y returned in k's dtype."""
    dtype = k.dtype
    w, u, k, v = (t.float().contiguous() for t in (w, u, k, v))
    s = (None, None, None) if state is None else tuple(t.float().contiguous() for t in state)
    y, num, den, mx = torch.ops.vision_rwkv_cpu.wkv4_forward(w, u, k, v, *s, MAX_INIT)
    return y.to(dtype), (num, den, mx)
