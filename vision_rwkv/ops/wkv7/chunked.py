"""WKV-7 in chunks: exact, parallel inside each chunk, sequential only across chunks.

Within a chunk of L steps starting from state S0, let G_t = sum_{s<=t} log d_s (per key channel) and
u_t = S_{t-1} a_t (the unknown "pseudo value"). Unrolling the recurrence gives

    S_t = S0 diag(e^{G_t}) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) diag(e^{G_t - G_s})

so with a~_t = a_t e^{G_{t-1}}, r~_t = r_t e^{G_t}, b~_s = b_s e^{-G_s}, k~_s = k_s e^{-G_s}:

    u_t = S0 a~_t + sum_{s<t} u_s (b~_s . a~_t) + v_s (k~_s . a~_t)      (a unit lower-triangular solve)
    y_t = S0 r~_t + sum_{s<=t} u_s (b~_s . r~_t) + v_s (k~_s . r~_t)
    S_L = S0 diag(e^{G_L}) + sum_s (u_s b_s^T + v_s k_s^T) diag(e^{G_L - G_s})

Every log-decay lies in (-0.6065, 0), so over a chunk of 32 the factors e^{+-G} stay within
e^{+-19.4}: far inside fp32's range, and each product is a product, never a cancelling sum.
"""

from __future__ import annotations

import torch

from .reference import log_decay

DEFAULT_CHUNK = 32


def wkv7_chunked(r, w, k, v, a, b, state=None, chunk_len: int = DEFAULT_CHUNK):
    """Same contract as wkv7_reference. Differentiable through autograd."""
    B, T, H, N = r.shape
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    s = torch.zeros(B, H, N, N, dtype=compute, device=r.device) if state is None else state.to(compute)
    if T == 0:
        return r.new_zeros(B, 0, H, N), s.float() if compute != torch.float64 else s

    L = min(chunk_len, T)
    n_chunks = -(-T // L)
    pad = n_chunks * L - T

    def prep(x, is_log_decay=False):
        x = x.to(compute)
        if pad:  # padded steps: zero inputs and decay 1, so the state passes through unchanged
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        # (B,T,H,N) -> (B,H,C,L,N) with C chunks
        return x.view(B, n_chunks, L, H, N).permute(0, 3, 1, 2, 4)

    lw = prep(log_decay(w).to(compute), True)
    r_, k_, v_, a_, b_ = (prep(x) for x in (r, k, v, a, b))

    G = lw.cumsum(dim=-2)  # inclusive: G_t
    G_prev = G - lw  # exclusive: G_{t-1}
    G_last = G[..., -1:, :]  # (B,H,C,1,N)
    a_t = a_ * G_prev.exp()
    r_t = r_ * G.exp()
    inv = (-G).exp()
    b_t = b_ * inv
    k_t = k_ * inv
    b_hat = b_ * (G_last - G).exp()  # b_s e^{G_L - G_s}
    k_hat = k_ * (G_last - G).exp()

    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    A_ab = (a_t @ b_t.transpose(-1, -2)).masked_fill(~strict, 0)  # (B,H,C,L,L)
    A_ak = (a_t @ k_t.transpose(-1, -2)).masked_fill(~strict, 0)
    A_rb = (r_t @ b_t.transpose(-1, -2)).masked_fill(~incl, 0)
    A_rk = (r_t @ k_t.transpose(-1, -2)).masked_fill(~incl, 0)

    eye = torch.eye(L, dtype=compute, device=r.device)
    # U = (I - A_ab)^{-1} (A~ S0^T + A_ak V): the state-free parts are solved for all chunks at once.
    lower = eye - A_ab
    Wa = torch.linalg.solve_triangular(lower, a_t, upper=False, unitriangular=True)  # (B,H,C,L,N)
    Uv = torch.linalg.solve_triangular(lower, A_ak @ v_, upper=False, unitriangular=True)
    Yv = A_rk @ v_  # (B,H,C,L,N)
    Sv = k_hat.transpose(-1, -2) @ v_  # (B,H,C,N_key,N_value): the chunk's own contribution to S^T
    decay_all = G_last.exp().squeeze(-2).unsqueeze(-1)  # (B,H,C,N_key,1)

    sT = s.transpose(-1, -2)  # (B,H,N_key,N_value)
    ys = []
    for c in range(n_chunks):
        U = Wa[:, :, c] @ sT + Uv[:, :, c]  # (B,H,L,N_value)
        ys.append(r_t[:, :, c] @ sT + A_rb[:, :, c] @ U + Yv[:, :, c])
        sT = decay_all[:, :, c] * sT + b_hat[:, :, c].transpose(-1, -2) @ U + Sv[:, :, c]

    y = torch.stack(ys, dim=2)  # (B,H,C,L,N)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * L, H, N)[:, :T]
    s_out = sT.transpose(-1, -2).contiguous()
    if compute != torch.float64:
        s_out = s_out.float()
    return y.to(r.dtype), s_out
