"""GPT-mode operations with a backward, for training: the elementwise work of a layer in three fused ops.

    mixes, last = ln_mix_seq(x, shift, weight, bias, mix, out_dtype)      # a LayerNorm and its token-shift mixes
    w, k, v, a, b = wkv_pre(k, v, v_l, w_l, a_l, vec5, v_first, H, dtype)  # between the products and WKV
    out = wkv_post(y, r, k, v, g, vec3, H, dtype)                          # ln_x, the r_k bonus and the gate

x (B,T,C) is the residual stream, shift (B,C) the state's shift (the LayerNorm output of the position before
the sequence), mix (G,C). With xl = LayerNorm(x) and prev the position before (shift at t = 0):
mixes (G,B,T,C) = xl + (prev - xl) * mix[g], in out_dtype, and last = xl[:, -1] (B,C) fp32, the new shift.
It replaces, per time mix, a LayerNorm, the shift's concatenation, a subtraction and six multiply-adds, and
their backward (about thirty kernels over the whole activation, some of them strided copies) with two
kernels: ops/rwkv7's ln_mix_seq_ forward, and a backward that gives dx and dshift in one pass over the
positions and the parameters' gradients as partial sums.

wkv_pre and wkv_post are the time mix's arithmetic before and after the WKV kernel (ops/rwkv7/reference.py's
wkv_pre_ and wkv_post_, as the prefill runs them), each a forward kernel and a backward kernel that also
leaves partial sums for the per-channel parameters' gradients.

`reference`, `pre_reference` and `post_reference` are the same in PyTorch (what autograd differentiates;
the tests compare every gradient with them). `fused_train_enabled` says whether the model uses the kernels:
on CUDA where they can run, not inside torch.compile (inductor fuses the plain operations itself), unless
VISION_RWKV_FUSED_TRAIN=0.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .reference import LN_EPS


def reference(x, shift, weight, bias, mix, out_dtype):
    C = x.shape[-1]
    xl = F.layer_norm(x.float(), (C,), weight.float(), bias.float(), LN_EPS)
    prev = torch.cat([shift.float().unsqueeze(1), xl[:, :-1]], dim=1)
    out = xl.unsqueeze(0) + (prev - xl).unsqueeze(0) * mix.float()[:, None, None]
    return out.to(out_dtype), xl[:, -1]


class _LnMixSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, weight, bias, mix, out_dtype):
        from . import triton_step

        B, T, C = x.shape
        xf = x.float().contiguous()
        sf = shift.float().contiguous()
        last = sf.clone()  # ln_mix_seq_ reads it as the shift and leaves the last position's LayerNorm in it
        out = torch.empty(mix.shape[0], B, T, C, device=x.device, dtype=out_dtype)
        triton_step.ln_mix_seq_(xf, None, None, weight, bias, last, mix.contiguous(), out)
        ctx.save_for_backward(xf, sf, weight, bias, mix)
        ctx.dtypes = (x.dtype, shift.dtype, weight.dtype, bias.dtype, mix.dtype)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        from . import triton_step

        xf, sf, weight, bias, mix = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(mix.shape[0], *xf.shape, device=xf.device, dtype=xf.dtype)
        dx, dshift, dw, db, dmix = triton_step.ln_mix_seq_backward(
            xf, weight, bias, sf, mix.contiguous(), dout.contiguous(), None if dlast is None else dlast.contiguous())
        grads = (dx, dshift, dw, db, dmix)
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None)


def ln_mix_seq(x, shift, weight, bias, mix, out_dtype=None):
    """The kernels' op (see the module docstring); out_dtype None: x's dtype."""
    return _LnMixSeq.apply(x, shift, weight, bias, mix, out_dtype or x.dtype)


# Positions (B*T) from which the model uses the kernels. On an H200 (bench/train_lm.py, 2026-12-04, one run)
# the eager step at 8 x 1024 ran 1.29x faster with them, and at 64 x 64 (4,096 positions, a step bound by
# launching kernels from Python, where each Triton launch costs more than an aten one) 0.73x as fast.
FUSED_TRAIN_MIN_ROWS = 8192


def fused_train_enabled(x: torch.Tensor, head_size: int) -> bool:
    if os.environ.get("VISION_RWKV_FUSED_TRAIN", "1") == "0" or torch.compiler.is_compiling():
        return False
    if x.shape[0] * x.shape[1] < FUSED_TRAIN_MIN_ROWS:
        return False
    from . import unavailable_reason

    return unavailable_reason(x.device, head_size, x.shape[-1]) is None


# ---- the time mix around the WKV kernel -----------------------------------------------------------------

def pre_reference(k, v, v_l, w_l, a_l, vec5, v_first, n_head: int, out_dtype):
    """-> w (the raw decay logit), k, v, -kk, kk*a, each (M,C) in out_dtype: the model's arithmetic between
    its products and the WKV kernel. vec5 (5,C): w0, a0, v0, k_k, k_a; v_first None in layer 0."""
    w0, a0, v0, k_k, k_a = vec5.float()
    k, v = k.float(), v.float()
    if v_first is not None:
        v = v + (v_first.float() - v) * torch.sigmoid(v0 + v_l.float())
    a = torch.sigmoid(a0 + a_l.float())
    M, C = k.shape
    kk = F.normalize((k * k_k).view(M, n_head, C // n_head), dim=-1, p=2.0).view(M, C)
    k = k * (1 + (a - 1) * k_a)
    return tuple(t.to(out_dtype) for t in (w0 + w_l.float(), k, v, -kk, kk * a))


def post_reference(y, r, k, v, g, vec3, n_head: int, out_dtype):
    """-> (GroupNorm(y) + bonus) * g (M,C) in out_dtype; vec3 (3,C): r_k, ln_x's weight, its bias."""
    M, C = y.shape
    r_k, ln_w, ln_b = vec3.float()
    heads = lambda t: t.float().view(M, n_head, C // n_head)  # noqa: E731
    from .reference import LN_X_EPS

    out = F.group_norm(y.float(), n_head, ln_w, ln_b, LN_X_EPS)
    bonus = (heads(r) * heads(k) * heads(r_k.expand(M, C))).sum(-1, keepdim=True) * heads(v)
    return ((out + bonus.reshape(M, C)) * g.float()).to(out_dtype)


class _Pre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, v_l, w_l, a_l, vec5, v_first, n_head, out_dtype):
        from . import triton_step

        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        k, v, v_l, w_l, a_l, v_first = map(c, (k, v, v_l, w_l, a_l, v_first))
        out = torch.empty(5, *k.shape, device=k.device, dtype=out_dtype)
        triton_step.train_pre_forward(k, v, v_l, w_l, a_l, vec5.contiguous(), v_first, out, n_head)
        ctx.save_for_backward(k, v, v_l, a_l, vec5, v_first)
        ctx.n_head = n_head
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (k, v, v_l, w_l, a_l, vec5, v_first))
        ctx.set_materialize_grads(False)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        from . import triton_step

        k, v, v_l, a_l, vec5, v_first = ctx.saved_tensors
        d = torch.stack([torch.zeros_like(k) if g is None else g.to(k.dtype) for g in grads])
        dk, dv, dv_l, dw_l, da_l, dv_first, dvec = triton_step.train_pre_backward(
            k, v, v_l, a_l, vec5.contiguous(), v_first, d, ctx.n_head)
        out = (dk, dv, dv_l, dw_l, da_l, dvec, dv_first)
        return (*(None if g is None else g.to(dt) for g, dt in zip(out, ctx.dtypes)), None, None)


