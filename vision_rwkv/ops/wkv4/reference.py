"""The plain per-step WKV-4 recurrence: the reference every faster version is checked against.

Per channel, with the decay w = -exp(time_decay) < 0 and the bonus u = time_first, RWKV-4 computes

    y_t = (a_t + e^(u + k_t) v_t) / (b_t + e^(u + k_t))
    a_{t+1} = e^w a_t + e^(k_t) v_t,    b_{t+1} = e^w b_t + e^(k_t)

a_t and b_t grow like e^k, so they are kept scaled by a running maximum: a = num * e^max, b = den * e^max.
The state is that triple (num, den, max), each (B, C) in fp32; a fresh one is (0, 0, -1e38).
"""

from __future__ import annotations

import torch

MAX_INIT = -1e38  # the running maximum of a fresh state: e^(MAX_INIT - anything) is 0


def fresh_state(B: int, C: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num, den, max) of a state that has seen no token."""
    zeros = torch.zeros(B, C, dtype=dtype, device=device)
    return zeros, zeros.clone(), torch.full((B, C), MAX_INIT, dtype=dtype, device=device)


def wkv4_step(w, u, k, v, state):
    """One step. w, u (C,); k, v (B,C); state (num, den, max) each (B,C). Returns y (B,C) and the new state,
    all in the state's dtype."""
    num, den, pmax = state
    dt = num.dtype
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    uk = u + k
    q = torch.maximum(pmax, uk)
    e1, e2 = torch.exp(pmax - q), torch.exp(uk - q)
    y = (e1 * num + e2 * v) / (e1 * den + e2)
    decayed = pmax + w
    q = torch.maximum(decayed, k)
    e1, e2 = torch.exp(decayed - q), torch.exp(k - q)
    return y, (e1 * num + e2 * v, e1 * den + e2, q)


def wkv4_reference(w, u, k, v, state=None):
    """w, u (C,); k, v (B,T,C); state (num, den, max) or None. Returns y (B,T,C) in k's dtype and the final
    state in fp32 (fp64 for fp64 inputs)."""
    B, T, C = k.shape
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    s = fresh_state(B, C, k.device, compute) if state is None else tuple(x.to(compute) for x in state)
    ys = []
    for t in range(T):
        y, s = wkv4_step(w, u, k[:, t], v[:, t], s)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C, dtype=compute)
    return y.to(k.dtype), s
