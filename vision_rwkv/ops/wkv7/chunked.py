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

from .reference import LOG_DECAY_SCALE, log_decay

DEFAULT_CHUNK = 32


def _to_chunks(x, n_chunks: int, L: int, dtype):
    """(B,T,H,N) -> (B,H,C,L,N) in `dtype`, zero-padded to C*L steps (with a log-decay of 0 past T the
    padded steps have decay 1 and zero inputs, so the state passes through them unchanged)."""
    B, T, H, N = x.shape
    x = x.to(dtype)
    if n_chunks * L > T:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n_chunks * L - T))
    return x.view(B, n_chunks, L, H, N).permute(0, 3, 1, 2, 4)


def _chunk_terms(lw, r_, k_, v_, a_, b_):
    """The state-free terms of every chunk at once (chunked inputs (B,H,C,L,N); names as in the module
    docstring): the cumulative log-decays, the scaled vectors, the four masked interaction matrices and
    the solves W = (I - A_ab)^{-1} a~, U0 = (I - A_ab)^{-1} A_ak V."""
    L = lw.shape[-2]
    G = lw.cumsum(dim=-2)  # inclusive: G_t
    inv = (-G).exp()
    t = {"G": G, "rt": r_ * G.exp(), "at": a_ * (G - lw).exp(), "bh": b_ * inv, "kh": k_ * inv}
    strict = torch.ones(L, L, dtype=torch.bool, device=lw.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=lw.device).tril(0)
    t["strict"], t["incl"] = strict, incl
    t["Aab"] = (t["at"] @ t["bh"].transpose(-1, -2)).masked_fill(~strict, 0)  # (B,H,C,L,L)
    t["Aak"] = (t["at"] @ t["kh"].transpose(-1, -2)).masked_fill(~strict, 0)
    t["Arb"] = (t["rt"] @ t["bh"].transpose(-1, -2)).masked_fill(~incl, 0)
    t["Ark"] = (t["rt"] @ t["kh"].transpose(-1, -2)).masked_fill(~incl, 0)
    t["lower"] = torch.eye(L, dtype=lw.dtype, device=lw.device) - t["Aab"]
    t["W"] = torch.linalg.solve_triangular(t["lower"], t["at"], upper=False, unitriangular=True)
    t["U0"] = torch.linalg.solve_triangular(t["lower"], t["Aak"] @ v_, upper=False, unitriangular=True)
    return t


