"""The decoding loops as they were before issue 19 (vision_rwkv/lm/generate.py at commit d0f645c), copied
verbatim, as the reference the device-side loops are tested against (tests/test_decode_equivalence.py)
and timed against (bench/decode_path.py). Only tests and benchmarks import this module.

They read every token back to the host, shrink the batch with Python lists, advance beams image by image
in Python and gather the whole state each beam step. TokenChooser's choice and ban_tokens are those of the
same commit (torch.multinomial, bans indexed with Python lists), so the reference makes its own draws.
"""

from __future__ import annotations

import torch

from vision_rwkv.config import SamplingConfig
from vision_rwkv.lm import sampling
from vision_rwkv.lm.beam import Hypothesis, rank_score  # unchanged by issue 19, shared rather than copied
from vision_rwkv.lm.graphs import rnn_stepper
from vision_rwkv.lm.rwkv7 import RWKV7
from vision_rwkv.lm.sampling import NEG_INF, apply_penalties, filter_logits
from vision_rwkv.lm.state import RWKVState  # noqa: F401  (as the original imported it)


@torch.no_grad()
def decode_loop(lm: RWKV7, logits: torch.Tensor, state: RWKVState, cfg: SamplingConfig,
                stop_ids, generator=None, scores: list[float] | None = None) -> list[list[int]]:
    """logits (B,V) after the prefix, state for B rows -> B lists of new token ids (stop token excluded).

    If `scores` is a list, it receives each row's log-probability of its tokens (and of the stop token,
    when one ended the row) under the model's own distribution, i.e. what GPT-mode scoring gives.

    On CUDA the steps replay CUDA graphs (vision_rwkv.lm.graphs), one per batch size. Finished rows then
    stay in the batch, ignored, until the live ones fit a smaller power of two, so a batch is captured
    at a few sizes only; eagerly, finished rows leave at once. Rows never mix, so the tokens are the same.
    """
    cfg.validate()
    B = logits.shape[0]
    device = logits.device
    stop = sorted({int(s) for s in stop_ids})
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    chooser = TokenChooser(cfg, B, logits.shape[-1], device, generator)
    step = rnn_stepper(lm)
    graphed = getattr(step, "bucketed", False)
    out: list[list[int]] = [[] for _ in range(B)]
    rows = list(range(B))  # the original row of each slot of the batch
    live = [True] * B  # slots still generating (False: finished, or padding)
    total = [0.0] * B
    for n in range(cfg.max_new_tokens):
        extra = stop if n < cfg.min_new_tokens else ()
        tokens = chooser.choose(logits, extra_banned=extra)
        chooser.update(tokens)
        if scores is not None:
            lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
            for row, ok, value in zip(rows, live, lp.tolist()):
                if ok:
                    total[row] += value
        done = torch.isin(tokens, stop_t) if stop else torch.zeros_like(tokens, dtype=torch.bool)
        for i, (tok, fin) in enumerate(zip(tokens.tolist(), done.tolist())):
            if live[i]:
                if fin:
                    live[i] = False
                else:
                    out[rows[i]].append(tok)
        if n == cfg.max_new_tokens - 1:
            break
        n_live = sum(live)
        if n_live == 0:
            break
        size = _bucket(n_live) if graphed else n_live
        if size < len(rows):  # shrink the batch: live slots first, then padding copies of the first one
            keep = [i for i, ok in enumerate(live) if ok]
            keep += [keep[0]] * (size - len(keep))
            keep_t = torch.tensor(keep, device=device)
            rows = [rows[i] for i in keep]
            live = [True] * n_live + [False] * (size - n_live)
            tokens, state = tokens[keep_t], state[keep_t]
            chooser.keep_rows(keep_t)
        logits, state = step(tokens, state)
    if scores is not None:
        scores[:] = total
    return out


def _bucket(n: int) -> int:
    """The batch size a graphed decode runs n live rows at: the next power of two."""
    return 1 << (n - 1).bit_length()


# ---- beam search ------------------------------------------------------------------------------------


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


class TokenChooser(sampling.TokenChooser):
    """lm/sampling.py's TokenChooser as it chose at d0f645c: bans indexed with Python lists, draws by
    torch.multinomial. Its counts, generator and row selection have not changed since, so they are inherited."""

    def scores(self, logits: torch.Tensor, extra_banned=()) -> torch.Tensor:
        """Logits after bans and penalties: what greedy and beam search rank by."""
        logits = ban_tokens(logits.float(), list(self.cfg.banned_tokens) + list(extra_banned))
        return apply_penalties(logits, self.counts, self.cfg.presence_penalty, self.cfg.frequency_penalty)

    def choose(self, logits: torch.Tensor, extra_banned=()) -> torch.Tensor:
        """(B,V) logits -> (B,) token ids."""
        logits = self.scores(logits, extra_banned)
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(filter_logits(logits, self.cfg), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def ban_tokens(logits: torch.Tensor, banned) -> torch.Tensor:
    """Set the banned token ids to -inf in every row."""
    if banned is None or len(banned) == 0:
        return logits
    logits = logits.clone()
    logits[:, torch.as_tensor(list(banned), dtype=torch.long, device=logits.device)] = NEG_INF
    return logits
