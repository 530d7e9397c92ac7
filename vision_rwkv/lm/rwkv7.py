"""The RWKV-7 ("x070", "Goose") decoder: one set of weights, two modes.

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

from ..config import RWKV7Config
from ..errors import VisionRWKVError
from ..ops.wkv7 import wkv7, wkv7_step
from .state import RWKVState

LN_X_EPS = 64e-5  # the official GroupNorm eps for ln_x


def _token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """(B,T,C), (B,C) -> (B,T,C): each position sees the previous token's x (prev for t=0)."""
    return torch.cat([prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


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

    def forward(self, x, shift, wkv_state, v_first, rnn: bool = False):
        """x (B,T,C) ln1 output; shift (B,C); wkv_state (B,H,N,N). Returns out, shift, wkv_state, v_first."""
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        xx = _token_shift(x, shift) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

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

        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        if rnn:
            y, wkv_state = wkv7_step(wkv_state, *(t[:, 0] for t in map(heads, (r, w, k, v, -kk, kk * a))))
            y = y.unsqueeze(1)
        else:
            y, wkv_state = wkv7(*map(heads, (r, w, k, v, -kk, kk * a)), state=wkv_state, impl=self.cfg.wkv_impl)
        y = F.group_norm(y.to(x.dtype).reshape(B * T, C), H, self.ln_x.weight, self.ln_x.bias, LN_X_EPS)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)  # (B,T,H,N)
        y = y.view(B, T, C) + bonus.reshape(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state, v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, shift):
        """x (B,T,C) ln2 output; shift (B,C). Returns out, shift."""
        xx = _token_shift(x, shift) - x
        k = torch.relu(self.key(x + xx * self.x_k)) ** 2
        return self.value(k), x[:, -1]


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
        dx, att_shift, wkv_state, v_first = self.att(self.ln1(x), att_shift, wkv_state, v_first, rnn)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, v_first, att_shift, wkv_state, ffn_shift


class RWKV7(nn.Module):
    """The decoder. ``lm(tokens)`` is GPT mode, ``lm.step(tokens_t, state)`` is RNN mode.

    Both return (logits, state); the state after GPT mode is exactly the one RNN mode would reach.
    """

    def __init__(self, cfg: RWKV7Config, init: bool = True):
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.check_inputs = True  # range-check token ids (one device sync per call)
        # GPT mode with autograd: recompute each block in the backward pass rather than keep its activations
        self.activation_checkpointing = False
        if init:
            init_official_(self)

    # ---- state -------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None) -> RWKVState:
        cfg = self.config
        device = self.emb.weight.device if device is None else device
        return RWKVState.zeros(cfg.n_layer, batch_size, cfg.n_embd, cfg.head_size, device=device)

    def state_for(self, state: RWKVState | None, batch_size: int) -> RWKVState:
        """A fresh state for None, else `state` after checking it fits this model and batch (one clear line)."""
        if state is None:
            return self.init_state(batch_size)
        if not isinstance(state, RWKVState):
            raise VisionRWKVError(f"state must be an RWKVState (from this model), got {type(state).__name__}")
        cfg = self.config
        state.check(cfg.n_layer, cfg.n_embd, cfg.head_size, batch_size)
        if state.device != self.emb.weight.device:
            raise VisionRWKVError(f"state is on {state.device}, but the model is on {self.emb.weight.device}")
        return state

    # ---- inputs ------------------------------------------------------------------------------------

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters no forward pass reads: layer 0's value-residual mix (v0, v1, v2; layer 0 makes
        v_first rather than mixing it). They are kept for the official checkpoint layout; training
        freezes them, since DistributedDataParallel requires every trained parameter to get a gradient."""
        att = self.blocks[0].att
        return [att.v0, att.v1, att.v2]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,T) token ids -> (B,T,C) embeddings (before ln0), after checking the ids."""
        self._check_ids(tokens)
        return self.emb(tokens)

    def _check_ids(self, tokens) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise VisionRWKVError(f"tokens must be an integer (Long) tensor, got {_describe(tokens)}")
        if self.check_inputs and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise VisionRWKVError(f"token id {bad} is outside this model's vocabulary: expected ids in [0, {V})")

    def checked_inputs(self, tokens, inputs_embeds) -> torch.Tensor:
        """The embeddings GPT mode runs on, (B,T,C), after the checks forward() makes on its inputs."""
        if (tokens is None) == (inputs_embeds is None):
            raise VisionRWKVError("give exactly one of tokens (B,T) or inputs_embeds (B,T,C)")
        if tokens is not None:
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] == 0:
                raise VisionRWKVError(f"tokens must have shape (B, T) with T >= 1, got {_describe(tokens)}")
            return self.embed(tokens)
        C = self.config.n_embd
        x = inputs_embeds
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != C or x.shape[1] == 0:
            raise VisionRWKVError(f"inputs_embeds must have shape (B, T, {C}) with T >= 1, got {_describe(x)}")
        return x.to(self.emb.weight.dtype) if not torch.is_autocast_enabled() else x

    # ---- the two modes -----------------------------------------------------------------------------

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

    def hidden(self, tokens=None, state=None, *, inputs_embeds=None):
        """GPT mode up to ln_out: (B,T,C) hidden states and the final state."""
        x = self.checked_inputs(tokens, inputs_embeds)
        return self._run(x, self.state_for(state, x.shape[0]), rnn=False)

    def forward(self, tokens=None, state=None, *, inputs_embeds=None, last_only: bool = False):
        """GPT mode. tokens (B,T) or inputs_embeds (B,T,C), optional initial state.

        Returns logits (B,T,V) (or (B,V) for the last position with last_only=True) and the final state.
        """
        h, state = self.hidden(tokens, state, inputs_embeds=inputs_embeds)
        if last_only:
            h = h[:, -1]
        return self.head(h), state

    def step(self, tokens: torch.Tensor, state: RWKVState | None = None):
        """RNN mode: tokens (B,) -> logits (B,V) and the updated state."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise VisionRWKVError(f"step() takes one token per row, shape (B,), got {_describe(tokens)}")
        self._check_ids(tokens)
        return self.step_unchecked(tokens, self.state_for(state, tokens.shape[0]))

    def step_unchecked(self, tokens: torch.Tensor, state: RWKVState):
        """step() without the input checks, which read values back to the host (CUDA graphs capture this)."""
        h, state = self._run(self.emb(tokens.unsqueeze(1)), state, rnn=True)
        return self._logits_one_row(h[:, 0]) if h.shape[0] == 1 else self.head(h[:, 0]), state

    def _logits_one_row(self, h: torch.Tensor) -> torch.Tensor:
        """The head for one row. On the CPU, without autograd, it reads a transposed copy of the head's weight:
        a (1,C) x (C,V) product over contiguous rows runs about twice as fast there as F.linear over the
        (V,C) weight (BENCHMARKS.md, the CPU decoder), and the head is most of a step's bytes. The copy is
        made on first use and again whenever the weight changes."""
        w = self.head.weight
        if h.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return self.head(h)
        key = (w.data_ptr(), w._version, w.dtype)
        if getattr(self, "_head_t_key", None) != key:
            self._head_t = w.detach().t().contiguous()
            self._head_t_key = key
        return h.to(w.dtype) @ self._head_t

    # ---- training ----------------------------------------------------------------------------------

    def param_groups(self, weight_decay: float, lr_scale_w0: float = 2.0) -> list[dict]:
        """AdamW groups: decay on the 2-D projection matrices (every nn.Linear weight) only.

        Embedding, LayerNorm/GroupNorm, mixing vectors and the low-rank adapters get none, and
        att.w0 trains at lr_scale_w0 times the base rate, as in the official recipe.
        """
        linear = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        decay, no_decay, w0 = [], [], []
        for name, p in self.named_parameters():
            if name.endswith("att.w0"):
                w0.append(p)
            elif id(p) in linear and p.dim() == 2:
                decay.append(p)
            else:
                no_decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
            {"params": w0, "weight_decay": 0.0, "lr_scale": lr_scale_w0, "name": "w0"},
        ]


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


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
