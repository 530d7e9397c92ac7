"""The RWKV-4 decoder: the generation RWKV-LM and Hugging Face transformers first shipped, behind the same
interface as RWKV-7 (lm/decoder.py).

Parameter names and shapes are BlinkDL's (RWKV-LM's .pth files), so an official checkpoint's state dict
loads as it is; transformers' RwkvForCausalLM folders are renamed on loading (lm/hf.py). Per block:

    time mix (attention)   token shift with time_mix_k/v/r; k, v and a receptance gate r = sigmoid(...);
                           WKV-4 over k and v with the per-channel decay w = -exp(time_decay) and the
                           current token's bonus u = time_first (ops/wkv4); out = output(r * wkv)
    channel mix (ffn)      token shift with time_mix_k/r; sigmoid(receptance(xr)) * value(relu(key(xk))^2)

with ln0 on the embeddings before block 0. The RNN state per layer is transformers': the time mix's
shift vector, the WKV numerator, denominator and running maximum, and the channel mix's shift vector.

No rescaling: transformers halves the hidden state every `rescale_every` blocks in eval mode (and
divides the output weights to match) so that fp16 cannot overflow. We run bf16 or fp32, whose range
needs none, so our logits are transformers' with rescale_every=0; with rescaling on, the two differ only
through LayerNorm's eps seeing a smaller input (tests/test_rwkv4.py measures it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DecoderArch, DecoderConfig
from ..errors import VisionRWKVError
from ..ops.wkv4 import wkv4, wkv4_step
from .decoder import Decoder, token_shift
from .state import RWKV4State


def _mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """RWKV-4's token shift: mix * x + (1 - mix) * previous x."""
    return prev + (x - prev) * mix


class TimeMix(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.time_decay = nn.Parameter(torch.zeros(C))  # the decay is w = -exp(time_decay) per channel
        self.time_first = nn.Parameter(torch.zeros(C))  # u: the current token's bonus
        self.time_mix_k, self.time_mix_v, self.time_mix_r = (nn.Parameter(torch.zeros(1, 1, C)) for _ in range(3))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(self, x, shift, wkv_state, rnn: bool = False):
        """x (B,T,C) ln1 output; shift (B,C); wkv_state (num, den, max) each (B,C). Returns out, shift, wkv_state."""
        prev = token_shift(x, shift)
        k = self.key(_mix(x, prev, self.time_mix_k))
        v = self.value(_mix(x, prev, self.time_mix_v))
        r = torch.sigmoid(self.receptance(_mix(x, prev, self.time_mix_r)))
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()
        if rnn:
            y, wkv_state = wkv4_step(w, u, k[:, 0], v[:, 0], wkv_state)
            y = y.unsqueeze(1)
        else:
            y, wkv_state = wkv4(w, u, k, v, wkv_state, impl=self.cfg.wkv_impl)
        return self.output(r * y.to(r.dtype)), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.time_mix_k, self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C)), nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, shift):
        """x (B,T,C) ln2 output; shift (B,C). Returns out, shift."""
        prev = token_shift(x, shift)
        k = torch.relu(self.key(_mix(x, prev, self.time_mix_k))) ** 2
        r = torch.sigmoid(self.receptance(_mix(x, prev, self.time_mix_r)))
        return r * self.value(k), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, att_shift, num, den, pmax, ffn_shift, rnn: bool = False):
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, att_shift, (num, den, pmax) = self.att(self.ln1(x), att_shift, (num, den, pmax), rnn)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, att_shift, num, den, pmax, ffn_shift


class RWKV4(Decoder):
    """The RWKV-4 decoder. ``lm(tokens)`` is GPT mode, ``lm.step(tokens_t, state)`` is RNN mode."""

    STATE = RWKV4State

    def __init__(self, cfg: DecoderConfig, init: bool = True):
        cfg = cfg.resolved()
        if cfg.arch != DecoderArch.rwkv4:
            raise VisionRWKVError(f"RWKV4 builds decoder.arch=rwkv4, got {cfg.arch.value}; use build_decoder_model")
        super().__init__(cfg, nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)))
        if init:
            init_rwkv4_(self)

    def init_state(self, batch_size: int, device=None) -> RWKV4State:
        cfg = self.config
        device = self.emb.weight.device if device is None else device
        return RWKV4State.fresh(cfg.n_layer, batch_size, cfg.n_embd, device=device)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return RWKV4State.shapes(self.config.n_layer, batch_size, self.config.n_embd)

    def _run(self, x: torch.Tensor, state: RWKV4State, rnn: bool):
        layers = []
        recompute = self.activation_checkpointing and not rnn and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            args = (x, *(t[i] for t in state.tensors()), rnn)
            x, *layer = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            layers.append(layer)
        dt = state.num.dtype
        new_state = RWKV4State(*(torch.stack(field).to(dt) for field in zip(*layers)))
        return self.ln_out(x), new_state


@torch.no_grad()
def init_rwkv4_(model: RWKV4) -> RWKV4:
    """An initialisation after RWKV-4's design: decays spread from fast to slow channels and deeper layers
    remembering longer, token-shift mixes that lean on the previous token more in early layers, the
    branches' output projections at zero (each block starts as the identity), small embeddings."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    h = torch.arange(C, dtype=torch.float32)
    frac = (h / C).view(1, 1, C)
    for i, block in enumerate(model.blocks):
        depth = i / max(L - 1, 1)  # 0 -> 1 over depth
        shallow = 1.0 - i / L  # 1 -> almost 0
        att, ffn = block.att, block.ffn
        att.time_decay.copy_(-5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * depth))
        att.time_first.copy_(math.log(0.3) + 0.5 * ((h + 1) % 3 - 1))
        att.time_mix_k.copy_(frac ** shallow)
        att.time_mix_v.copy_(frac ** shallow + 0.3 * depth)
        att.time_mix_r.copy_(frac ** (0.5 * shallow))
        ffn.time_mix_k.copy_(frac ** shallow)
        ffn.time_mix_r.copy_(frac ** shallow)
        for zero in (att.key, att.receptance, att.output, ffn.receptance, ffn.value):
            zero.weight.zero_()
        nn.init.orthogonal_(att.value.weight)
        nn.init.orthogonal_(ffn.key.weight, gain=math.sqrt(cfg.dim_ffn / C) if cfg.dim_ffn > C else 1.0)
        for ln in [block.ln1, block.ln2] + ([block.ln0] if i == 0 else []):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    V = cfg.vocab_size
    nn.init.orthogonal_(model.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
    return model
