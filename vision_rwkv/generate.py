"""Decoding in RNN mode: a prompt (or image prefix) runs in GPT mode, then one token at a time.

`decode_loop` is the shared core: it takes the logits after the prefix and the state, and steps each
row until it emits a stop token or reaches max_new_tokens. Finished rows leave the batch, so the work
shrinks as captions end.
"""

from __future__ import annotations

import torch

from .config import SamplingConfig
from .errors import VisionRWKVError
from .rwkv7 import RWKV7
from .sampling import TokenChooser
from .state import RWKVState


@torch.no_grad()
def decode_loop(lm: RWKV7, logits: torch.Tensor, state: RWKVState, cfg: SamplingConfig,
                stop_ids, generator=None) -> list[list[int]]:
    """logits (B,V) after the prefix, state for B rows -> B lists of new token ids (stop token excluded)."""
    cfg.validate()
    B = logits.shape[0]
    device = logits.device
    stop = sorted({int(s) for s in stop_ids})
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    chooser = TokenChooser(cfg, B, logits.shape[-1], device, generator)
    out: list[list[int]] = [[] for _ in range(B)]
    active = torch.arange(B, device=device)  # which original rows are still generating
    for n in range(cfg.max_new_tokens):
        extra = stop if n < cfg.min_new_tokens else ()
        tokens = chooser.choose(logits, extra_banned=extra)
        chooser.update(tokens)
        done = torch.isin(tokens, stop_t) if stop else torch.zeros_like(tokens, dtype=torch.bool)
        for row, tok, fin in zip(active.tolist(), tokens.tolist(), done.tolist()):
            if not fin:
                out[row].append(tok)
        if n == cfg.max_new_tokens - 1:
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            active, tokens, state = active[keep], tokens[keep], state[keep]
            chooser.keep_rows(keep)
        logits, state = lm.step(tokens, state)
    return out


@torch.no_grad()
def generate(lm: RWKV7, tokenizer, prompt, *, sampling: SamplingConfig | None = None, state=None,
             generator=None):
    """Plain language-model use: prompt text in, continuation text out.

    prompt is a string or a list of strings (a batch; each prompt is prefilled on its own, then all
    rows decode together). state, if given, is the state to continue from (batch 1, or one per prompt).
    """
    cfg = (sampling or SamplingConfig()).validate()
    if cfg.strategy == "beam":
        raise VisionRWKVError("beam search is for captioning; for text use strategy greedy or sample")
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise VisionRWKVError("generate() needs at least one prompt")
    device = lm.emb.weight.device
    last, states = [], []
    for i, text in enumerate(prompts):
        ids = tokenizer.encode(text)
        s = None if state is None else (state if state.batch_size == 1 else state[i])
        if not ids:
            if s is None:
                raise VisionRWKVError("an empty prompt needs a state to continue from")
            raise VisionRWKVError("an empty prompt gives no logits to continue from; pass at least one token")
        logits, s = lm(torch.tensor([ids], device=device), s, last_only=True)
        last.append(logits)
        states.append(s)
    stop = [tokenizer.eos_id, *cfg.stop_tokens]
    new = decode_loop(lm, torch.cat(last), RWKVState.cat(states), cfg, stop, generator)
    texts = [tokenizer.decode(ids) for ids in new]
    return texts[0] if single else texts
