"""The fused RWKV-7 layer operations of RNN mode (T=1), written in plain PyTorch.

These are the references the Triton kernels (triton_step.py) are tested against, and the path that runs
where the kernels cannot (the CPU, no Triton). Each works in place on preallocated buffers, as the
kernels do, so a whole step can be captured in one CUDA graph with no copies between the parts:

    embed_ln_      tokens -> the residual stream x = ln0(emb[tokens])                    (B,C) fp32
    ln_mix_        x += dx; xl = LayerNorm(x); shift <- xl; out[g] = xl + (shift_old - xl) * mix[g]
    lora_act_      the activations between the two low-rank products: [v, w, a, g] -> [v, tanh w, a, sigmoid g]
    wkv_step_      decay, in-context rate, value residual, kk, k gating; the state update and readout in
                   place; ln_x, the r_k bonus and the gate: out = (GroupNorm(S r) + bonus) * g
    relu2_         the channel mix's relu(x)^2

GPT mode (a prefill: T positions a row, forward only) uses the same family, with three of its own:

    ln_mix_seq_    ln_mix_ over (B,T,C): each position's shift is the position before it (the state's
                   shift for the first), and the state's shift becomes the last position's LayerNorm
    wkv_pre_       the part of wkv_step_ before the state update, for every position: the WKV
                   kernel's inputs w, k, v, -kk, kk*a (v_first written by layer 0, mixed in by the others)
    wkv_post_      the part after it: out = (GroupNorm(y) + bonus) * g from the WKV kernel's y

Everything is computed in fp32; the residual stream and the state stay fp32, and the inputs of the matrix
products (`out` buffers) are rounded to their dtype, the decoder's compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..wkv7.reference import LOG_DECAY_SCALE

LN_EPS = 1e-5  # nn.LayerNorm's default, which the decoder's ln0/ln1/ln2/ln_out use
LN_X_EPS = 64e-5  # the official GroupNorm eps of ln_x
# rows of the packed per-layer vector table `vec` that wkv_step_ reads, each of length C
VEC_ROWS = ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_x_weight", "ln_x_bias")
# order of the rows of the time-mix input buffer: r, k, v feed one batched product, v, w, a, g the other
ATT_MIX_ROWS = ("x_r", "x_k", "x_v", "x_w", "x_a", "x_g")
LORA_ROWS = ("v", "w", "a", "g")  # the low-rank paths, in the order of ATT_MIX_ROWS[2:]


def embed_ln_(tokens: torch.Tensor, emb: torch.Tensor, weight, bias, x: torch.Tensor) -> None:
    """x (B,C) fp32 <- LayerNorm(emb[tokens])."""
    x.copy_(F.layer_norm(emb[tokens].float(), (x.shape[1],), weight.float(), bias.float(), LN_EPS))


def ln_mix_(x, dx, weight, bias, shift, mix, out) -> None:
    """x (B,C) fp32, in place x += dx (dx (B,C) or None); out (G,B,C) <- the G token-shift mixes of
    LayerNorm(x) with shift (B,C) fp32, which becomes LayerNorm(x); with shift None, out[0] = LayerNorm(x)."""
    if dx is not None:
        x.add_(dx.float())
    xl = F.layer_norm(x, (x.shape[1],), weight.float(), bias.float(), LN_EPS)
    if shift is None:
        out[0].copy_(xl)
        return
    xx = shift - xl
    shift.copy_(xl)
    out.copy_(xl.unsqueeze(0) + xx.unsqueeze(0) * mix.float().unsqueeze(1))


def lora_act_(h: torch.Tensor) -> None:
    """h (4,B,R): rows in LORA_ROWS order; tanh on w, sigmoid on g, in place."""
    h[1].copy_(torch.tanh(h[1].float()))
    h[3].copy_(torch.sigmoid(h[3].float()))


def relu2_(h: torch.Tensor) -> None:
    h.copy_(torch.relu(h.float()).square())


def wkv_step_(state, rkv, lora, vec, v_first, layer0: bool, out) -> None:
    """One time-mix step after its matrix products.

    state (B,H,N,N) fp32, updated in place; rkv (3,B,C) = r, k, v; lora (4,B,C) = the second low-rank
    products in LORA_ROWS order; vec (8,C) fp32 in VEC_ROWS order; v_first (B,C) fp32, written by layer 0
    and read by the others; out (B,C) <- (GroupNorm(y) + bonus) * g.
    """
    B, H, N, _ = state.shape
    C = H * N
    r, k, v = (t.float() for t in rkv)
    v_l, w_l, a_l, g = (t.float() for t in lora)
    w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b = vec.float()
    if layer0:
        v_first.copy_(v)
    else:
        v = v + (v_first - v) * torch.sigmoid(v0 + v_l)
    decay = torch.exp(-LOG_DECAY_SCALE * torch.sigmoid(w0 + w_l))
    a = torch.sigmoid(a0 + a_l)
    kk = F.normalize((k * k_k).view(B, H, N), dim=-1, p=2.0).view(B, C)
    k = k * (1 + (a - 1) * k_a)
    heads = lambda t: t.view(B, H, N)  # noqa: E731
    sa = torch.einsum("bhij,bhj->bhi", state, heads(-kk))
    new = state * heads(decay).unsqueeze(-2) + sa.unsqueeze(-1) * heads(kk * a).unsqueeze(-2) \
        + heads(v).unsqueeze(-1) * heads(k).unsqueeze(-2)
    state.copy_(new)
    y = torch.einsum("bhij,bhj->bhi", new, heads(r))
    y = F.group_norm(y.reshape(B, C), H, ln_w, ln_b, LN_X_EPS)
    bonus = (heads(r) * heads(k) * r_k.view(1, H, N)).sum(-1, keepdim=True) * heads(v)
    out.copy_((y + bonus.reshape(B, C)) * g)


def ln_mix_seq_(x, dx, x_out, weight, bias, shift, mix, out) -> None:
    """x (B,T,C) fp32 is read; x_out (B,T,C) fp32 <- x + dx (dx (B,T,C) or None: then x_out is not written
    and may be None); with xl = LayerNorm(x + dx), out (G,B,T,C) <- xl + (prev - xl) * mix[g], where prev is
    xl one position earlier and shift (B,C) fp32 at the first position; shift <- xl[:, -1]."""
    xs = x + dx.float() if dx is not None else x
    xl = F.layer_norm(xs, (xs.shape[2],), weight.float(), bias.float(), LN_EPS)
    prev = torch.cat([shift.unsqueeze(1), xl[:, :-1]], dim=1)
    out.copy_(xl.unsqueeze(0) + (prev - xl).unsqueeze(0) * mix.float()[:, None, None])
    shift.copy_(xl[:, -1])
    if dx is not None:
        x_out.copy_(xs)


def _pre(k, v, v_l, w_l, a_l, vec, v_first, layer0: bool, H: int):
    """wkv_step_'s arithmetic before the state update, over rows (R,C) fp32 -> w, k, v, kk, a (fp32)."""
    w0, a0, v0, k_k, k_a = vec[:5]
    if layer0:
        v_first.copy_(v)
    else:
        v = v + (v_first - v) * torch.sigmoid(v0 + v_l)
    a = torch.sigmoid(a0 + a_l)
    R, C = k.shape
    kk = F.normalize((k * k_k).view(R, H, C // H), dim=-1, p=2.0).view(R, C)
    return w0 + w_l, k * (1 + (a - 1) * k_a), v, kk, a


def wkv_pre_(rkv, lora, vec, v_first, layer0: bool, out, n_head: int) -> None:
    """rkv (3,M,C) = r, k, v and lora (4,M,C) in LORA_ROWS order for M = B*T positions; vec (8,C) fp32;
    v_first (M,C) fp32, written by layer 0 and read by the others. out (5,M,C) <- the WKV kernel's inputs
    w (the raw decay logit), k, v, -kk, kk*a, in out's dtype."""
    _, k, v = (t.float() for t in rkv)
    v_l, w_l, a_l, _ = (t.float() for t in lora)
    w, k, v, kk, a = _pre(k, v, v_l, w_l, a_l, vec.float(), v_first, layer0, n_head)
    for i, t in enumerate((w, k, v, -kk, kk * a)):
        out[i].copy_(t)


def wkv_post_(y, r, k, v, g, vec, out, n_head: int) -> None:
    """y (M,C) the WKV kernel's output, r, k, v (M,C) as it took them (k and v after wkv_pre_), g (M,C)
    the gate; vec (8,C) fp32. out (M,C) <- (GroupNorm(y) + bonus) * g, bonus = sum(r * k * r_k) * v a head."""
    M, C = y.shape
    heads = lambda t: t.float().view(M, n_head, C // n_head)  # noqa: E731
    r_k, ln_w, ln_b = vec.float()[5:]
    y = F.group_norm(y.float(), n_head, ln_w, ln_b, LN_X_EPS)
    bonus = (heads(r) * heads(k) * heads(r_k.expand(M, C))).sum(-1, keepdim=True) * heads(v)
    out.copy_((y + bonus.reshape(M, C)) * g.float())


# output-block activations of ln_mix_matmul_
ACT_NONE, ACT_TANH, ACT_SIGMOID, ACT_RELU2 = 0, 1, 2, 3


def ln_mix_matmul_(x, dx, x_out, xl_out, weight, bias, shift, mix, w, segments, out, block_n: int,
                   prev_xl=None, prev_shift=None) -> None:
    """LayerNorm, token-shift mix and matrix product in one: for each block of `block_n` output columns j,
    out[:, j] = act(a @ w[j].T) with a = xl + (shift - xl) * mix[m] (a = xl when shift is None), where
    xl = LayerNorm(x + dx) and (m, act) = segments[j // block_n] as m + 256 * act (ACT_*).

    x (B,C) fp32 is read only; x_out <- x + dx and xl_out <- xl (both (B,C) fp32) for later kernels; the
    shift is read, not written (the kernels of a step write it once every reader is done: prev_shift <-
    prev_xl, when given). w (N,C) in the compute dtype; out (B,N)."""
    if prev_xl is not None:
        prev_shift.copy_(prev_xl)
    xs = x + dx.float() if dx is not None else x.clone()
    xl = F.layer_norm(xs, (xs.shape[1],), weight.float(), bias.float(), LN_EPS)
    for j, seg in enumerate(segments.tolist()):  # the last block may be partial
        m, act = seg % 256, seg // 256
        a = xl if shift is None else xl + (shift - xl) * mix[m].float()
        cols = slice(j * block_n, (j + 1) * block_n)
        y = F.linear(a.to(w.dtype), w[cols]).float()
        y = torch.tanh(y) if act == ACT_TANH else torch.sigmoid(y) if act == ACT_SIGMOID else \
            torch.relu(y).square() if act == ACT_RELU2 else y
        out[:, cols] = y.to(out.dtype)
    x_out.copy_(xs)
    xl_out.copy_(xl)


def linear_(x, w, out, groups: int = 1) -> None:
    """out <- x @ w.T in groups: x (B, G*K) (rows may be strided), w (G*N, K), out (B, G*N) contiguous;
    output columns [g*N, (g+1)*N) read input columns [g*K, (g+1)*K). groups=1 is a plain product; the
    step's second low-rank products are 4 groups (v, w, a, g), each reading its own R columns."""
    K, n = w.shape[1], w.shape[0] // groups
    for g in range(groups):  # into out itself: no product then copy
        torch.mm(x[:, g * K:(g + 1) * K].to(w.dtype), w[g * n:(g + 1) * n].t(), out=out[:, g * n:(g + 1) * n])
