"""Beam search in RNN mode, every image's beams advanced together by tensor operations on the device.

The batch is B images x num_beams rows, beam-major per image, for the whole search. Each step ranks every
image's num_beams x V continuations at once, files the stop candidates among the best num_beams as finished
hypotheses, keeps the first num_beams other candidates as the next beams, and reorders the state rows in
place (DecoderState.reorder_, through one scratch state made at the start). Token histories and the best finished
hypotheses stay on the device; the host reads an all-done flag a few steps late (lm/readback.py) and
builds the Hypothesis lists once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SamplingConfig
from .decoder import Decoder
from .graphs import rnn_stepper
from .readback import LaggedRead, to_device, to_host
from .sampling import NEG_INF, ban_ids, token_ids
from .state import DecoderState


@dataclass
class Hypothesis:
    ids: list[int]  # new tokens, stop token excluded
    logprob: float  # sum of log-probabilities, the stop token's included when it ended the hypothesis
    score: float  # what beams are ranked by: logprob / length ** length_penalty
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)


def rank_score(logprob: float, length: int, penalty: float) -> float:
    return logprob / max(length, 1) ** penalty


@torch.no_grad()
def beam_search(lm: Decoder, logits: torch.Tensor, state: DecoderState, cfg: SamplingConfig,
                stop_ids) -> list[list[Hypothesis]]:
    """Beam search from B prefixes: logits (B,V) and state for B rows -> for each row its n best
    hypotheses (cfg.num_return_sequences), best first.

    Beams are ranked by logprob / length ** length_penalty, length counting the stop token. Banned tokens
    and min_new_tokens apply; presence/frequency penalties and the sampling filters do not (they are for
    sampling). A row stops once it holds num_beams finished hypotheses and no live beam can rank above
    the worst of them at its current length. Equal scores keep the order in which hypotheses were found.
    """
    cfg.validate()
    B, V = logits.shape
    nb, device = cfg.num_beams, logits.device
    stop = token_ids(stop_ids, V, "the stop tokens (end-of-text and sampling.stop_tokens)")
    bans = [ban_ids(cfg.banned_tokens, (), V, device)]  # [after min_new_tokens, before]
    bans.append(ban_ids(cfg.banned_tokens, stop, V, device) if cfg.min_new_tokens else bans[0])
    beams = _Beams(B, V, cfg, to_device(stop, device), device)
    image = torch.arange(B * nb, device=device) // nb  # (B*nb,) rows, beam-major per image
    state, logits = state[image], logits[image]
    scratch = state.empty_like()
    all_done = LaggedRead(device)
    step = rnn_stepper(lm)  # a CUDA graph replay per step on CUDA (the batch stays B*nb rows)
    for n in range(cfg.max_new_tokens):
        lp = torch.log_softmax(logits.float(), dim=-1)  # (B*nb, V)
        banned = bans[n < cfg.min_new_tokens]
        if banned is not None:
            lp.index_fill_(1, banned, NEG_INF)
        rows, tokens = beams.advance(n, lp)
        if n == cfg.max_new_tokens - 1:
            break
        all_done.push(beams.done.all())
        if all_done.read():  # from LAG_STEPS steps ago: done images stay done
            break
        state.reorder_(rows, scratch)
        logits, state = step(tokens, state)
    return beams.hypotheses(n)


class _Beams:
    """The device-side bookkeeping of a beam search over B images: live beams, their token histories, and
    each image's best finished hypotheses so far (K = max(num_beams, num_return_sequences) of them: the done
    rule reads the num_beams-th best, the result the first num_return_sequences)."""

    def __init__(self, B: int, V: int, cfg: SamplingConfig, stop: torch.Tensor, device):
        nb, T = cfg.num_beams, cfg.max_new_tokens
        self.B, self.V, self.nb, self.T, self.cfg, self.stop = B, V, nb, T, cfg, stop
        K = max(nb, cfg.num_return_sequences)
        self.lp = torch.full((B, nb), NEG_INF, device=device)  # live beams' log-probabilities; -inf: dead
        self.lp[:, 0] = 0.0  # all beams start equal: let only the first expand at step 0
        self.history = torch.zeros(B, nb, T, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.first_row = torch.arange(B, device=device).unsqueeze(1) * nb  # (B,1): row b*nb of the batch
        # finished hypotheses, best first (ties: filing order); score -inf marks an empty slot
        self.kept_score = torch.full((B, K), NEG_INF, dtype=torch.float64, device=device)
        self.kept_lp = torch.full((B, K), NEG_INF, device=device)
        self.kept_len = torch.zeros(B, K, dtype=torch.long, device=device)
        self.kept_ids = torch.zeros(B, K, T, dtype=torch.long, device=device)
        # length ** length_penalty by length, in Python's arithmetic as rank_score computes it, so the scores
        # compared here are the very doubles the host computes for the result
        self.norm = to_device([max(n, 1) ** cfg.length_penalty for n in range(T + 1)], device, torch.float64)

    def advance(self, n: int, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step n with lp (B*nb, V), the log-probabilities after bans: file finished candidates, pick the next
        beams, update the done flags. -> the state rows (B*nb,) to continue from and their next tokens (B*nb,).
        A dead beam (fewer live candidates than beams) and every beam of a done image continue from row
        b*nb with token 0, at -inf."""
        B, V, nb, T = self.B, self.V, self.nb, self.T
        cand = (self.lp.view(-1, 1) + lp).view(B, nb * V)
        top_lp, top_idx = cand.topk(min(2 * nb, nb * V), dim=1)  # (B, 2nb), best first
        parent, token = top_idx // V, top_idx % V
        searching = (top_lp > NEG_INF) & ~self.done.unsqueeze(1)
        is_stop = (token.unsqueeze(-1) == self.stop).any(-1)
        self._file(n, top_lp[:, :nb], parent[:, :nb], (searching & is_stop)[:, :nb])  # stops among the best nb
        go_on = searching & ~is_stop
        pick = torch.argsort((~go_on).to(torch.uint8), dim=1, stable=True)[:, :nb]  # the first nb that go on
        ok = go_on.gather(1, pick)  # (B, nb); False: a dead beam
        self.lp = torch.where(ok, top_lp.gather(1, pick), NEG_INF)
        parent = torch.where(ok, parent.gather(1, pick), 0)
        token = torch.where(ok, token.gather(1, pick), 0)
        self.history = self.history.gather(1, parent.unsqueeze(-1).expand(B, nb, T))
        self.history[:, :, n] = token
        self._update_done(n)
        return (self.first_row + parent).view(-1), token.view(-1)

    def _file(self, n: int, lp: torch.Tensor, parent: torch.Tensor, filed: torch.Tensor) -> None:
        """Merge the candidates marked `filed` (B, nb) (each a parent's n tokens, then a stop token) into the
        kept best finished hypotheses. The kept ones go first into a stable sort, so equal scores keep their
        filing order, as sorted() does."""
        B, T, K = self.B, self.T, self.kept_score.shape[1]
        score = torch.where(filed, lp.double() / self.norm[n + 1], NEG_INF)
        ids = self.history.gather(1, parent.unsqueeze(-1).expand(B, parent.shape[1], T))
        all_score = torch.cat([self.kept_score, score], dim=1)
        order = torch.argsort(all_score, dim=1, descending=True, stable=True)[:, :K]
        self.kept_score = all_score.gather(1, order)
        self.kept_lp = torch.cat([self.kept_lp, lp], dim=1).gather(1, order)
        self.kept_len = torch.cat([self.kept_len, torch.full_like(parent, n)], dim=1).gather(1, order)
        self.kept_ids = torch.cat([self.kept_ids, ids], dim=1).gather(1, order.unsqueeze(-1).expand(B, K, T))

    def _update_done(self, n: int) -> None:
        """An image is done once it holds nb finished hypotheses and its best live beam cannot rank above the
        worst of them at its current length (log-probabilities only fall: exact for length_penalty 0 and the
        usual heuristic otherwise), or once it has no live beam."""
        worst = self.kept_score[:, self.nb - 1]  # the nb-th best; -inf while fewer are finished
        best = self.lp.max(dim=1).values
        dead = best == NEG_INF
        beaten = (worst > NEG_INF) & (best.double() / self.norm[n + 1] <= worst)
        self.done = self.done | dead | beaten

    def hypotheses(self, n: int) -> list[list[Hypothesis]]:
        """After step n: each image's num_return_sequences best, the beams of images not done competing too."""
        cfg, nb = self.cfg, self.nb
        kept = to_host(self.kept_score, self.kept_lp, self.kept_len, self.kept_ids, self.done, self.lp, self.history)
        kept_score, kept_lp, kept_len, kept_ids, done, lp, history = (t.tolist() for t in kept)
        out = []
        for b in range(self.B):
            hyps = [Hypothesis(ids[:length], value, rank_score(value, length + 1, cfg.length_penalty), True)
                    for score, value, length, ids in zip(kept_score[b], kept_lp[b], kept_len[b], kept_ids[b])
                    if score > NEG_INF]
            if not done[b]:  # cut at max_new_tokens: its live beams compete too
                for k in range(nb):
                    if lp[b][k] > NEG_INF:
                        ids = history[b][k][: n + 1]
                        hyps.append(Hypothesis(ids, lp[b][k], rank_score(lp[b][k], len(ids), cfg.length_penalty),
                                               False))
            out.append(sorted(hyps, key=lambda h: -h.score)[: cfg.num_return_sequences])
        return out