def wkv7_chunked(r, w, k, v, a, b, state=None, chunk_len: int = DEFAULT_CHUNK):
    """Same contract as wkv7_reference. Differentiable through autograd."""
    B, T, H, N = r.shape
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    s = torch.zeros(B, H, N, N, dtype=compute, device=r.device) if state is None else state.to(compute)
    if T == 0:
        return r.new_zeros(B, 0, H, N), s.float() if compute != torch.float64 else s

    L = min(chunk_len, T)
    n_chunks = -(-T // L)
    lw = _to_chunks(log_decay(w), n_chunks, L, compute)
    r_, k_, v_, a_, b_ = (_to_chunks(x, n_chunks, L, compute) for x in (r, k, v, a, b))

    # U = (I - A_ab)^{-1} (A~ S0^T + A_ak V): the state-free parts are solved for all chunks at once.
    terms = _chunk_terms(lw, r_, k_, v_, a_, b_)
    G, r_t, A_rb = terms["G"], terms["rt"], terms["Arb"]
    Wa, Uv = terms["W"], terms["U0"]  # (B,H,C,L,N)
    G_last = G[..., -1:, :]  # (B,H,C,1,N)
    b_hat = b_ * (G_last - G).exp()  # b_s e^{G_L - G_s}
    k_hat = k_ * (G_last - G).exp()
    Yv = terms["Ark"] @ v_  # (B,H,C,L,N)
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


def wkv7_chunked_backward(r, w, k, v, a, b, dy, state=None, d_state=None, chunk_len: int = 16):
    """Gradients of sum(y * dy) + sum(final_state * d_state), by the explicit chunked backward.

    This is the algorithm of the tensor-core kernel (kernels/wkv7_chunk.cu) written in PyTorch, so the
    CPU tests can check its algebra against autograd. The forward keeps, per chunk, U and two solves
    that need no state, Pb = (I - A_ab)^{-T} b~ and R = (I - A_ab)^{-T} A_rb^T. Walking the chunks
    backwards with Z, the gradient of the chunk's final state, and Zs = Z diag(e^{G_L}):

        Q  = Pb Zs^T + R dY                              (dL/du_t = (I - A_ab)^{-T} (b~ Zs^T + A_rb^T dY))
        dV = k~ Zs^T + A_rk^T dY + A_ak^T Q
        M1 = (dY U^T) lower, M2 = (dY V^T) lower, M3 = (Q U^T) strict, M4 = (Q V^T) strict
        dr = e^{G} (dY S0 + M1 b~ + M2 k~)             da = e^{G_prev} (Q S0 + M3 b~ + M4 k~)
        dk = e^{-G} (V Zs + M2^T r~ + M4^T a~)        db = e^{-G} (U Zs + M1^T r~ + M3^T a~)
        dlog d_t = sum_{s>=t} (r dr - b db - k dk)_s + sum_{s>t} (a da)_s + colsum(Z o S_L)
        Z  <- Zs + dY^T r~ + Q^T a~                     (the gradient of the chunk's initial state)

    (the tildes as in the module docstring). Returns (dr, dw, dk, dv, da, db, d_state0), in float64.
    """
    B, T, H, N = r.shape
    f = torch.float64
    L = chunk_len
    n_chunks = max(1, -(-T // L))
    sig = torch.sigmoid(w.to(f))
    lw = _to_chunks(-LOG_DECAY_SCALE * sig, n_chunks, L, f)
    r_, k_, v_, a_, b_, dy_ = (_to_chunks(x, n_chunks, L, f) for x in (r, k, v, a, b, dy))
    terms = _chunk_terms(lw, r_, k_, v_, a_, b_)
    rt, at, bh, kh = terms["rt"], terms["at"], terms["bh"], terms["kh"]
    Aak, Arb, Ark, lower = terms["Aak"], terms["Arb"], terms["Ark"], terms["lower"]
    Wm, U0, strict, incl = terms["W"], terms["U0"], terms["strict"], terms["incl"]
    G = terms["G"]
    eG, eGp, einv = G.exp(), (G - lw).exp(), (-G).exp()
    GC = eG[..., -1:, :]  # (B,H,C,1,N)

    # what the forward kernel saves: the chunk-boundary states, U, and the state-free solves Pb and R
    upper = lower.transpose(-1, -2)
    Pb = torch.linalg.solve_triangular(upper, bh, upper=True, unitriangular=True)
    Rm = torch.linalg.solve_triangular(upper, Arb.transpose(-1, -2), upper=True, unitriangular=True)
    S = torch.zeros(B, H, N, N, dtype=f) if state is None else state.to(f)
    starts, Us = [], []
    for c in range(n_chunks):
        starts.append(S)
        U = Wm[:, :, c] @ S.transpose(-1, -2) + U0[:, :, c]
        Us.append(U)
        S = S * GC[:, :, c] + U.transpose(-1, -2) @ (bh[:, :, c] * GC[:, :, c]) + \
            v_[:, :, c].transpose(-1, -2) @ (kh[:, :, c] * GC[:, :, c])
    ends = starts[1:] + [S]

    Z = torch.zeros(B, H, N, N, dtype=f) if d_state is None else d_state.to(f)
    grads = {n: torch.zeros(B, H, n_chunks, L, N, dtype=f) for n in ("r", "lw", "k", "v", "a", "b")}
    for c in reversed(range(n_chunks)):
        S0, SL = starts[c], ends[c]
        x = {n: t[:, :, c] for n, t in (("rt", rt), ("at", at), ("bh", bh), ("kh", kh), ("V", v_), ("dY", dy_),
                                         ("Aak", Aak), ("Ark", Ark), ("Pb", Pb), ("R", Rm))}
        tail = (Z * SL).sum(dim=-2)  # colsum(Z o S_L), (B,H,N)
        Zs = Z * GC[:, :, c]
        U = Us[c]
        Q = x["Pb"] @ Zs.transpose(-1, -2) + x["R"] @ x["dY"]
        dV = x["kh"] @ Zs.transpose(-1, -2) + x["Ark"].transpose(-1, -2) @ x["dY"] + x["Aak"].transpose(-1, -2) @ Q
        M1 = (x["dY"] @ U.transpose(-1, -2)) * incl
        M2 = (x["dY"] @ x["V"].transpose(-1, -2)) * incl
        M3 = (Q @ U.transpose(-1, -2)) * strict
        M4 = (Q @ x["V"].transpose(-1, -2)) * strict
        dR = eG[:, :, c] * (x["dY"] @ S0 + M1 @ x["bh"] + M2 @ x["kh"])
        dA = eGp[:, :, c] * (Q @ S0 + M3 @ x["bh"] + M4 @ x["kh"])
        dK = einv[:, :, c] * (x["V"] @ Zs + M2.transpose(-1, -2) @ x["rt"] + M4.transpose(-1, -2) @ x["at"])
        dB = einv[:, :, c] * (U @ Zs + M1.transpose(-1, -2) @ x["rt"] + M3.transpose(-1, -2) @ x["at"])
        dG = r_[:, :, c] * dR - b_[:, :, c] * dB - k_[:, :, c] * dK
        aDA = a_[:, :, c] * dA
        # dlog d_t = sum_{s>=t} dG_s + sum_{s>t} aDA_s + tail
        rev = lambda m: m.flip(-2).cumsum(-2).flip(-2)  # noqa: E731
        dlw = rev(dG) + rev(aDA) - aDA + tail.unsqueeze(-2)
        Z = Zs + x["dY"].transpose(-1, -2) @ x["rt"] + Q.transpose(-1, -2) @ x["at"]
        for name, g in (("r", dR), ("lw", dlw), ("k", dK), ("v", dV), ("a", dA), ("b", dB)):
            grads[name][:, :, c] = g

    def unprep(g):
        return g.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * L, H, N)[:, :T]

    dlw = unprep(grads["lw"])
    dw = dlw * (-LOG_DECAY_SCALE) * sig * (1 - sig)
    return (unprep(grads["r"]), dw, unprep(grads["k"]), unprep(grads["v"]), unprep(grads["a"]), unprep(grads["b"]), Z)
