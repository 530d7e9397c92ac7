"""Decoding in RNN mode: a prompt (or image prefix) runs in GPT mode, then one token at a time.

`decode_loop` is the shared core of greedy decoding and sampling: it takes the logits after the prefix and
the state, and steps each row until it emits a stop token or reaches max_new_tokens. Its bookkeeping stays
on the device (vision_rwkv.lm.readback says why): tokens go into a (B, max_new_tokens) tensor, finished rows
are a bool tensor, scores add up there, and the host reads back only a live-row count, a few steps late.
Finished rows leave the batch, so the work shrinks as captions end. Beam search is lm/beam.py.
"""

from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..errors import VisionRWKVError
from .decoder import Decoder
from .graphs import rnn_stepper
from .readback import LaggedRead, to_device, to_host
from .sampling import TokenChooser, token_ids
from .state import DecoderState


@torch.no_grad()
def decode_loop(lm: Decoder, logits: torch.Tensor, state: DecoderState, cfg: SamplingConfig,
                stop_ids, generator=None, scores: list[float] | None = None) -> list[list[int]]:
    """logits (B,V) after the prefix, state for B rows -> B lists of new token ids (stop token excluded).

    If `scores` is a list, it receives each row's log-probability of its tokens (and of the stop token,
    when one ended the row) under the model's own distribution, i.e. what GPT-mode scoring gives.

    On CUDA the steps replay CUDA graphs (vision_rwkv.lm.graphs), one per batch size. Finished rows then
    stay in the batch, ignored, until the live ones fit a smaller power of two, so a batch is captured
    at a few sizes only; eagerly, finished rows leave as soon as the host learns of them (at once on the
    CPU, LAG_STEPS steps later on CUDA). Rows never mix, so the tokens are the same; sampled draws depend
    on the batch sizes stepped, so they are reproducible for a given device and setting, not across them.
    """
    tokens, totals = decode_tokens(lm, logits, state, cfg, stop_ids, generator, with_scores=scores is not None)
    tokens, totals = to_host(tokens, totals)
    if scores is not None:
        scores[:] = totals.tolist()
    return [[t for t in row if t >= 0] for row in tokens.tolist()]


@torch.no_grad()
def decode_tokens(lm: Decoder, logits: torch.Tensor, state: DecoderState, cfg: SamplingConfig, stop_ids,
                  generator=None, with_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_loop on the device: -> tokens (B, max_new_tokens), each row's new tokens then -1s, and the
    rows' log-probabilities (B,) in fp64 (zeros unless with_scores), added in the order decode_loop adds them.
    """
    cfg.validate()
    B, V = logits.shape
    device, T = logits.device, cfg.max_new_tokens
    stop = token_ids(stop_ids, V, "the stop tokens (end-of-text and sampling.stop_tokens)")
    stop_t = to_device(stop, device)
    chooser = TokenChooser(cfg, B, V, device, generator)
    step = rnn_stepper(lm)
    graphed = getattr(step, "bucketed", False)
    # Row B of these is a sink: writes for finished and padding slots go there, so no index repeats elsewhere.
    out = torch.full((B + 1, T), -1, dtype=torch.long, device=device)
    totals = torch.zeros(B + 1, dtype=torch.float64, device=device)
    rows = torch.arange(B, device=device)  # (S,): the original row of each of the batch's S slots (S = B at first)
    live = torch.ones(B, dtype=torch.bool, device=device)  # (S,): still generating (False: finished, padding)
    live_count = LaggedRead(device)
    for n in range(T):
        tokens = chooser.choose(logits, extra_banned=stop if n < cfg.min_new_tokens else ())
        chooser.update(tokens)
        if with_scores:
            lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
            target = torch.where(live, rows, B)
            totals.index_put_((target,), totals[target] + lp.double())
        ended = (tokens.unsqueeze(1) == stop_t).any(1)  # (S,)
        live = live & ~ended
        out[torch.where(live, rows, B), n] = tokens
        if n == T - 1:
            break
        live_count.push(live.sum())
        n_live = live_count.read()  # a count from LAG_STEPS steps ago: at least the live rows now
        if n_live == 0:
            break
        if n_live is not None:
            size = _bucket(n_live) if graphed else n_live
            if size < rows.shape[0]:  # shrink the batch: live slots first (in order), then finished ones
                keep = torch.argsort((~live).to(torch.uint8), stable=True)[:size]
                rows, live, tokens, state = rows[keep], live[keep], tokens[keep], state[keep]
                chooser.keep_rows(keep)
        logits, state = step(tokens, state)
    return out[:B], totals[:B]


def _bucket(n: int) -> int:
    """The batch size a graphed decode runs n live rows at: the next power of two."""
    return 1 << (n - 1).bit_length()


@torch.no_grad()
def generate(lm: Decoder, tokenizer, prompt, *, sampling: SamplingConfig | None = None, state=None,
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
    new = decode_loop(lm, torch.cat(last), DecoderState.cat(states), cfg, stop, generator)
    texts = [tokenizer.decode(ids) for ids in new]
    return texts[0] if single else texts
