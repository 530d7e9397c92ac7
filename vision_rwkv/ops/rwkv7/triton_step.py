"""The RWKV-7 layer operations as Triton kernels, RNN mode's (T=1) and GPT mode's: one launch each, fp32 inside.

Same contract as reference.py (in-place on preallocated, contiguous buffers); the wrappers check nothing
beyond what the dispatcher in __init__.py already did. A program handles one batch row (the LayerNorm
kernels: the whole row of C channels at once) or one (row, head) pair (the WKV step: the head's N x N
state tile in registers, read once and written once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
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
    row = tl.program_id(0)  # on axis 0, which takes more than 65,535 programs (GPT mode's B*T rows)
    group = tl.program_id(1)  # LORA_ROWS: 0 v, 1 w (tanh), 2 a, 3 g (sigmoid)
    offs = tl.arange(0, BLOCK_R)
    mask = offs < R
    at = (group * tl.num_programs(0) + row) * R + offs
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
                     rkv_row, rkv_part, lora_row, lora_part, LAYER0: tl.constexpr, N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, N)
    col = h * N + offs
    at = b * C + col
    rkv = rkv_ptr + b * rkv_row + col
    lora = lora_ptr + b * lora_row + col
    r = tl.load(rkv).to(tl.float32)
    k = tl.load(rkv + rkv_part).to(tl.float32)
    v = tl.load(rkv + 2 * rkv_part).to(tl.float32)
    v_l = tl.load(lora).to(tl.float32)
    w_l = tl.load(lora + lora_part).to(tl.float32)
    a_l = tl.load(lora + 2 * lora_part).to(tl.float32)
    g = tl.load(lora + 3 * lora_part).to(tl.float32)
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


@triton.jit
def _ln_mix_seq_kernel(x_ptr, dx_ptr, x_out_ptr, w_ptr, b_ptr, shift_ptr, shift_out_ptr, mix_ptr, out_ptr,
                       M, T, C, eps, HAS_DX: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr):
    """One position a program: its LayerNorm and the one of the position before (computed again here, so
    no program waits on another), or the state's shift at t = 0."""
    row = tl.program_id(0)
    t = row % T
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    at = row * C + offs
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    if HAS_DX:
        x += tl.load(dx_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_out_ptr + at, x, mask=mask)
    xl = _layer_norm(x, mask, w_ptr, b_ptr, offs, C, eps)
    if t == 0:
        prev = tl.load(shift_ptr + (row // T) * C + offs, mask=mask, other=0.0)
    else:
        xp = tl.load(x_ptr + at - C, mask=mask, other=0.0)
        if HAS_DX:
            xp += tl.load(dx_ptr + at - C, mask=mask, other=0.0).to(tl.float32)
        prev = _layer_norm(xp, mask, w_ptr, b_ptr, offs, C, eps)
    if t == T - 1:  # the new shift goes to a buffer of its own: the t = 0 programs still read the old one
        tl.store(shift_out_ptr + (row // T) * C + offs, xl, mask=mask)
    xx = prev - xl
    for g in tl.static_range(G):
        mix = tl.load(mix_ptr + g * C + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + g * M * C + at, (xl + xx * mix).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_mix_seq_bwd_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, mix_ptr, dout_ptr, dlast_ptr, dx_ptr, dshift_ptr,
                           part_ptr, M, T, C, eps, HAS_DLAST: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """ln_mix_seq's backward over ROWS positions a program: dx, the first positions' dshift, and this program's
    partial sums of dmix (G rows), dweight and dbias (part (programs, G + 2, C), summed afterwards)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for i in range(0, ROWS):
        row = pid * ROWS + i
        if row < M:
            t = row % T
            at = row * C + offs
            x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, 0) / C
            d = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / C + eps)
            xhat = d * rstd
            xl = xhat * w + b
            if t == 0:
                prev = tl.load(shift_ptr + (row // T) * C + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                xp = tl.load(x_ptr + at - C, mask=mask, other=0.0).to(tl.float32)
                mp = tl.sum(xp, 0) / C
                dp = tl.where(mask, xp - mp, 0.0)
                prev = dp * (1.0 / tl.sqrt(tl.sum(dp * dp, 0) / C + eps)) * w + b
            dxl = tl.zeros((BLOCK_C,), tl.float32)
            dprev = tl.zeros((BLOCK_C,), tl.float32)
            for g in tl.static_range(G):
                mix = tl.load(mix_ptr + g * C + offs, mask=mask, other=0.0).to(tl.float32)
                do = tl.load(dout_ptr + g * M * C + at, mask=mask, other=0.0).to(tl.float32)
                dxl += do * (1.0 - mix)
                dprev += do * mix
                if t + 1 < T:  # the next position's mix reads this one
                    dn = tl.load(dout_ptr + g * M * C + at + C, mask=mask, other=0.0).to(tl.float32)
                    dxl += dn * mix
                part = part_ptr + (pid * (G + 2) + g) * C + offs
                tl.store(part, tl.load(part, mask=mask, other=0.0) + do * (prev - xl), mask=mask)
            if t == 0:
                tl.store(dshift_ptr + (row // T) * C + offs, dprev, mask=mask)
            if HAS_DLAST:
                if t == T - 1:
                    dxl += tl.load(dlast_ptr + (row // T) * C + offs, mask=mask, other=0.0).to(tl.float32)
            dw += dxl * xhat
            db += dxl
            gw = dxl * w
            dx = rstd * (gw - tl.sum(gw, 0) / C - xhat * (tl.sum(gw * xhat, 0) / C))
            tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + (pid * (G + 2) + G) * C + offs, dw, mask=mask)
    tl.store(part_ptr + (pid * (G + 2) + G + 1) * C + offs, db, mask=mask)


@triton.jit
def _train_pre_fwd_kernel(k_ptr, v_ptr, vl_ptr, wl_ptr, al_ptr, vec_ptr, vf_ptr, out_ptr, M, C,
                          LAYER0: tl.constexpr, N: tl.constexpr):
    """wkv_pre's arithmetic for training, separate input tensors (M,C): out (5,M,C) <- w, k, v, -kk, kk*a."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    col = h * N + tl.arange(0, N)
    at = row * C + col
    part = M * C
    k = tl.load(k_ptr + at).to(tl.float32)
    v = tl.load(v_ptr + at).to(tl.float32)
    w_l = tl.load(wl_ptr + at).to(tl.float32)
    a_l = tl.load(al_ptr + at).to(tl.float32)
    w0 = tl.load(vec_ptr + col).to(tl.float32)
    a0 = tl.load(vec_ptr + C + col).to(tl.float32)
    k_k = tl.load(vec_ptr + 3 * C + col).to(tl.float32)
    k_a = tl.load(vec_ptr + 4 * C + col).to(tl.float32)
    if not LAYER0:
        v0 = tl.load(vec_ptr + 2 * C + col).to(tl.float32)
        v_l = tl.load(vl_ptr + at).to(tl.float32)
        v = v + (tl.load(vf_ptr + at).to(tl.float32) - v) * _sigmoid(v0 + v_l)
    a = _sigmoid(a0 + a_l)
    kk = k * k_k
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 0)), 1e-12)
    k = k * (1.0 + (a - 1.0) * k_a)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + at, (w0 + w_l).to(ty))
    tl.store(out_ptr + part + at, k.to(ty))
    tl.store(out_ptr + 2 * part + at, v.to(ty))
    tl.store(out_ptr + 3 * part + at, (-kk).to(ty))
    tl.store(out_ptr + 4 * part + at, (kk * a).to(ty))


@triton.jit
def _train_pre_bwd_kernel(k_ptr, v_ptr, vl_ptr, al_ptr, vec_ptr, vf_ptr, d_ptr, dk_ptr, dv_ptr, dvl_ptr, dwl_ptr,
                          dal_ptr, dvf_ptr, part_ptr, M, C, LAYER0: tl.constexpr, ROWS: tl.constexpr,
                          N: tl.constexpr):
    """The backward of _train_pre_fwd over ROWS positions of one head: d (5,M,C) the outputs' gradients ->
    the inputs' gradients, and partial sums (programs, 5, C) for w0, a0, v0, k_k, k_a."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    col = h * N + tl.arange(0, N)
    part = M * C
    a0 = tl.load(vec_ptr + C + col).to(tl.float32)
    v0 = tl.load(vec_ptr + 2 * C + col).to(tl.float32)
    k_k = tl.load(vec_ptr + 3 * C + col).to(tl.float32)
    k_a = tl.load(vec_ptr + 4 * C + col).to(tl.float32)
    g_w0 = tl.zeros((N,), tl.float32)
    g_a0 = tl.zeros((N,), tl.float32)
    g_v0 = tl.zeros((N,), tl.float32)
    g_kk = tl.zeros((N,), tl.float32)
    g_ka = tl.zeros((N,), tl.float32)
    for i in range(0, ROWS):
        row = pid * ROWS + i
        if row < M:
            at = row * C + col
            k = tl.load(k_ptr + at).to(tl.float32)
            a_l = tl.load(al_ptr + at).to(tl.float32)
            d_w = tl.load(d_ptr + at).to(tl.float32)
            d_k = tl.load(d_ptr + part + at).to(tl.float32)
            d_v = tl.load(d_ptr + 2 * part + at).to(tl.float32)
            d_na = tl.load(d_ptr + 3 * part + at).to(tl.float32)
            d_b = tl.load(d_ptr + 4 * part + at).to(tl.float32)
            a = _sigmoid(a0 + a_l)
            raw = k * k_k
            norm = tl.sqrt(tl.sum(raw * raw, 0))
            kk = raw / tl.maximum(norm, 1e-12)
            d_kk = d_b * a - d_na
            d_a = d_b * kk + d_k * k * k_a
            if norm > 1e-12:
                d_raw = (d_kk - kk * tl.sum(kk * d_kk, 0)) / norm
            else:
                d_raw = d_kk / 1e-12
            dk = d_k * (1.0 + (a - 1.0) * k_a) + d_raw * k_k
            g_kk += d_raw * k
            g_ka += d_k * k * (a - 1.0)
            dz_a = d_a * a * (1.0 - a)
            g_a0 += dz_a
            g_w0 += d_w
            tl.store(dk_ptr + at, dk.to(dk_ptr.dtype.element_ty))
            tl.store(dwl_ptr + at, d_w.to(dwl_ptr.dtype.element_ty))
            tl.store(dal_ptr + at, dz_a.to(dal_ptr.dtype.element_ty))
            if LAYER0:
                tl.store(dv_ptr + at, d_v.to(dv_ptr.dtype.element_ty))
            else:
                v = tl.load(v_ptr + at).to(tl.float32)
                vf = tl.load(vf_ptr + at).to(tl.float32)
                s = _sigmoid(v0 + tl.load(vl_ptr + at).to(tl.float32))
                dz_v = d_v * (vf - v) * s * (1.0 - s)
                g_v0 += dz_v
                tl.store(dv_ptr + at, (d_v * (1.0 - s)).to(dv_ptr.dtype.element_ty))
                tl.store(dvf_ptr + at, (d_v * s).to(dvf_ptr.dtype.element_ty))
                tl.store(dvl_ptr + at, dz_v.to(dvl_ptr.dtype.element_ty))
    base = part_ptr + pid * 5 * C + col
    tl.store(base, g_w0)
    tl.store(base + C, g_a0)
    tl.store(base + 2 * C, g_v0)
    tl.store(base + 3 * C, g_kk)
    tl.store(base + 4 * C, g_ka)


@triton.jit
def _train_post_bwd_kernel(y_ptr, r_ptr, k_ptr, v_ptr, g_ptr, vec_ptr, d_ptr, dy_ptr, dr_ptr, dk_ptr, dv_ptr, dg_ptr,
                           part_ptr, M, C, eps, ROWS: tl.constexpr, N: tl.constexpr):
    """The backward of wkv_post over ROWS positions of one head: d (M,C) -> dy, dr, dk, dv, dg, and partial
    sums (programs, 3, C) for r_k, ln_x's weight and bias. vec (3,C): r_k, weight, bias."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    col = h * N + tl.arange(0, N)
    r_k = tl.load(vec_ptr + col).to(tl.float32)
    ln_w = tl.load(vec_ptr + C + col).to(tl.float32)
    ln_b = tl.load(vec_ptr + 2 * C + col).to(tl.float32)
    g_rk = tl.zeros((N,), tl.float32)
    g_w = tl.zeros((N,), tl.float32)
    g_b = tl.zeros((N,), tl.float32)
    for i in range(0, ROWS):
        row = pid * ROWS + i
        if row < M:
            at = row * C + col
            y = tl.load(y_ptr + at).to(tl.float32)
            r = tl.load(r_ptr + at).to(tl.float32)
            k = tl.load(k_ptr + at).to(tl.float32)
            v = tl.load(v_ptr + at).to(tl.float32)
            g = tl.load(g_ptr + at).to(tl.float32)
            d = tl.load(d_ptr + at).to(tl.float32)
            dm = y - tl.sum(y, 0) / N
            rstd = 1.0 / tl.sqrt(tl.sum(dm * dm, 0) / N + eps)
            yhat = dm * rstd
            c = tl.sum(r * k * r_k, 0)
            z = yhat * ln_w + ln_b + c * v
            dz = d * g
            tl.store(dg_ptr + at, (d * z).to(dg_ptr.dtype.element_ty))
            g_w += dz * yhat
            g_b += dz
            gy = dz * ln_w
            dy = rstd * (gy - tl.sum(gy, 0) / N - yhat * (tl.sum(gy * yhat, 0) / N))
            tl.store(dy_ptr + at, dy.to(dy_ptr.dtype.element_ty))
            dc = tl.sum(dz * v, 0)
            tl.store(dv_ptr + at, (dz * c).to(dv_ptr.dtype.element_ty))
            tl.store(dr_ptr + at, (dc * k * r_k).to(dr_ptr.dtype.element_ty))
            tl.store(dk_ptr + at, (dc * r * r_k).to(dk_ptr.dtype.element_ty))
            g_rk += dc * r * k
    base = part_ptr + pid * 3 * C + col
    tl.store(base, g_rk)
    tl.store(base + C, g_w)
    tl.store(base + 2 * C, g_b)


@triton.jit
def _wkv_pre_kernel(rkv_ptr, lora_ptr, vec_ptr, vfirst_ptr, out_ptr, M, C, LAYER0: tl.constexpr, N: tl.constexpr):
    """wkv_step_'s arithmetic before the state update, for one (position, head)."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    col = h * N + tl.arange(0, N)
    at = row * C + col
    part = M * C
    k = tl.load(rkv_ptr + part + at).to(tl.float32)
    v = tl.load(rkv_ptr + 2 * part + at).to(tl.float32)
    v_l = tl.load(lora_ptr + at).to(tl.float32)
    w_l = tl.load(lora_ptr + part + at).to(tl.float32)
    a_l = tl.load(lora_ptr + 2 * part + at).to(tl.float32)
    w0 = tl.load(vec_ptr + col)
    a0 = tl.load(vec_ptr + C + col)
    v0 = tl.load(vec_ptr + 2 * C + col)
    k_k = tl.load(vec_ptr + 3 * C + col)
    k_a = tl.load(vec_ptr + 4 * C + col)
    if LAYER0:
        tl.store(vfirst_ptr + at, v)
    else:
        v = v + (tl.load(vfirst_ptr + at) - v) * _sigmoid(v0 + v_l)
    a = _sigmoid(a0 + a_l)
    kk = k * k_k
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 0)), 1e-12)
    k = k * (1.0 + (a - 1.0) * k_a)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + at, (w0 + w_l).to(ty))
    tl.store(out_ptr + part + at, k.to(ty))
    tl.store(out_ptr + 2 * part + at, v.to(ty))
    tl.store(out_ptr + 3 * part + at, (-kk).to(ty))
    tl.store(out_ptr + 4 * part + at, (kk * a).to(ty))


@triton.jit
def _wkv_post_kernel(y_ptr, r_ptr, k_ptr, v_ptr, g_ptr, vec_ptr, out_ptr, C, eps, N: tl.constexpr,
                     VEC0: tl.constexpr = 5):
    """(GroupNorm(y) + bonus) * g for one (position, head); r_k, ln_x's weight and bias are vec's rows VEC0 on."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    col = h * N + tl.arange(0, N)
    at = row * C + col
    y = tl.load(y_ptr + at).to(tl.float32)
    r = tl.load(r_ptr + at).to(tl.float32)
    k = tl.load(k_ptr + at).to(tl.float32)
    v = tl.load(v_ptr + at).to(tl.float32)
    g = tl.load(g_ptr + at).to(tl.float32)
    r_k = tl.load(vec_ptr + VEC0 * C + col).to(tl.float32)
    ln_w = tl.load(vec_ptr + (VEC0 + 1) * C + col).to(tl.float32)
    ln_b = tl.load(vec_ptr + (VEC0 + 2) * C + col).to(tl.float32)
    d = y - tl.sum(y, 0) / N
    y = d * (1.0 / tl.sqrt(tl.sum(d * d, 0) / N + eps)) * ln_w + ln_b
    bonus = tl.sum(r * k * r_k, 0) * v
    tl.store(out_ptr + at, ((y + bonus) * g).to(out_ptr.dtype.element_ty))


@triton.jit
def _residual_tile(x_ptr, dx_ptr, rows, rmask, k0, ks, C, HAS_DX: tl.constexpr):
    """x + dx over the rows' columns k0 + ks, fp32; with its mask and offsets."""
    m = rmask[:, None] & (k0 + ks < C)[None, :]
    at = rows[:, None] * C + k0 + ks[None, :]
    xs = tl.load(x_ptr + at, mask=m, other=0.0)
    if HAS_DX:
        xs += tl.load(dx_ptr + at, mask=m, other=0.0).to(tl.float32)
    return xs, m, at


@triton.jit
def _ln_mix_matmul_kernel(x_ptr, dx_ptr, x_out_ptr, xl_out_ptr, lnw_ptr, lnb_ptr, shift_ptr, mix_ptr, w_ptr, seg_ptr,
                          out_ptr, prev_xl_ptr, prev_shift_ptr, B, C, N_OUT, eps,
                          HAS_DX: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_PREV: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    ks = tl.arange(0, BLOCK_K)
    first = pid_n == 0  # the program that writes the row block's side outputs
    # the row statistics, two passes over x + dx (the rows are in L1/L2 after the first)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        xs, m, at = _residual_tile(x_ptr, dx_ptr, rows, rmask, k0, ks, C, HAS_DX)
        total += tl.sum(xs, 1)
        if HAS_PREV:
            tl.store(prev_shift_ptr + at, tl.load(prev_xl_ptr + at, mask=m, other=0.0), mask=m & first)
    mean = total / C
    total = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        xs, m, at = _residual_tile(x_ptr, dx_ptr, rows, rmask, k0, ks, C, HAS_DX)
        d = tl.where(m, xs - mean[:, None], 0.0)
        total += tl.sum(d * d, 1)
    rstd = 1.0 / tl.sqrt(total / C + eps)
    seg = tl.load(seg_ptr + pid_n)
    mix_row = seg % 256
    act = seg // 256
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kmask = k0 + ks < C
        xs, m, at = _residual_tile(x_ptr, dx_ptr, rows, rmask, k0, ks, C, HAS_DX)
        lw = tl.load(lnw_ptr + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
        lb = tl.load(lnb_ptr + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
        xl = (xs - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
        tl.store(x_out_ptr + at, xs, mask=m & first)
        tl.store(xl_out_ptr + at, xl, mask=m & first)
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + at, mask=m, other=0.0)
            mix = tl.load(mix_ptr + mix_row * C + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
            xl = xl + (sh - xl) * mix[None, :]
        a = tl.where(m, xl, 0.0).to(w_ptr.dtype.element_ty)
        wt = tl.load(w_ptr + cols[None, :] * C + k0 + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                     other=0.0)  # (K, N)
        if DOT_F32:  # Triton's interpreter gets bf16 products wrong: the same rounded values, in fp32
            acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, wt, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * N_OUT + cols[None, :], _activate(acc, act).to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _activate(acc, act):
    """ACT_* of reference.py: 0 none, 1 tanh, 2 sigmoid, 3 relu^2 (act is one value for the whole block)."""
    sig = 1.0 / (1.0 + tl.exp(-acc))
    return tl.where(act == 1, 2.0 / (1.0 + tl.exp(-2.0 * acc)) - 1.0,
                    tl.where(act == 2, sig, tl.where(act == 3, tl.maximum(acc, 0.0) * tl.maximum(acc, 0.0), acc)))


# ---- few rows: one pass, the weight tile in registers ---------------------------------------------------
# At batch 1 to GEMV_MAX_ROWS a product is a matrix-vector product bound by latency, not by bandwidth or
# arithmetic: each program loads its (BLOCK_N, K) weight tile and the row(s) at once, with no loop whose
# loads wait on each other, and reduces in registers (no tensor cores: one row fills none of them).

# The blocks below are the fastest of bench/ln_mix_matmul.py's sweep (H200, 2026-12-03, BENCHMARKS.md): at
# L12-D768 the one-pass LayerNorm product took 3.6-3.7 us at one row (cuBLAS's product alone: 3.3-3.5) and
# 6.3 at two, but 10.4 at four (its rows run one after another), so it serves up to LN_GEMV_MAX_ROWS; the
# plain one-pass product took 1.8-2.6 us at one row and 3.0 at four, against cuBLAS's 3.9-6.2.
GEMV_MAX_ROWS = 4
LN_GEMV_MAX_ROWS = 2
GEMV_MAX_K = 4096  # the widest input a program holds whole (BLOCK_N x K fp32 values in registers)


@triton.jit
def _ln_mix_gemv_kernel(x_ptr, dx_ptr, x_out_ptr, xl_out_ptr, lnw_ptr, lnb_ptr, shift_ptr, mix_ptr, w_ptr, seg_ptr,
                        out_ptr, prev_xl_ptr, prev_shift_ptr, B, C, N_OUT, SEG_N, eps,
                        HAS_DX: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_PREV: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    ks = tl.arange(0, BLOCK_C)
    kmask = ks < C
    w = tl.load(w_ptr + cols[:, None] * C + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
    w = w.to(tl.float32)  # (BLOCK_N, BLOCK_C)
    seg = tl.load(seg_ptr + (pid * BLOCK_N) // SEG_N)
    act = seg // 256
    if HAS_SHIFT:
        mix = tl.load(mix_ptr + (seg % 256) * C + ks, mask=kmask, other=0.0).to(tl.float32)
    first = pid == 0  # the program that writes the side outputs
    for b in tl.static_range(ROWS):
        m = kmask & (b < B)
        at = b * C + ks
        xs = tl.load(x_ptr + at, mask=m, other=0.0)
        if HAS_DX:
            xs += tl.load(dx_ptr + at, mask=m, other=0.0).to(tl.float32)
        if HAS_PREV:
            tl.store(prev_shift_ptr + at, tl.load(prev_xl_ptr + at, mask=m & first, other=0.0), mask=m & first)
        xl = _layer_norm(xs, m, lnw_ptr, lnb_ptr, ks, C, eps)
        tl.store(x_out_ptr + at, xs, mask=m & first)
        tl.store(xl_out_ptr + at, xl, mask=m & first)
        if HAS_SHIFT:
            xl = xl + (tl.load(shift_ptr + at, mask=m, other=0.0) - xl) * mix
        a = tl.where(m, xl, 0.0).to(w_ptr.dtype.element_ty).to(tl.float32)  # the product's input, rounded
        acc = tl.sum(w * a[None, :], 1)
        tl.store(out_ptr + b * N_OUT + cols, _activate(acc, act).to(out_ptr.dtype.element_ty), mask=cmask & (b < B))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, B, K, N_OUT, X_ROW, GROUP_N,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
    w = w.to(tl.float32)  # (BLOCK_N, BLOCK_K)
    x_cols = ((pid * BLOCK_N) // GROUP_N) * K + ks  # the input columns of this block's group
    for b in tl.static_range(ROWS):
        a = tl.load(x_ptr + b * X_ROW + x_cols, mask=kmask & (b < B), other=0.0).to(tl.float32)
        acc = tl.sum(w * a[None, :], 1)
        tl.store(out_ptr + b * N_OUT + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask & (b < B))


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


def ln_mix_seq_(x, dx, x_out, weight, bias, shift, mix, out) -> None:
    B, T, C = x.shape
    block = _block(C)
    new_shift = torch.empty_like(shift)
    _ln_mix_seq_kernel[(B * T,)](x, x if dx is None else dx, x if x_out is None else x_out, weight, bias, shift,
                                 new_shift, mix, out, B * T, T, C, LN_EPS, HAS_DX=dx is not None, G=out.shape[0],
                                 BLOCK_C=block, num_warps=_warps(block))
    shift.copy_(new_shift)


LN_MIX_BWD_ROWS = 16  # positions a program of ln_mix_seq's backward: partial sums for M / 16 programs


def ln_mix_seq_backward(x, weight, bias, shift, mix, dout, dlast):
    """The gradients of ln_mix_seq (reference.ln_mix_seq's autograd): x (B,T,C), shift (B,C), mix (G,C),
    dout (G,B,T,C), dlast (B,C) or None -> dx, dshift, dweight, dbias, dmix (fp32 for the parameters)."""
    B, T, C = x.shape
    G, M = mix.shape[0], B * T
    block = _block(C)
    programs = triton.cdiv(M, LN_MIX_BWD_ROWS)
    part = torch.zeros(programs, G + 2, C, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dshift = torch.empty(B, C, device=x.device, dtype=torch.float32)
    _ln_mix_seq_bwd_kernel[(programs,)](x, weight, bias, shift, mix, dout, x if dlast is None else dlast, dx, dshift,
                                        part, M, T, C, LN_EPS, HAS_DLAST=dlast is not None, G=G,
                                        ROWS=LN_MIX_BWD_ROWS, BLOCK_C=block, num_warps=_warps(block))
    sums = part.sum(0)
    return dx, dshift, sums[G], sums[G + 1], sums[:G]


TRAIN_BWD_ROWS = 16  # positions a program of the training ops' backward (one head each)


def train_pre_forward(k, v, v_l, w_l, a_l, vec5, v_first, out, n_head: int) -> None:
    """k, v, v_l, w_l, a_l (M,C) contiguous; vec5 (5,C): w0, a0, v0, k_k, k_a; v_first (M,C) or None (layer 0,
    whose v_l is then unused); out (5,M,C) <- w, k, v, -kk, kk*a."""
    M, C = k.shape
    N = C // n_head
    layer0 = v_first is None
    _train_pre_fwd_kernel[(M, n_head)](k, v, k if layer0 else v_l, w_l, a_l, vec5, k if layer0 else v_first, out,
                                       M, C, LAYER0=layer0, N=N, num_warps=1 if N <= 64 else 2)


def train_pre_backward(k, v, v_l, a_l, vec5, v_first, d, n_head: int):
    """-> dk, dv, dv_l (None for layer 0), dw_l, da_l, dv_first (None for layer 0), dvec5 (5,C) fp32."""
    M, C = k.shape
    N = C // n_head
    layer0 = v_first is None
    programs = triton.cdiv(M, TRAIN_BWD_ROWS)
    part = torch.empty(programs, 5, C, device=k.device, dtype=torch.float32)
    dk, dv, dw_l, da_l = (torch.empty_like(k) for _ in range(4))
    dv_l = None if layer0 else torch.empty_like(v_l)
    dv_first = None if layer0 else torch.empty_like(v_first)
    _train_pre_bwd_kernel[(programs, n_head)](k, v, k if layer0 else v_l, a_l, vec5, k if layer0 else v_first, d,
                                              dk, dv, dk if layer0 else dv_l, dw_l, da_l,
                                              dk if layer0 else dv_first, part, M, C, LAYER0=layer0,
                                              ROWS=TRAIN_BWD_ROWS, N=N, num_warps=1 if N <= 64 else 2)
    return dk, dv, dv_l, dw_l, da_l, dv_first, part.sum(0)


def train_post_forward(y, r, k, v, g, vec3, out, n_head: int) -> None:
    """wkv_post_ with vec3 (3,C) = r_k, ln_x's weight, its bias."""
    M, C = y.shape
    _wkv_post_kernel[(M, n_head)](y, r, k, v, g, vec3, out, C, LN_X_EPS, N=C // n_head, VEC0=0,
                                  num_warps=1 if C // n_head <= 64 else 2)


def train_post_backward(y, r, k, v, g, vec3, d, n_head: int):
    """-> dy, dr, dk, dv, dg, dvec3 (3,C) fp32 (r_k, ln_x's weight, its bias)."""
    M, C = y.shape
    N = C // n_head
    programs = triton.cdiv(M, TRAIN_BWD_ROWS)
    part = torch.empty(programs, 3, C, device=y.device, dtype=torch.float32)
    dy, dr, dk, dv, dg = (torch.empty_like(t) for t in (y, r, k, v, g))
    _train_post_bwd_kernel[(programs, n_head)](y, r, k, v, g, vec3, d, dy, dr, dk, dv, dg, part, M, C, LN_X_EPS,
                                               ROWS=TRAIN_BWD_ROWS, N=N, num_warps=1 if N <= 64 else 2)
    return dy, dr, dk, dv, dg, part.sum(0)


def wkv_pre_(rkv, lora, vec, v_first, layer0: bool, out, n_head: int) -> None:
    _, M, C = rkv.shape
    assert rkv.is_contiguous() and lora.is_contiguous() and out.is_contiguous()
    _wkv_pre_kernel[(M, n_head)](rkv, lora, vec, v_first, out, M, C, LAYER0=layer0, N=C // n_head,
                                 num_warps=1 if C // n_head <= 64 else 2)


def wkv_post_(y, r, k, v, g, vec, out, n_head: int) -> None:
    M, C = y.shape
    assert all(t.is_contiguous() for t in (y, r, k, v, g, out))
    _wkv_post_kernel[(M, n_head)](y, r, k, v, g, vec, out, C, LN_X_EPS, N=C // n_head,
                                  num_warps=1 if C // n_head <= 64 else 2)


def lora_act_(h) -> None:
    G, B, R = h.shape
    _lora_act_kernel[(B, G)](h, R, BLOCK_R=_block(R), num_warps=1)


def relu2_(h) -> None:
    n = h.numel()
    _relu2_kernel[(triton.cdiv(n, 1024),)](h, n, BLOCK=1024, num_warps=4)


def ln_mix_matmul_(x, dx, x_out, xl_out, weight, bias, shift, mix, w, segments, out, block_n: int,
                   prev_xl=None, prev_shift=None, block_k: int | None = None, num_warps: int = 4,
                   gemv_block_n: int | None = None) -> None:
    """Up to LN_GEMV_MAX_ROWS rows (and C <= GEMV_MAX_K): the one-pass kernel, gemv_block_n output columns
    a program (None: the sweep's best); more rows: tensor-core tiles of block_k."""
    B, C = x.shape
    n_out = w.shape[0]
    has_shift, has_prev = shift is not None, prev_xl is not None
    if B <= LN_GEMV_MAX_ROWS and C <= GEMV_MAX_K:
        block_c = _block(C)
        bn = min(block_n, gemv_block_n or (4 if B == 1 else 8))
        num_warps = num_warps if gemv_block_n else 2 if B == 1 else 4
        _ln_mix_gemv_kernel[(triton.cdiv(n_out, bn),)](
            x, x if dx is None else dx, x_out, xl_out, weight, bias, shift if has_shift else x,
            mix if has_shift else x, w, segments, out, prev_xl if has_prev else x, prev_shift if has_prev else x,
            B, C, n_out, block_n, LN_EPS, HAS_DX=dx is not None, HAS_SHIFT=has_shift, HAS_PREV=has_prev,
            ROWS=_block(B), BLOCK_N=bn, BLOCK_C=block_c, num_warps=num_warps)
        return
    block_m = 16 if B <= 16 else 32 if B <= 32 else 64
    block_k = min(block_k or (64 if B > 16 else 128), _block(C))
    grid = (triton.cdiv(B, block_m), triton.cdiv(n_out, block_n))
    _ln_mix_matmul_kernel[grid](x, x if dx is None else dx, x_out, xl_out, weight, bias, shift if has_shift else x,
                                mix if has_shift else x, w, segments, out, prev_xl if has_prev else x,
                                prev_shift if has_prev else x, B, C, n_out, LN_EPS, HAS_DX=dx is not None,
                                HAS_SHIFT=has_shift, HAS_PREV=has_prev, BLOCK_M=block_m, BLOCK_N=block_n,
                                BLOCK_K=block_k, PRECISION="ieee" if w.dtype == torch.float32 else "tf32",
                                DOT_F32=x.device.type == "cpu", num_warps=num_warps)


def linear_(x, w, out, groups: int = 1, block_n: int = 2, num_warps: int = 1) -> None:
    """reference.linear_; the one-pass kernel up to GEMV_MAX_ROWS rows, else cuBLAS a group at a time."""
    B, K = x.shape[0], w.shape[1]
    n_out = w.shape[0]
    if B > GEMV_MAX_ROWS or K > GEMV_MAX_K or x.stride(1) != 1:
        reference.linear_(x, w, out, groups)
        return
    block_k = _block(K)
    bn = min(block_n, _block(n_out // groups))
    assert groups == 1 or (n_out // groups) % bn == 0  # a block never straddles two groups
    _gemv_kernel[(triton.cdiv(n_out, bn),)](x, w, out, B, K, n_out, x.stride(0), n_out // groups,
                                            ROWS=_block(B), BLOCK_N=bn, BLOCK_K=block_k, num_warps=num_warps)


WKV_FEW_WARPS_BATCH = 64  # from this batch on, one warp per (row, head) tile: fewer warps, more tiles resident


def wkv_step_(state, rkv, lora, vec, v_first, layer0: bool, out, num_warps: int | None = None) -> None:
    """reference.wkv_step_. Warps per (row, head) program, measured on an H200 (bench/ln_mix_matmul.py --only
    wkv, 2026-12-04, N=64): batch 1 best with 4 (2.5 us), batch 64 with 1 (6.6 against 7.6 us with 4), 256 with
    1 (30.6 against 33.5 us)."""
    B, H, N, _ = state.shape
    if num_warps is None:
        num_warps = 8 if N > 64 else (1 if B >= WKV_FEW_WARPS_BATCH else 4)  # N > 64: not measured
    # rkv (3,B,C) and lora (4,B,C) may be views into wider rows: each part's columns contiguous
    assert rkv.stride(2) == 1 and lora.stride(2) == 1
    _wkv_step_kernel[(B, H)](state, rkv, lora, vec, v_first, out, B, H, H * N, LOG_DECAY_SCALE, LN_X_EPS,
                             rkv.stride(1), rkv.stride(0), lora.stride(1), lora.stride(0), LAYER0=layer0, N=N,
                             num_warps=num_warps)
