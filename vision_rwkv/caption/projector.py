"""Projectors: encoder features -> decoder prefix embeddings (B, K, C).

Every projector takes the encoder's patch tokens (B, P, Dt) and pooled vector (B, Dp) and returns K
prefix embeddings of the decoder's width C. The decoder's ln0 normalises them on entry (once), so
the projectors need no output norm of their own.

- linear:    each patch token -> C                               K = P
- mlp:       each patch token -> 2-layer MLP (GELU) -> C          K = P
- clipcap:   pooled vector -> MLP -> prefix_len tokens            K = prefix_len
- resampler: prefix_len learned queries, `layers` blocks of cross-attention to the patch tokens + MLP
- state:     the image as the decoder's initial RNN state (StateProjector); the prefix is one start
             embedding, so decoding starts after a single position instead of a prefill    K = 1
- state_prefix: the same state, and clipcap's prefix_len tokens as the prefix             K = prefix_len

Prefix projectors return the prefix (B,K,C); state projectors return (prefix, state), and
CaptionModel.condition() gives every caller both.

The state projector writes into each layer's WKV memory what that memory holds after reading tokens:
RWKV-7's state is a sum of outer products v kᵀ per head, so the image's is the mean over patches of
per-layer projections v_p k_pᵀ (keys L2-normalised per head, as RWKV-7 normalises its own), with a
learned scale per layer and head; RWKV-4's is a numerator, denominator and running maximum per channel,
so the image's is a softmax over patches of per-layer keys, weighting their values (the numerator
exp(k_p - max) v_p summed, the denominator exp(k_p - max) summed, and the maximum of k_p). Patch
tokens first pass a LayerNorm and one shared projection to state_rank channels; each layer's k and v
come from that (two Linear maps to n_layer x C, the bulk of the parameters: 2 L R C). The token-shift
states and the start embedding come from the pooled vector through a second rank-R projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderArch, DecoderConfig, ProjectorConfig
from ..errors import VisionRWKVError
from ..lm.state import DecoderState, RWKV4State, RWKVState


def _mlp(d_in: int, d_hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


class LinearProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, token_dim: int, pooled_dim: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(token_dim, d_model)

    def forward(self, tokens, pooled):
        return self.proj(tokens)  # (B,P,C)


class MLPProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, token_dim: int, pooled_dim: int, d_model: int):
        super().__init__()
        self.mlp = _mlp(token_dim, int(cfg.hidden_mult * d_model), d_model, cfg.dropout)

    def forward(self, tokens, pooled):
        return self.mlp(tokens)  # (B,P,C)


class ClipCapProjector(nn.Module):
    """ClipCap's MLP mapping: the pooled image vector becomes prefix_len embeddings."""

    def __init__(self, cfg: ProjectorConfig, token_dim: int, pooled_dim: int, d_model: int):
        super().__init__()
        self.k, self.c = cfg.prefix_len, d_model
        hidden = int(cfg.hidden_mult * d_model)
        self.mlp = _mlp(pooled_dim, hidden, cfg.prefix_len * d_model, cfg.dropout)

    def forward(self, tokens, pooled):
        return self.mlp(pooled).view(pooled.shape[0], self.k, self.c)  # (B,K,C)


class ResamplerBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, hidden_mult: float, dropout: float):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.mlp = _mlp(d_model, int(hidden_mult * d_model), d_model, dropout)

    def forward(self, q, kv):
        kv = self.ln_kv(kv)
        q = q + self.attn(self.ln_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.ln_mlp(q))


class ResamplerProjector(nn.Module):
    """prefix_len learned queries cross-attend to the (projected) patch tokens, layer after layer."""

    def __init__(self, cfg: ProjectorConfig, token_dim: int, pooled_dim: int, d_model: int):
        super().__init__()
        if d_model % cfg.heads:
            raise VisionRWKVError(f"projector.heads ({cfg.heads}) must divide the decoder width ({d_model})")
        self.inp = nn.Linear(token_dim, d_model)
        self.queries = nn.Parameter(torch.randn(cfg.prefix_len, d_model) * d_model**-0.5)
        self.blocks = nn.ModuleList(
            ResamplerBlock(d_model, cfg.heads, cfg.hidden_mult, cfg.dropout) for _ in range(cfg.layers)
        )

    def forward(self, tokens, pooled):
        kv = self.inp(tokens)  # (B,P,C)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B,K,C)
        for block in self.blocks:
            q = block(q, kv)
        return q


