"""Beam search in RNN mode, for captioning: num_beams rows per image, ranked by length-normalised
log-probability."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SamplingConfig
from .graphs import rnn_stepper
from .rwkv7 import RWKV7
from .state import RWKVState


@dataclass
class Hypothesis:
    ids: list[int]  # new tokens, stop token excluded
    logprob: float  # sum of log-probabilities, the stop token's included when it ended the hypothesis
    score: float  # what beams are ranked by: logprob / length ** length_penalty
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)


def rank_score(logprob: float, length: int, penalty: float) -> float:
    return logprob / max(length, 1) ** penalty


@torch.no_grad()
def beam_search(lm: RWKV7, logits: torch.Tensor, state: RWKVState, cfg: SamplingConfig,
                stop_ids) -> list[list[Hypothesis]]:
    """Beam search from B prefixes: logits (B,V) and state for B rows -> for each row its n best
    hypotheses (cfg.num_return_sequences), best first.

    Beams are ranked by logprob / length ** length_penalty, length counting the stop token. Banned tokens
    and min_new_tokens apply; presence/frequency penalties and the sampling filters do not (they are for
    sampling). A row stops once it holds num_beams finished hypotheses and no live beam can rank above
    the worst of them at its current length.
    """
    cfg.validate()
    B, V = logits.shape
    nb, device = cfg.num_beams, logits.device
    stop = sorted({int(s) for s in stop_ids})
    state = state[torch.arange(B, device=device).repeat_interleave(nb)]  # (B*nb) rows, beam-major per image
    logits = logits.repeat_interleave(nb, dim=0)
    beam_lp = torch.full((B, nb), float("-inf"), device=device)
    beam_lp[:, 0] = 0.0  # all beams start equal: let only the first expand at step 0
    history: list[list[list[int]]] = [[[] for _ in range(nb)] for _ in range(B)]
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    banned = list(cfg.banned_tokens)
    step = rnn_stepper(lm)  # a CUDA graph replay per step on CUDA (the batch stays B*nb rows)
    for n in range(cfg.max_new_tokens):
        extra = banned + (stop if n < cfg.min_new_tokens else [])
        lp = torch.log_softmax(logits.float(), dim=-1)
        if extra:
            lp[:, extra] = float("-inf")
        cand = (beam_lp.view(-1, 1) + lp).view(B, nb * V)
        top_lp, top_idx = cand.topk(min(2 * nb, nb * V), dim=1)  # (B, 2nb)
        next_rows, next_tokens, next_lp = [], [], []
        for b in range(B):
            rows, toks, lps = _advance(b, n, top_lp[b].tolist(), top_idx[b].tolist(), V, nb, stop, history,
                                       finished, done, cfg)
            next_rows += rows
            next_tokens += toks
            next_lp.append(lps)
        beam_lp = torch.tensor(next_lp, device=device)
        if all(done) or n == cfg.max_new_tokens - 1:
            break
        rows_t = torch.tensor(next_rows, device=device)
        logits, state = step(torch.tensor(next_tokens, device=device), state[rows_t])
    for b in range(B):  # rows cut at max_new_tokens: their live beams compete too
        if not done[b]:
            for k in range(nb):
                if beam_lp[b, k] > float("-inf") and history[b][k] is not None:
                    ids = history[b][k]
                    value = float(beam_lp[b, k])
                    finished[b].append(Hypothesis(ids, value, rank_score(value, len(ids), cfg.length_penalty), False))
    return [sorted(f, key=lambda h: -h.score)[: cfg.num_return_sequences] for f in finished]


def _advance(b, n, top_lp, top_idx, V, nb, stop, history, finished, done, cfg):
    """One image's step: file finished candidates, pick the next nb live beams.

    Returns the state rows to continue from (into the B*nb layout), their next tokens and log-probs.
    A done image keeps nb placeholder beams (row b*nb, token 0, -inf) so the batch shape stays fixed.
    """
    if done[b]:
        return [b * nb] * nb, [0] * nb, [float("-inf")] * nb
    rows, toks, lps, new_hist = [], [], [], []
    for rank, (value, idx) in enumerate(zip(top_lp, top_idx)):
        if value == float("-inf"):
            break
        beam, tok = divmod(idx, V)
        ids = history[b][beam]
        if tok in stop:
            if rank < nb:  # a stop among the best nb candidates ends a hypothesis
                score = rank_score(value, len(ids) + 1, cfg.length_penalty)
                finished[b].append(Hypothesis(list(ids), value, score, True))
            continue
        rows.append(b * nb + beam)
        toks.append(tok)
        lps.append(value)
        new_hist.append(ids + [tok])
        if len(rows) == nb:
            break
    while len(rows) < nb:  # fewer live candidates than beams: pad with dead beams
        rows.append(b * nb)
        toks.append(0)
        lps.append(float("-inf"))
        new_hist.append(None)
    history[b] = new_hist
    if len(finished[b]) >= nb:
        worst = sorted(h.score for h in finished[b])[-nb]
        best_live = max(lps)
        # Log-probabilities only fall, so a live beam's rank at its next length is bounded by this
        # (exact for length_penalty 0 and the usual heuristic otherwise).
        if best_live == float("-inf") or rank_score(best_live, n + 1, cfg.length_penalty) <= worst:
            done[b] = True
    elif all(v == float("-inf") for v in lps):
        done[b] = True
    return rows, toks, lps
