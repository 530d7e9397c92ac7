"""The RNN-mode (T=1) RWKV-7 layer operations as Triton kernels: one launch each, fp32 inside.

Same contract as reference.py (in-place on preallocated, contiguous buffers); the wrappers check nothing
beyond what the dispatcher in __init__.py already did. A program handles one batch row (the LayerNorm
kernels: the whole row of C channels at once) or one (row, head) pair (the WKV step: the head's N x N
state tile in registers, read once and written once).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .reference import LN_EPS, LN_X_EPS, LOG_DECAY_SCALE


@triton.jit
def _layer_norm(x, mask, w_ptr, b_ptr, offs, C, eps):
    mean = tl.sum(x, 0) / C
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, 0) / C
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return d * (1.0 / tl.sqrt(var + eps)) * w + b


@triton.jit
def _embed_ln_kernel(tok_ptr, emb_ptr, w_ptr, b_ptr, x_ptr, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    tok = tl.load(tok_ptr + row).to(tl.int64)
    x = tl.load(emb_ptr + tok * C + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * C + offs, _layer_norm(x, mask, w_ptr, b_ptr, offs, C, eps), mask=mask)


@triton.jit
def _ln_mix_kernel(x_ptr, dx_ptr, w_ptr, b_ptr, shift_ptr, mix_ptr, out_ptr, B, C, eps,
                   HAS_DX: tl.constexpr, HAS_SHIFT: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    at = row * C + offs
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    if HAS_DX:
        x += tl.load(dx_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + at, x, mask=mask)
    xl = _layer_norm(x, mask, w_ptr, b_ptr, offs, C, eps)
    if HAS_SHIFT:
        xx = tl.load(shift_ptr + at, mask=mask, other=0.0) - xl
        tl.store(shift_ptr + at, xl, mask=mask)
        for g in tl.static_range(G):
            mix = tl.load(mix_ptr + g * C + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + g * B * C + at, (xl + xx * mix).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + at, xl.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_act_kernel(h_ptr, R, BLOCK_R: tl.constexpr):
    group = tl.program_id(0)  # LORA_ROWS: 0 v, 1 w (tanh), 2 a, 3 g (sigmoid)
    row = tl.program_id(1)
    offs = tl.arange(0, BLOCK_R)
    mask = offs < R
    at = (group * tl.num_programs(1) + row) * R + offs
    h = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-h))
    tanh = 2.0 / (1.0 + tl.exp(-2.0 * h)) - 1.0
    h = tl.where(group == 1, tanh, tl.where(group == 3, sig, h))
    tl.store(h_ptr + at, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu2_kernel(h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.maximum(tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(h_ptr + offs, (h * h).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _wkv_step_kernel(state_ptr, rkv_ptr, lora_ptr, vec_ptr, vfirst_ptr, out_ptr, B, H, C, decay_scale, eps,
                     LAYER0: tl.constexpr, N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, N)
    col = h * N + offs
    at = b * C + col
    BC = B * C
    r = tl.load(rkv_ptr + at).to(tl.float32)
    k = tl.load(rkv_ptr + BC + at).to(tl.float32)
    v = tl.load(rkv_ptr + 2 * BC + at).to(tl.float32)
    v_l = tl.load(lora_ptr + at).to(tl.float32)
    w_l = tl.load(lora_ptr + BC + at).to(tl.float32)
    a_l = tl.load(lora_ptr + 2 * BC + at).to(tl.float32)
    g = tl.load(lora_ptr + 3 * BC + at).to(tl.float32)
    w0 = tl.load(vec_ptr + col)
    a0 = tl.load(vec_ptr + C + col)
    v0 = tl.load(vec_ptr + 2 * C + col)
    k_k = tl.load(vec_ptr + 3 * C + col)
    k_a = tl.load(vec_ptr + 4 * C + col)
    r_k = tl.load(vec_ptr + 5 * C + col)
    ln_w = tl.load(vec_ptr + 6 * C + col)
    ln_b = tl.load(vec_ptr + 7 * C + col)
    if LAYER0:
        tl.store(vfirst_ptr + at, v)
    else:
        v = v + (tl.load(vfirst_ptr + at) - v) * _sigmoid(v0 + v_l)
    decay = tl.exp(-decay_scale * _sigmoid(w0 + w_l))
    a = _sigmoid(a0 + a_l)
    kk = k * k_k
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 0)), 1e-12)
    k = k * (1.0 + (a - 1.0) * k_a)
    tile = state_ptr + (b * H + h) * N * N + offs[:, None] * N + offs[None, :]  # [value i, key j]
    s = tl.load(tile)
    sa = tl.sum(s * (-kk)[None, :], 1)
    s = s * decay[None, :] + sa[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]
    tl.store(tile, s)
    y = tl.sum(s * r[None, :], 1)
    mean = tl.sum(y, 0) / N
    d = y - mean
    y = d * (1.0 / tl.sqrt(tl.sum(d * d, 0) / N + eps)) * ln_w + ln_b
    bonus = tl.sum(r * k * r_k, 0) * v
    tl.store(out_ptr + at, ((y + bonus) * g).to(out_ptr.dtype.element_ty))


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


def embed_ln_(tokens, emb, weight, bias, x) -> None:
    B, C = x.shape
    block = _block(C)
    _embed_ln_kernel[(B,)](tokens, emb, weight, bias, x, C, LN_EPS, BLOCK_C=block, num_warps=_warps(block))


def ln_mix_(x, dx, weight, bias, shift, mix, out) -> None:
    B, C = x.shape
    block = _block(C)
    has_shift = shift is not None
    _ln_mix_kernel[(B,)](x, x if dx is None else dx, weight, bias, shift if has_shift else x,
                         mix if has_shift else x, out, B, C, LN_EPS, HAS_DX=dx is not None,
                         HAS_SHIFT=has_shift, G=out.shape[0] if has_shift else 1, BLOCK_C=block,
                         num_warps=_warps(block))


def lora_act_(h) -> None:
    G, B, R = h.shape
    _lora_act_kernel[(G, B)](h, R, BLOCK_R=_block(R), num_warps=1)


def relu2_(h) -> None:
    n = h.numel()
    _relu2_kernel[(triton.cdiv(n, 1024),)](h, n, BLOCK=1024, num_warps=4)


def wkv_step_(state, rkv, lora, vec, v_first, layer0: bool, out) -> None:
    B, H, N, _ = state.shape
    _wkv_step_kernel[(B, H)](state, rkv, lora, vec, v_first, out, B, H, H * N, LOG_DECAY_SCALE, LN_X_EPS,
                             LAYER0=layer0, N=N, num_warps=4 if N <= 64 else 8)
