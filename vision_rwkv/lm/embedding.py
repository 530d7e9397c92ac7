"""Sentence embeddings from a decoder, free: its ln_out hidden states pooled over a text, no training.

    vecs = embed_texts(lm, tokenizer, ["a small red circle", "a large blue square"])   # (2, C), unit length

Two poolings: "last" takes the final position's hidden state, the recurrence's reading of the whole
text; "mean" averages the hidden states of every position. The default is "last", chosen by measurement
(bench/embedding_retrieval.py, BENCHMARKS.md): with the demo decoder, finding the same shapes scene
described in another order among 200 scenes, recall@1 was 0.055 for last and 0.015 for mean (chance
0.005). Both are weak: a decoder trained only to caption learns no order-invariant meaning, and a
same-order paraphrase ("there is " before the caption) is found at 0.25 (last) and 0.39 (mean). Expect
more from a decoder pretrained on real text, and measure before relying on it.

A text of any length embeds in fixed memory: GPT mode runs over chunks of chunk_len tokens, carrying the
recurrent state from one chunk to the next, so only one chunk's hidden states exist at a time. Texts of
different lengths share a batch right-padded; a causal model's position t never sees what follows it,
so each row is read only at its own positions and padding changes nothing.

Only the decoder interface is used (hidden, init_state, config.n_embd), so any decoder that follows it
works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import VisionRWKVError

POOLS = ("last", "mean")
DEFAULT_POOL = "last"
DEFAULT_CHUNK_LEN = 256


@torch.no_grad()
def sentence_embedding(lm, tokens: Sequence[Sequence[int]] | torch.Tensor, lengths: torch.Tensor | None = None, *,
                       pool: str = DEFAULT_POOL, chunk_len: int = DEFAULT_CHUNK_LEN,
                       normalize: bool = True) -> torch.Tensor:
    """Token ids -> (B, C) float32 embeddings.

    tokens: a list of B token-id lists (any lengths, none empty), or a (B, T) integer tensor, right-padded
    when lengths (B,) says how many of each row's ids are real (default: all T). normalize: L2-normalise
    each row (the default, so a dot product is the cosine similarity). Runs without autograd: memory stays
    that of one chunk however long the text.
    """
    _check_options(pool, chunk_len)
    ids, lengths = _as_padded(tokens, lengths)
    ids, lengths = ids.to(_device_of(lm)), lengths.to(_device_of(lm))
    B, T = ids.shape
    state = lm.init_state(B)
    total = torch.zeros(B, lm.config.n_embd, dtype=torch.float32, device=ids.device)  # (B,C)
    for start in range(0, T, chunk_len):
        chunk = ids[:, start:start + chunk_len]  # (B,c)
        h, state = lm.hidden(tokens=chunk, state=state)  # (B,c,C)
        h = h.float()
        pos = torch.arange(start, start + chunk.shape[1], device=ids.device)  # (c,)
        if pool == "mean":
            real = (pos.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)  # (B,c,1)
            total += (h * real).sum(dim=1)
        else:
            ends_here = (lengths - 1 >= start) & (lengths - 1 < start + chunk.shape[1])  # (B,)
            rows = ends_here.nonzero().squeeze(1)
            total[rows] = h[rows, lengths[rows] - 1 - start]
    out = total / lengths.unsqueeze(1).float() if pool == "mean" else total
    return F.normalize(out, dim=1) if normalize else out


@torch.no_grad()
def embed_texts(lm, tokenizer, texts: Sequence[str], *, pool: str = DEFAULT_POOL, chunk_len: int = DEFAULT_CHUNK_LEN,
                batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
    """Texts -> (N, C) float32 embeddings, in input order (see sentence_embedding).

    Each text is stripped of surrounding whitespace and tokenized with tokenizer.encode, as training reads
    captions; a text with nothing left is an error. Texts are batched by length, so little is padding."""
    _check_options(pool, chunk_len)
    if isinstance(texts, str):
        raise VisionRWKVError("texts must be a list of strings, got one string; wrap it in a list")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise VisionRWKVError(f"batch_size is {batch_size!r}; expected a positive integer")
    ids = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise VisionRWKVError(f"text {i} is a {type(text).__name__}; expected a string")
        if not text.strip():
            raise VisionRWKVError(f"text {i} is empty; expected at least one non-space character")
        ids.append(tokenizer.encode(text.strip()))
    out = torch.zeros(len(ids), lm.config.n_embd, dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        vecs = sentence_embedding(lm, [ids[i] for i in rows], pool=pool, chunk_len=chunk_len, normalize=normalize)
        out[rows] = vecs.cpu()
    return out


def _check_options(pool: str, chunk_len: int) -> None:
    if pool not in POOLS:
        raise VisionRWKVError(f"pool is {pool!r}; expected one of {', '.join(POOLS)}")
    if not isinstance(chunk_len, int) or isinstance(chunk_len, bool) or chunk_len < 1:
        raise VisionRWKVError(f"chunk_len is {chunk_len!r}; expected a positive integer (tokens per GPT-mode chunk)")


def _as_padded(tokens, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of id lists or a (B,T) tensor (+ lengths) -> (B,T) long ids right-padded with 0, lengths (B,)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.dtype not in (torch.int64, torch.int32):
            raise VisionRWKVError(f"tokens must be a (B, T) integer tensor with B >= 1, got a {tokens.dtype} "
                                  f"tensor of shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long)
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
        if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise VisionRWKVError(f"lengths must be ({B},) with every length in [1, {T}], got {lengths.tolist()}")
        ids = tokens.long().clone()
        ids[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1).to(ids.device)] = 0  # padding -> a valid id
        return ids, lengths
    if lengths is not None:
        raise VisionRWKVError("lengths goes with a (B, T) tensor of tokens; a list of id lists has its own")
    rows = [list(row) for row in tokens]
    if not rows:
        raise VisionRWKVError("no texts to embed; expected at least one")
    for i, row in enumerate(rows):
        if not row:
            raise VisionRWKVError(f"text {i} has no tokens; expected at least one (an empty text has no embedding)")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, lengths


def _device_of(lm) -> torch.device:
    return next(lm.parameters()).device