class _Post(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, r, k, v, g, vec3, n_head, out_dtype):
        from . import triton_step

        y, r, k, v, g = (t.contiguous() for t in (y, r, k, v, g))
        out = torch.empty(y.shape, device=y.device, dtype=out_dtype)
        triton_step.train_post_forward(y, r, k, v, g, vec3.contiguous(), out, n_head)
        ctx.save_for_backward(y, r, k, v, g, vec3)
        ctx.n_head = n_head
        return out

    @staticmethod
    def backward(ctx, d):
        from . import triton_step

        y, r, k, v, g, vec3 = ctx.saved_tensors
        grads = triton_step.train_post_backward(y, r, k, v, g, vec3.contiguous(), d.contiguous(), ctx.n_head)
        return (*(gr.to(t.dtype) for gr, t in zip(grads, (y, r, k, v, g, vec3))), None, None)


def wkv_pre(k, v, v_l, w_l, a_l, vec5, v_first, n_head: int, out_dtype):
    """pre_reference through the kernels, with their backward. Tensors (M,C); v_l and v_first None in layer 0."""
    return _Pre.apply(k, v, v_l, w_l, a_l, vec5, v_first, n_head, out_dtype)


def wkv_post(y, r, k, v, g, vec3, n_head: int, out_dtype):
    """post_reference through the kernels, with their backward."""
    return _Post.apply(y, r, k, v, g, vec3, n_head, out_dtype)
