"""Linear head and cross-entropy in one op, in chunks of rows: the (N, V) logits never exist at once.

    loss = linear_cross_entropy(h, weight, targets)          # = F.cross_entropy(F.linear(h, weight), targets,
                                                             #                   reduction="sum"), softmax in fp32+

h (N, C) hidden states, weight (V, C) the head, targets (N,) token ids. With a vocabulary of 65,536 and
N = 4,096 caption tokens, the logits alone take 512 MB in bf16 and their fp32 copy, softmax and gradient
three times that; here a chunk of `chunk` rows takes chunk x V at a time, forward and backward alike.

The forward keeps each row's log-sum-exp (N floats); the backward computes each chunk's logits again and
turns them into the gradient in place: softmax minus the one-hot target, times the incoming gradient, then
dh = dlogits @ weight and dweight += dlogits^T @ h. Under autocast the head's products run in the autocast
dtype and the softmax in fp32, as the unfused formula does. `reference` is that formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 1024  # rows per chunk: 1024 x 65,536 fp32 logits = 256 MB, the largest transient


def reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused formula: the summed cross-entropy of the head's logits (in fp32 at least)."""
    return F.cross_entropy(_upcast(F.linear(h, weight)), targets, reduction="sum")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """16-bit logits to fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """The summed cross-entropy of F.linear(h, weight) against targets, chunk rows at a time (see above)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)}; expected (N, C), (V, C), (N,)")
    if h.shape[0] == 0:
        return (h.sum() * 0 + weight.sum() * 0).float()
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype)


def _logits(h: torch.Tensor, w_mm: torch.Tensor) -> torch.Tensor:
    """(n, V) logits in fp32 or wider, from a product in w_mm's dtype (the weight cast once per pass to the
    autocast dtype, or as it is)."""
    return _upcast(F.linear(h.to(w_mm.dtype), w_mm))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype):
        with torch.autocast(h.device.type, enabled=False):
            wide = torch.float64 if torch.float64 in (h.dtype, weight.dtype) and dtype is None else torch.float32
            total = torch.zeros((), dtype=wide, device=h.device)
            lse = torch.empty(h.shape[0], dtype=wide, device=h.device)
            w_mm = weight.to(dtype) if dtype is not None else weight
            for start in range(0, h.shape[0], chunk):
                end = min(start + chunk, h.shape[0])
                logits = _logits(h[start:end], w_mm)  # (n,V)
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, targets[start:end, None]).squeeze(1)
                total += (lse[start:end] - picked).sum()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        w_mm = weight.to(dtype) if dtype is not None else weight
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk):
                end = min(start + chunk, h.shape[0])
                hc = h[start:end]
                dlogits = _logits(hc, w_mm)
                dlogits.sub_(lse[start:end, None]).exp_()  # softmax
                dlogits[torch.arange(end - start, device=h.device), targets[start:end]] -= 1
                dlogits.mul_(grad)
                d = dlogits.to(w_mm.dtype)
                if need_h:
                    dh[start:end] = (d @ w_mm).to(h.dtype)
                if need_w:
                    dw += (d.t() @ hc.to(w_mm.dtype)).to(dw.dtype)
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None
