"""The custom CUDA WKV-4 kernel: built on first use, then called through torch.ops.vision_rwkv.

The sources (kernels/wkv4.cu, kernels/wkv4_op.cpp) are built by ../_build.py, like the WKV-7 kernel;
the two libraries load side by side (the WKV-4 ops are a fragment of the vision_rwkv namespace).
"""

from __future__ import annotations

import functools

import torch

from .. import _build

__all__ = ["build", "unavailable_reason", "unsupported", "wkv4_cuda", "SOURCES", "CKPT"]

SOURCES = ("wkv4_op.cpp", "wkv4.cu")
CKPT = 8  # steps per state checkpoint; matches wkv4::CKPT in kernels/wkv4.cu
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def build() -> str | None:
    """Compile and load the ops. Returns None on success, or why it failed (one line)."""
    reason = _build.build_extension("wkv4", SOURCES)
    if reason is None:
        _register_fakes()
    return reason


def _register_fakes() -> None:
    """Shapes-only versions of the two ops (what wkv4_op.cpp allocates), so torch.compile can trace them."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("vision_rwkv::wkv4_forward")
    def _forward(w, u, k, v, num0, den0, max0, save_for_backward: bool):
        B, T, C = k.shape
        f32 = dict(dtype=torch.float32, device=k.device)
        ckpt = k.new_empty((B if save_for_backward else 0, (T + CKPT - 1) // CKPT, 3, C), **f32)
        return torch.empty_like(k), k.new_empty((B, C), **f32), k.new_empty((B, C), **f32), \
            k.new_empty((B, C), **f32), ckpt

    @torch.library.register_fake("vision_rwkv::wkv4_backward")
    def _backward(w, u, k, v, num0, den0, numT, denT, ckpt, gy, gnumT, gdenT, gmaxT, need_dstate: bool):
        B, T, C = k.shape
        f32 = dict(dtype=torch.float32, device=k.device)
        nB = B if need_dstate else 0
        return (k.new_empty((C,), **f32), k.new_empty((C,), **f32), torch.empty_like(k), torch.empty_like(k),
                k.new_empty((nB, C), **f32), k.new_empty((nB, C), **f32), k.new_empty((nB, C), **f32))

    _register_fakes.done = True


@torch.compiler.assume_constant_result  # torch.compile takes the answer at trace time, not the build's file I/O
def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return build()


def unsupported(k: torch.Tensor) -> str | None:
    """Why these inputs cannot use the kernel (dtype), or None. Any T, B and C run."""
    if k.dtype not in DTYPES:
        return f"dtype {k.dtype} has no kernel (compiled: float32, bfloat16, float16)"
    return None


class WKV4Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, num0, den0, max0):
        save = any(ctx.needs_input_grad)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero tensor to read)
        y, numT, denT, maxT, ckpt = torch.ops.vision_rwkv.wkv4_forward(w, u, k, v, num0, den0, max0, save)
        if save:
            ctx.save_for_backward(w, u, k, v, num0, den0, numT, denT, ckpt)
        return y, numT, denT, maxT

    @staticmethod
    def backward(ctx, gy, gnumT, gdenT, gmaxT):
        w, u, k, v, num0, den0, numT, denT, ckpt = ctx.saved_tensors
        if gy is None and gnumT is None and gdenT is None and gmaxT is None:
            return (None,) * 7
        gy = None if gy is None else gy.to(k.dtype).contiguous()
        gnumT, gdenT, gmaxT = (None if g is None else g.float().contiguous() for g in (gnumT, gdenT, gmaxT))
        need_dstate = num0 is not None and any(ctx.needs_input_grad[4:7])
        gw, gu, gk, gv, gnum0, gden0, gmax0 = torch.ops.vision_rwkv.wkv4_backward(
            w, u, k, v, num0, den0, numT, denT, ckpt, gy, gnumT, gdenT, gmaxT, need_dstate
        )
        if not need_dstate:
            gnum0 = gden0 = gmax0 = None
        return gw, gu, gk, gv, gnum0, gden0, gmax0


def wkv4_cuda(w, u, k, v, state=None):
    """Same contract as wkv4_reference, on CUDA tensors: y in k's dtype, the final (num, den, max) in fp32."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    k = k.contiguous()
    v = v.to(k.dtype).contiguous()
    w, u = (x.float().contiguous() for x in (w, u))
    num0, den0, max0 = (None, None, None) if state is None else (x.float().contiguous() for x in state)
    y, numT, denT, maxT = WKV4Function.apply(w, u, k, v, num0, den0, max0)
    return y, (numT, denT, maxT)
