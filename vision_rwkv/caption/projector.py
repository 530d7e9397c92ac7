"""Projectors: encoder features -> decoder prefix embeddings (B, K, C).

Every projector takes the encoder's patch tokens (B, P, Dt) and pooled vector (B, Dp) and returns K
prefix embeddings of the decoder's width C. The decoder's ln0 normalises them on entry (once), so
the projectors need no output norm of their own.

- linear:    each patch token -> C                               K = P
- mlp:       each patch token -> 2-layer MLP (GELU) -> C          K = P
- clipcap:   pooled vector -> MLP -> prefix_len tokens            K = prefix_len
- resampler: prefix_len learned queries, `layers` blocks of cross-attention to the patch tokens + MLP
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ProjectorConfig
from ..errors import VisionRWKVError


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


_CLASSES = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "clipcap": ClipCapProjector,
    "resampler": ResamplerProjector,
}


def build_projector(cfg: ProjectorConfig, token_dim: int, pooled_dim: int, d_model: int) -> nn.Module:
    if cfg.kind in ("clipcap", "resampler") and cfg.prefix_len < 1:
        raise VisionRWKVError(f"projector.prefix_len must be >= 1 for {cfg.kind}, got {cfg.prefix_len}")
    return _CLASSES[cfg.kind](cfg, token_dim, pooled_dim, d_model)


def prefix_length(cfg: ProjectorConfig, num_patches: int) -> int:
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
