"""The RWKV-7 ("x070", "Goose") decoder: one set of weights, two modes (the interface: lm/decoder.py).

GPT mode runs a whole (B, T) sequence in parallel through the WKV dispatcher; RNN mode takes one token
per row and updates the recurrent state. Parameter names and shapes are the official ones, so an
official checkpoint's state dict loads as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DecoderArch, RWKV7Config
from ..errors import VisionRWKVError
from ..ops.rwkv7.train import fused_train_enabled, ln_mix_seq, wkv_post, wkv_pre
from ..ops.wkv7 import wkv7, wkv7_step
from .decoder import Decoder, token_shift
from .state import RWKVState

LN_X_EPS = 64e-5  # the official GroupNorm eps for ln_x

# Options for torch.compile(..., options=COMPILE_OPTIONS) of a training step through this model. Inductor's
# mix-order reduction (on by default) fuses a LayerNorm backward with the column sums that make the (1, 1, C)
# parameters' gradients; at (8, 1024) tokens on an H200 (torch 2.11) the backward it builds then fails with
# "AssertionError: wrong number of dimensions1" (a 1-D buffer where (1, 1, C) is expected). Off, the step
# compiles and runs (bench/train_lm.py; BENCHMARKS.md). For CUDA graphs add {"triton.cudagraphs": True}:
# torch.compile takes mode= or options=, not both.
COMPILE_OPTIONS = {"triton.mix_order_reduction": False}


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.cfg = cfg
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        vec = lambda: nn.Parameter(torch.zeros(1, 1, C))  # noqa: E731
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.a0, self.v0 = vec(), vec(), vec()
        self.w1 = nn.Parameter(torch.zeros(C, cfg.d_decay_lora))
        self.w2 = nn.Parameter(torch.zeros(cfg.d_decay_lora, C))
        self.a1 = nn.Parameter(torch.zeros(C, cfg.d_aaa_lora))
        self.a2 = nn.Parameter(torch.zeros(cfg.d_aaa_lora, C))
        self.v1 = nn.Parameter(torch.zeros(C, cfg.d_mv_lora))  # unused in layer 0 (it makes v_first)
        self.v2 = nn.Parameter(torch.zeros(cfg.d_mv_lora, C))
        self.g1 = nn.Parameter(torch.zeros(C, cfg.d_gate_lora))
        self.g2 = nn.Parameter(torch.zeros(cfg.d_gate_lora, C))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def mix_vectors(self) -> torch.Tensor:
        """The six token-shift mixes (6,C), in the order forward_mixed takes the mixed inputs."""
        return torch.cat([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g]).view(6, -1)

    def forward(self, x, shift, wkv_state, v_first, rnn: bool = False):
        """x (B,T,C) ln1 output; shift (B,C); wkv_state (B,H,N,N). Returns out, shift, wkv_state, v_first."""
        xx = token_shift(x, shift) - x
        mixed = [x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)]
        return self.forward_mixed(mixed, x[:, -1], wkv_state, v_first, rnn)

    def forward_mixed(self, mixed, new_shift, wkv_state, v_first, rnn: bool = False, fused: bool = False):
        """forward from the six mixed inputs (xr, xw, xk, xv, xa, xg), each (B,T,C), and the new shift.
        fused (GPT mode, ops/rwkv7/train.py): the arithmetic around the WKV kernel as two fused ops."""
        if fused:
            return self._forward_fused(mixed, new_shift, wkv_state, v_first)
        xr, xw, xk, xv, xa, xg = mixed
        B, T, C = xr.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731

        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # raw decay logit; the WKV op soft-clamps it
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:  # value residual: mix in layer 0's value
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        if rnn:
            y, wkv_state = wkv7_step(wkv_state, *(t[:, 0] for t in map(heads, (r, w, k, v, -kk, kk * a))))
            y = y.unsqueeze(1)
        else:
            y, wkv_state = wkv7(*map(heads, (r, w, k, v, -kk, kk * a)), state=wkv_state, impl=self.cfg.wkv_impl)
        y = F.group_norm(y.to(new_shift.dtype).reshape(B * T, C), H, self.ln_x.weight, self.ln_x.bias, LN_X_EPS)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)  # (B,T,H,N)
        y = y.view(B, T, C) + bonus.reshape(B, T, C)
        return self.output(y * g), new_shift, wkv_state, v_first

    def _forward_fused(self, mixed, new_shift, wkv_state, v_first):
        xr, xw, xk, xv, xa, xg = mixed
        B, T, C = xr.shape
        H, N, M = self.cfg.n_head, self.cfg.head_size, B * T
        rows = lambda t: t.reshape(M, C)  # noqa: E731
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w_l = torch.tanh(xw @ self.w1) @ self.w2
        a_l = (xa @ self.a1) @ self.a2
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.layer_id == 0:
            v_first, v_l, vf = v, None, None
        else:
            v_l, vf = rows((xv @ self.v1) @ self.v2), rows(v_first)
        v0 = self.v0 if self.layer_id else torch.zeros_like(self.v0)  # layer 0's stays unused (no gradient)
        vec5 = torch.cat([self.w0, self.a0, v0, self.k_k, self.k_a]).view(5, C)
        w, k, v, a, b = wkv_pre(rows(k), rows(v), v_l, rows(w_l), rows(a_l), vec5, vf, H, r.dtype)
        y, wkv_state = wkv7(heads(r), heads(w), heads(k), heads(v), heads(a), heads(b), state=wkv_state,
                            impl=self.cfg.wkv_impl)
        vec3 = torch.cat([self.r_k.view(1, C), self.ln_x.weight.view(1, C), self.ln_x.bias.view(1, C)])
        y = wkv_post(rows(y), rows(r), k, v, rows(g), vec3, H, r.dtype)
        return self.output(y.view(B, T, C)), new_shift, wkv_state, v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, shift):
        """x (B,T,C) ln2 output; shift (B,C). Returns out, shift."""
        xx = token_shift(x, shift) - x
        return self.forward_mixed(x + xx * self.x_k, x[:, -1])

    def forward_mixed(self, xk, new_shift):
        k = torch.relu(self.key(xk)) ** 2
        return self.value(k), new_shift


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, att_shift, wkv_state, ffn_shift, rnn: bool = False):
        if self.layer_id == 0:
            x = self.ln0(x)
        if not rnn and fused_train_enabled(x, self.att.cfg.head_size):
            # GPT mode on CUDA: each LayerNorm and its token-shift mixes as one op with a fused backward. The
            # mixes come in the products' dtype; the shift in the LayerNorm's (fp32 under autocast)
            device = x.device.type
            autocast = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
            ln_dtype = torch.float32 if autocast else x.dtype
            mixed, shift = ln_mix_seq(x, att_shift, self.ln1.weight, self.ln1.bias, self.att.mix_vectors(), dtype)
            dx, att_shift, wkv_state, v_first = self.att.forward_mixed(mixed, shift.to(ln_dtype), wkv_state, v_first,
                                                                       fused=True)
            x = x + dx
            mixed, ffn_shift = ln_mix_seq(x, ffn_shift, self.ln2.weight, self.ln2.bias, self.ffn.x_k.view(1, -1), dtype)
            dx, ffn_shift = self.ffn.forward_mixed(mixed[0], ffn_shift.to(ln_dtype))
            return x + dx, v_first, att_shift, wkv_state, ffn_shift
        dx, att_shift, wkv_state, v_first = self.att(self.ln1(x), att_shift, wkv_state, v_first, rnn)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, v_first, att_shift, wkv_state, ffn_shift


class RWKV7(Decoder):
    """The RWKV-7 decoder. ``lm(tokens)`` is GPT mode, ``lm.step(tokens_t, state)`` is RNN mode (lm/decoder.py).

    Both return (logits, state); the state after GPT mode is exactly the one RNN mode would reach.
    """

    STATE = RWKVState
    LR_SCALES = {"att.w0": 2.0}  # the decay's bias trains at twice the base rate, as in the official recipe

    def __init__(self, cfg: RWKV7Config, init: bool = True):
        cfg = cfg.resolved()
        if cfg.arch != DecoderArch.rwkv7:
            raise VisionRWKVError(f"RWKV7 builds decoder.arch=rwkv7, got {cfg.arch.value}; use build_decoder_model")
        super().__init__(cfg, nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)))
        if init:
            init_official_(self)

    def init_state(self, batch_size: int, device=None) -> RWKVState:
        cfg = self.config
        device = self.emb.weight.device if device is None else device
        return RWKVState.zeros(cfg.n_layer, batch_size, cfg.n_embd, cfg.head_size, device=device)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        cfg = self.config
        return RWKVState.shapes(cfg.n_layer, batch_size, cfg.n_embd, cfg.head_size)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Layer 0's value-residual mix (v0, v1, v2): layer 0 makes v_first rather than mixing it. They are
        kept for the official checkpoint layout."""
        att = self.blocks[0].att
        return [att.v0, att.v1, att.v2]

    def _run(self, x: torch.Tensor, state: RWKVState, rnn: bool):
        att, wkv_s, ffn = [], [], []
        v_first = None
        recompute = self.activation_checkpointing and not rnn and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            args = (x, v_first, state.att_shift[i], state.wkv[i], state.ffn_shift[i], rnn)
            x, v_first, a, s, f = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            att.append(a)
            wkv_s.append(s)
            ffn.append(f)
        dt = state.wkv.dtype
        new_state = RWKVState(
            torch.stack(att).to(dt), torch.stack(wkv_s).to(dt), torch.stack(ffn).to(dt)
        )
        return self.ln_out(x), new_state


