"""GPT-mode operations with a backward, for training: a LayerNorm and its token-shift mixes in one op.

    mixes, last = ln_mix_seq(x, shift, weight, bias, mix, out_dtype)

x (B,T,C) is the residual stream, shift (B,C) the state's shift (the LayerNorm output of the position before
the sequence), mix (G,C). With xl = LayerNorm(x) and prev the position before (shift at t = 0):
mixes (G,B,T,C) = xl + (prev - xl) * mix[g], in out_dtype, and last = xl[:, -1] (B,C) fp32, the new shift.
It replaces, per time mix, a LayerNorm, the shift's concatenation, a subtraction and six multiply-adds, and
their backward (about thirty kernels over the whole activation, some of them strided copies) with two
kernels: ops/rwkv7's ln_mix_seq_ forward, and a backward that gives dx and dshift in one pass over the
positions and the parameters' gradients as partial sums.

`reference` is the same in PyTorch (what autograd differentiates; the tests compare every gradient with
it). `fused_train_enabled` says whether the model uses the kernels: on CUDA where they can run, not inside
torch.compile (inductor fuses the plain operations itself), unless VISION_RWKV_FUSED_TRAIN=0.
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


def fused_train_enabled(x: torch.Tensor, head_size: int) -> bool:
    if os.environ.get("VISION_RWKV_FUSED_TRAIN", "1") == "0" or torch.compiler.is_compiling():
        return False
    from . import unavailable_reason

    return unavailable_reason(x.device, head_size, x.shape[-1]) is None
