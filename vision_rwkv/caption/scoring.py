"""Image-text matching with a caption model: log p(caption | image), the quantity training maximises.

A caption is scored as training reads it: stripped, tokenized with the model's tokenizer, after the image
prefix and the prompt, and followed by the end-of-text token, every one of its tokens counted (a caption longer than the
training run's data.max_caption_tokens is scored whole, where training cut it):

    [ prefix (K) | prompt (Lp) ] [ caption (n) ]   targets: caption_0 ... caption_{n-1}, eos

The prefix and prompt are prefilled once per image; each caption then runs in GPT mode from a copy of its
image's state (rows of the state repeated), so an image with many candidate captions costs one prefill.
Only the decoder interface is used: hidden(inputs_embeds= / tokens=, state=), head, and the state's row
indexing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import VisionRWKVError
from .model import pad_captions


def caption_ids(tokenizer, captions: Sequence[str]) -> list[list[int]]:
    """Captions -> token ids as training makes them (stripped, then encoded); an empty caption is an error."""
    if isinstance(captions, str):
        raise VisionRWKVError("captions must be a list of strings, got one string; wrap it in a list")
    ids = []
    for i, text in enumerate(list(captions)):
        if not isinstance(text, str):
            raise VisionRWKVError(f"caption {i} is a {type(text).__name__}; expected a string")
        if not text.strip():
            raise VisionRWKVError(f"caption {i} is empty; expected at least one non-space character to score")
        ids.append(tokenizer.encode(text.strip()))
    return ids


@torch.no_grad()
def score_captions(model, tokens: torch.Tensor, pooled: torch.Tensor, captions: list[list[int]],
                   image_rows: Sequence[int], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features of B images, captions as token ids, and each caption's image (a row of tokens).

    Returns the summed log-probability of each caption and its end-of-text (R,) and the number of
    targets summed, n + 1 (R,), both float32 on the CPU."""
    lm = model.decoder
    x, start = model.condition(tokens, pooled)  # the prefix embeddings, and a state projector's state (or None)
    h, state = lm.hidden(inputs_embeds=x, state=start)  # (B,K',C), state after the prefix
    first = h[:, -1]  # (B,C): the position that predicts caption_0
    sums, counts = [], []
    for start in range(0, len(captions), batch_size):
        rows = list(image_rows[start:start + batch_size])
        ids, lengths = pad_captions(captions[start:start + batch_size], first.device)  # (R,L), (R,)
        hc, _ = lm.hidden(tokens=ids, state=state[rows])  # (R,L,C): position j predicts caption_{j+1} or eos
        hs = torch.cat([first[rows].unsqueeze(1).to(hc.dtype), hc], dim=1)  # (R,L+1,C)
        R, L = ids.shape
        pos = torch.arange(L + 1, device=ids.device)
        real = pos.unsqueeze(0) <= lengths.unsqueeze(1)  # (R,L+1): caption tokens and the eos
        targets = torch.cat([ids, ids.new_zeros(R, 1)], dim=1).scatter(1, lengths.unsqueeze(1), model.eos_id)
        logits = lm.head(hs[real]).float()  # (N,V), only where a target exists
        lp = torch.log_softmax(logits, dim=-1).gather(1, targets[real].unsqueeze(1)).squeeze(1)  # (N,)
        row_of = torch.arange(R, device=ids.device).unsqueeze(1).expand(R, L + 1)[real]
        sums.append(torch.zeros(R, device=lp.device).index_add_(0, row_of, lp).cpu())
        counts.append((lengths + 1).float().cpu())
    if not sums:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(sums), torch.cat(counts)