@torch.no_grad()
def init_official_(model: RWKV7) -> RWKV7:
    """The official RWKV-7 per-parameter initialisation (RWKV-LM train_temp), written out here."""
    cfg = model.config
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    idx = torch.arange(C, dtype=torch.float32)
    ddd = (idx / C).view(1, 1, C)
    linear = idx / max(C - 1, 1) - 0.5
    zigzag = ((idx % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()

    def ortho(t: torch.Tensor, scale: float):
        gain = math.sqrt(t.shape[0] / t.shape[1]) if t.shape[0] > t.shape[1] else 1.0
        return nn.init.orthogonal_(t, gain=gain * scale)

    for i, block in enumerate(model.blocks):
        r01 = i / max(L - 1, 1)  # 0 -> 1 over depth
        r10 = 1.0 - i / L  # 1 -> almost 0
        att, ffn = block.att, block.ffn
        for p, e in ((att.x_r, 0.2), (att.x_w, 0.9), (att.x_k, 0.7), (att.x_v, 0.7), (att.x_a, 0.9), (att.x_g, 0.2)):
            p.copy_(1.0 - ddd.pow(e * r10))
        www = -6 + 6 * (idx / max(C - 1, 1)) ** (1 + r01**0.3)
        att.w0.copy_((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
        for lo, hi in ((att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)):
            lo.zero_()
            ortho(hi, 0.1)
        att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        nn.init.orthogonal_(att.receptance.weight, gain=1.0)
        nn.init.orthogonal_(att.key.weight, gain=0.1)
        nn.init.orthogonal_(att.value.weight, gain=1.0)
        att.output.weight.zero_()
        att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
        att.ln_x.bias.zero_()
        ffn.x_k.copy_(1.0 - ddd.pow(r10**4))
        nn.init.orthogonal_(ffn.key.weight, gain=1.0)
        ffn.value.weight.zero_()
        for ln in [block.ln1, block.ln2] + ([block.ln0] if i == 0 else []):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    V = cfg.vocab_size
    nn.init.orthogonal_(model.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
    return model
