"""Decoding in RNN mode: a prompt (or image prefix) runs in GPT mode, then one token at a time.

`decode_loop` is the shared core: it takes the logits after the prefix and the state, and steps each
row until it emits a stop token or reaches max_new_tokens. Finished rows leave the batch, so the work
shrinks as captions end. Beam search is lm/beam.py.
"""

from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..errors import VisionRWKVError
from .graphs import rnn_stepper
from .rwkv7 import RWKV7
from .sampling import TokenChooser
from .state import RWKVState


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
