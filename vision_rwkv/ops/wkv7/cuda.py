"""The custom CUDA WKV-7 kernel: built on first use, then called through torch.ops.vision_rwkv.

The sources (kernels/wkv7.cu, kernels/wkv7_chunk.cu, kernels/wkv7_common.h, kernels/wkv7_op.cpp) are
built by ../_build.py (found beside the package or in the checkout, cached by their hash).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import _build
from .._build import cache_root, first_error_line

__all__ = ["build", "kernel_dir", "cache_root", "first_error_line", "unavailable_reason", "unsupported",
           "pick_layout", "tensor_cores_fit", "wkv7_cuda", "SOURCES", "HEADERS", "CHUNK", "TENSOR_CORES"]

SOURCES = ("wkv7_op.cpp", "wkv7.cu", "wkv7_chunk.cu")
HEADERS = ("wkv7_common.h",)
CHUNK = 16  # steps per state checkpoint; matches wkv7::CHUNK in the .cu files
# Head size -> compiled layouts. 0-2 are the row kernels of kernels/wkv7.cu (see its dispatch table;
# 64: 0 = 8 lanes per row x 2 rows per thread, 1 = 8 x 4, 2 = 4 x 2); 3 is the tensor-core chunked
# kernel of kernels/wkv7_chunk.cu (head size 64; tf32 products, so bf16/fp16 inputs by default).
TENSOR_CORES = 3
# Layout 3 needs tf32 mma.sync (compute capability 8.0+) and, for its backward, this much shared memory
# per block (BACKWARD_SMEM in kernels/wkv7_chunk.cu): just under the 99 KB (101,376 bytes) that the
# smallest sm_8x/9x parts (sm_86, sm_89) allow.
TENSOR_CORE_SMEM = 99_584
HEAD_SIZES = {16: (0,), 32: (0,), 64: (0, 1, 2, TENSOR_CORES)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_dir() -> Path | None:
    return _build.kernel_dir(SOURCES + HEADERS)


@functools.lru_cache(maxsize=1)
def build() -> str | None:
    """Compile and load the ops. Returns None on success, or why it failed (one line)."""
    reason = _build.build_extension("wkv7", SOURCES, HEADERS)
    if reason is None:
        _register_fakes()
    return reason


TENSOR_CORE_SAVED = 2816  # floats the tensor-core forward saves per chunk and head (kernels/wkv7_op.cpp)


def _saved_numel(B: int, T: int, H: int, N: int, layout: int) -> int:
    n_ckpt = (T + CHUNK - 1) // CHUNK
    return B * H * n_ckpt * TENSOR_CORE_SAVED if layout == TENSOR_CORES else B * T * H * N


def _register_fakes() -> None:
    """Shapes-only versions of the two ops (what wkv7_op.cpp allocates), so torch.compile can trace a model
    through them: FakeTensors go in, outputs of the right shapes, dtypes and devices come out."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("vision_rwkv::wkv7_forward")
    def _forward(r, w, k, v, a, b, s0, save_for_backward: bool, layout: int):
        B, T, H, N = r.shape
        f32 = dict(dtype=torch.float32, device=r.device)
        sa = r.new_empty((_saved_numel(B, T, H, N, layout) if save_for_backward else 0,), **f32)
        ckpt = r.new_empty((B, H, (T + CHUNK - 1) // CHUNK, N, N) if save_for_backward else (0,), **f32)
        return torch.empty_like(r), r.new_empty((B, H, N, N), **f32), sa, ckpt

    @torch.library.register_fake("vision_rwkv::wkv7_backward")
    def _backward(r, w, k, v, a, b, dy, dsT, sa, ckpt, sT, zero_s0: bool, need_ds0: bool, layout: int):
        B, T, H, N = r.shape
        ds0 = r.new_empty((B if need_ds0 else 0, H, N, N), dtype=torch.float32)
        return tuple(torch.empty_like(r) for _ in range(6)) + (ds0,)

    _register_fakes.done = True


@torch.compiler.assume_constant_result  # torch.compile takes the answer at trace time, not the build's file I/O
def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return build()


def unsupported(r: torch.Tensor) -> str | None:
    """Why these inputs cannot use the kernel (shape or dtype), or None."""
    N = r.shape[-1]
    if N not in HEAD_SIZES:
        return f"head size {N} has no kernel (compiled: {', '.join(map(str, HEAD_SIZES))})"
    if r.dtype not in DTYPES:
        return f"dtype {r.dtype} has no kernel"
    return None


@torch.compiler.assume_constant_result  # a constant of the shapes: torch.compile records the answer
def pick_layout(B: int, H: int, N: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> int:
    """The kernel for this shape and dtype, from the H100 measurements in BENCHMARKS.md.

    N = 64 with bf16 or fp16 inputs, on a GPU that can run it (tensor_cores_fit): the tensor-core
    chunked kernel (layout 3), faster than the row kernels at every benchmark shape. Its matrix
    products read tf32 operands, finer than those inputs but coarser than fp32, so fp32 inputs keep
    the row kernels: with few heads per multiprocessor the recurrence is latency-bound and layout 2
    (4 lanes per row, short shuffle trees) wins; with many (B*H >= 4 per multiprocessor, e.g. 64x12
    captioning batches) layout 1 (4 rows per thread) wins. Other head sizes have one layout.
    (Layout 3 was measured on the H100 only; the 99 KB parts, sm_86/89, fit one of its blocks per SM.)
    """
    if N != 64:
        return HEAD_SIZES[N][0]
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    if dtype in (torch.bfloat16, torch.float16) and tensor_cores_fit(props):
        return TENSOR_CORES
    return 1 if B * H >= 4 * props.multi_processor_count else 2


def tensor_cores_fit(props) -> bool:
    """Whether a GPU (its torch device properties) can run layout 3; otherwise the row kernels serve it."""
    if props.major < 8:
        return False
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # a torch without the field: every part of compute capability 8.0+ has >= 99 KB
        return True
    return optin >= TENSOR_CORE_SMEM


class WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, layout):
        save = any(ctx.needs_input_grad[:7])
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero tensor to read)
        y, sT, sa, ckpt = torch.ops.vision_rwkv.wkv7_forward(r, w, k, v, a, b, s0, save, layout)
        if save:  # (layout 3's backward reads the final state from the output itself)
            ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt, sT)
        ctx.has_s0 = s0 is not None
        ctx.layout = layout
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, sa, ckpt, sT = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        dr, dw, dk, dv, da, db, ds0 = torch.ops.vision_rwkv.wkv7_backward(
            r, w, k, v, a, b, dy, dsT, sa, ckpt, sT, not ctx.has_s0, ctx.has_s0 and ctx.needs_input_grad[6],
            ctx.layout,
        )
        ds0 = ds0 if ctx.has_s0 and ctx.needs_input_grad[6] else None
        return dr, dw, dk, dv, da, db, ds0, None


def wkv7_cuda(r, w, k, v, a, b, state=None, layout: int | None = None):
    """Same contract as wkv7_reference, on CUDA tensors."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    B, T, H, N = r.shape
    dt = r.dtype
    r, w, k, v, a, b = (x.to(dt).contiguous() for x in (r, w, k, v, a, b))
    s0 = None if state is None else state.float().contiguous()
    layout = pick_layout(B, H, N, r.device, dt) if layout is None else layout
    return WKV7Function.apply(r, w, k, v, a, b, s0, layout)
