"""The plain per-step WKV-7 recurrence: the reference every faster version is checked against.

For one head, with the state S of shape (N_value, N_key):

    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

where d_t = exp(-exp(-0.5) * sigmoid(w_t)) is the decay. w is the raw decay logit the model computes
(w0 + tanh(x w1) w2); the soft clamp keeps every decay in (exp(-exp(-0.5)), 1) = (0.545, 1).
"""

from __future__ import annotations

import math

import torch

LOG_DECAY_SCALE = math.exp(-0.5)  # -log(decay) = exp(-0.5) * sigmoid(w), in (0, 0.6065)


def log_decay(w: torch.Tensor) -> torch.Tensor:
    """log of the per-channel decay, computed in fp32 (or fp64 for fp64 inputs)."""
    w = w.float() if w.dtype != torch.float64 else w
    return -LOG_DECAY_SCALE * torch.sigmoid(w)


def wkv7_step(state, r, w, k, v, a, b):
    """One step for a batch of heads. state (B,H,N,N) fp32; r..b (B,H,N). Returns (y (B,H,N), state)."""
    dt = state.dtype
    r, k, v, a, b = (x.to(dt) for x in (r, k, v, a, b))
    decay = torch.exp(log_decay(w)).to(dt)
    sa = torch.einsum("bhij,bhj->bhi", state, a)  # (B,H,N) = S a
    state = state * decay.unsqueeze(-2) + sa.unsqueeze(-1) * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    y = torch.einsum("bhij,bhj->bhi", state, r)
    return y, state


def wkv7_reference(r, w, k, v, a, b, state=None):
    """r, w, k, v, a, b: (B,T,H,N); state: (B,H,N,N) or None. Returns y (B,T,H,N) in r's dtype, state fp32."""
    B, T, H, N = r.shape
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    s = torch.zeros(B, H, N, N, dtype=compute, device=r.device) if state is None else state.to(compute)
    ys = []
    for t in range(T):
        y, s = wkv7_step(s, r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N, dtype=compute)
    out_state = s if compute == torch.float64 else s.float()
    return y.to(r.dtype), out_state
