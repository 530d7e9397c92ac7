"""Captions from encoder features: the image prefix (and prompt) in GPT mode builds the state, then the
language model decodes in RNN mode (vision_rwkv.lm.generate: greedy and sampling; vision_rwkv.lm.beam:
beam search)."""

from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..lm.beam import Hypothesis, beam_search, rank_score
from ..lm.generate import decode_loop


@torch.no_grad()
def caption_features(model, tokens: torch.Tensor, pooled: torch.Tensor, cfg: SamplingConfig,
                     generator=None) -> list[list[Hypothesis]]:
    """Captions for a batch of encoder features: the prefix (and prompt) in GPT mode, then RNN mode.

    Every row's prefix has the same length, so the prefill needs no padding and each row's state is
    exactly its own. Returns, per image, num_return_sequences hypotheses, best first (sampling and
    greedy: one per draw, ranked by log-probability).
    """
    cfg.validate()
    lm = model.decoder
    logits, state = model.prefill(tokens, pooled)  # (B,V), the state after the prefix; a graph on CUDA
    stop = [model.eos_id, *cfg.stop_tokens]
    if cfg.strategy == "beam":
        return beam_search(lm, logits, state, cfg, stop)
    n = 1 if cfg.strategy == "greedy" or cfg.temperature == 0 else cfg.num_return_sequences
    B = logits.shape[0]
    if n > 1:
        rows = torch.arange(B, device=logits.device).repeat_interleave(n)
        logits, state = logits[rows], state[rows]
    scores: list[float] = []
    ids = decode_loop(lm, logits, state, cfg, stop, generator, scores=scores)
    hyps = []
    for i, s in zip(ids, scores):
        ended = len(i) < cfg.max_new_tokens  # a row that reached max_new_tokens was cut, not stopped
        hyps.append(Hypothesis(i, s, rank_score(s, len(i) + ended, cfg.length_penalty), ended))
    return [sorted(hyps[b * n:(b + 1) * n], key=lambda h: -h.logprob) for b in range(B)]