class StateProjector(nn.Module):
    """Patch tokens and pooled vector -> (prefix (B,K,C), the decoder's initial state). See the module
    docstring for the construction; `with_prefix` adds clipcap's prefix_len tokens in place of the
    single start embedding."""

    def __init__(self, cfg: ProjectorConfig, token_dim: int, pooled_dim: int, decoder: DecoderConfig,
                 with_prefix: bool = False):
        super().__init__()
        if cfg.state_rank < 1:
            raise VisionRWKVError(f"projector.state_rank must be >= 1, got {cfg.state_rank}")
        self.decoder = decoder = decoder.resolved()
        L, C, R = decoder.n_layer, decoder.n_embd, cfg.state_rank
        self.ln = nn.LayerNorm(token_dim)
        self.patches = nn.Linear(token_dim, R)
        self.key = nn.Linear(R, L * C)  # every layer's keys at once: (..., L*C)
        self.value = nn.Linear(R, L * C)
        self.pooled = nn.Linear(pooled_dim, R)
        self.shifts = nn.Linear(R, 2 * L * C)  # each layer's time-mix and channel-mix shift states
        if decoder.arch == DecoderArch.rwkv7:  # the state's size per head, learned (softplus keeps it positive)
            self.scale = nn.Parameter(torch.zeros(L, decoder.n_head))
        self.prefix = ClipCapProjector(cfg, token_dim, pooled_dim, C) if with_prefix else None
        if not with_prefix:
            self.start = nn.Linear(R, C)
        with torch.no_grad():  # start small: the decoder first sees little beyond the image's memory
            for lin in (self.key, self.value):
                nn.init.normal_(lin.weight, std=R**-0.5)
                lin.bias.zero_()
            self.shifts.weight.mul_(0.1)
            self.shifts.bias.zero_()

    def forward(self, tokens, pooled) -> tuple[torch.Tensor, DecoderState]:
        B, P, _ = tokens.shape
        L, C = self.decoder.n_layer, self.decoder.n_embd
        z = self.patches(self.ln(tokens))  # (B,P,R)
        k = self.key(z).view(B, P, L, C).permute(2, 0, 1, 3).float()  # (L,B,P,C)
        v = self.value(z).view(B, P, L, C).permute(2, 0, 1, 3).float()
        g = self.pooled(pooled)  # (B,R)
        shifts = self.shifts(g).view(B, 2, L, C).permute(1, 2, 0, 3).float()  # (2,L,B,C)
        prefix = self.prefix(tokens, pooled) if self.prefix is not None else self.start(g).unsqueeze(1)
        if self.decoder.arch == DecoderArch.rwkv4:
            top = k.amax(dim=2, keepdim=True)  # (L,B,1,C)
            e = torch.exp(k - top)
            state = RWKV4State(shifts[0], (e * v).sum(2), e.sum(2), top.squeeze(2), shifts[1])
        else:
            H, N = self.decoder.n_head, self.decoder.head_size
            k = F.normalize(k.view(L, B, P, H, N), dim=-1)
            v = v.view(L, B, P, H, N)
            scale = F.softplus(self.scale + 0.5413).view(L, 1, H, 1, 1) / P  # softplus(0.5413) = 1
            wkv = torch.einsum("lbphi,lbphj->lbhij", v, k) * scale  # (L,B,H,N,N), [value, key]
            state = RWKVState(shifts[0], wkv, shifts[1])
        return prefix, state


_CLASSES = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "clipcap": ClipCapProjector,
    "resampler": ResamplerProjector,
}
STATE_KINDS = ("state", "state_prefix")


def build_projector(cfg: ProjectorConfig, token_dim: int, pooled_dim: int, d_model: int,
                    decoder: DecoderConfig | None = None) -> nn.Module:
    """The projector of cfg.kind. The state kinds build the decoder's state, so they need its config."""
    if cfg.kind in ("clipcap", "resampler", "state_prefix") and cfg.prefix_len < 1:
        raise VisionRWKVError(f"projector.prefix_len must be >= 1 for {cfg.kind}, got {cfg.prefix_len}")
    if cfg.kind in STATE_KINDS:
        if decoder is None:
            raise VisionRWKVError(f"projector.kind={cfg.kind} needs the decoder's config to shape its state")
        return StateProjector(cfg, token_dim, pooled_dim, decoder, with_prefix=cfg.kind == "state_prefix")
    return _CLASSES[cfg.kind](cfg, token_dim, pooled_dim, d_model)


def prefix_length(cfg: ProjectorConfig, num_patches: int) -> int:
    if cfg.kind == "state":
        return 1
    return num_patches if cfg.kind in ("linear", "mlp") else cfg.prefix_len


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups for a projector: decay on 2-D Linear weights, none on biases, norms and queries."""
    linear = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    linear |= {id(m.in_proj_weight) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    decay, no_decay = [], []
    for p in module.parameters():
        (decay if id(p) in linear and p.dim() == 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "projector_decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "projector_no_decay"},
    ]
