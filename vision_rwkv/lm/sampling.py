"""Choosing the next token from a batch of logits (B, V), each row on its own.

Order: bans, then penalties, then the filters (top-k, top-p, top-a) on the model's own distribution,
then temperature over what survives, then a draw from a seeded generator. Greedy takes the argmax
after bans and penalties.
"""

from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..errors import VisionRWKVError
from .readback import to_device

NEG_INF = float("-inf")


def token_ids(ids, vocab_size: int, what: str) -> list[int]:
    """Sorted distinct ids, each checked to lie in the vocabulary (one line naming `what` otherwise)."""
    ids = sorted({int(i) for i in ids})
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise VisionRWKVError(f"{what} holds token id {bad[0]}, outside the vocabulary; expected ids in "
                              f"[0, {vocab_size})")
    return ids


def ban_ids(banned, extra, vocab_size: int, device) -> torch.Tensor | None:
    """banned and extra (stop tokens during min_new_tokens) as one device tensor of ids, or None if there
    are none; made once per decode, so no step sends a list to the device."""
    ids = token_ids([*banned, *extra], vocab_size, "sampling.banned_tokens (with the stop tokens before "
                                                   "min_new_tokens)")
    if len(ids) >= vocab_size:
        raise VisionRWKVError(f"sampling.banned_tokens (with the stop tokens before min_new_tokens) ban all "
                              f"{vocab_size} tokens of the vocabulary; expected at least one token left to choose")
    return to_device(ids, device) if ids else None


def ban_tokens(logits: torch.Tensor, banned) -> torch.Tensor:
    """Set the banned token ids (a sequence, or a tensor of ids on the logits' device) to -inf in every row."""
    if banned is None or len(banned) == 0:
        return logits
    if not isinstance(banned, torch.Tensor):
        banned = torch.as_tensor(list(banned), dtype=torch.long, device=logits.device)
    return logits.index_fill(1, banned, NEG_INF)


def apply_penalties(logits, counts, presence: float, frequency: float) -> torch.Tensor:
    """logits - presence * [seen] - frequency * count, per row. counts (B,V) are decayed occurrences."""
    if counts is None or (presence == 0 and frequency == 0):
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    """True where a token is kept: the k most probable of each row (ties at the k-th kept)."""
    if k <= 0 or k >= probs.shape[-1]:
        return torch.ones_like(probs, dtype=torch.bool)
    kth = probs.topk(k, dim=-1).values[:, -1:]
    return probs >= kth


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches p (at least one per row)."""
    if p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep_sorted = mass_before < p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_a_mask(probs: torch.Tensor, a: float) -> torch.Tensor:
    """RWKV-LM's top-a: drop tokens whose probability is below a * p_max**2."""
    if a <= 0:
        return torch.ones_like(probs, dtype=torch.bool)
    p_max = probs.max(dim=-1, keepdim=True).values
    return probs >= a * p_max * p_max


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Logits (B,V) with every filtered token at -inf, and the temperature applied."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    keep = top_k_mask(probs, cfg.top_k) & top_p_mask(probs, cfg.top_p) & top_a_mask(probs, cfg.top_a)
    logits = logits.masked_fill(~keep, NEG_INF)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    return logits


def draw(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (B,V): the draw torch.multinomial(probs, 1) makes (argmax of probs over
    exponential noise, the same generator use), without the validity checks with which multinomial reads
    the probabilities back to the host at every call."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


class TokenChooser:
    """Keeps the per-row occurrence counts and the generator; picks one token per row each step."""

    def __init__(self, cfg: SamplingConfig, batch_size: int, vocab_size: int, device, generator=None):
        self.cfg = cfg.validate()
        self.vocab_size, self.device = vocab_size, device
        self._bans: dict[tuple, torch.Tensor | None] = {}  # extra bans -> all banned ids on the device
        self.counts = None
        if cfg.presence_penalty or cfg.frequency_penalty:
            self.counts = torch.zeros(batch_size, vocab_size, device=device)
        self.generator = generator
        if generator is None and cfg.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

    @property
    def greedy(self) -> bool:
        return self.cfg.strategy == "greedy" or self.cfg.temperature == 0

    def scores(self, logits: torch.Tensor, extra_banned=()) -> torch.Tensor:
        """Logits after bans and penalties: what greedy and beam search rank by."""
        logits = ban_tokens(logits.float(), self.banned(extra_banned))
        return apply_penalties(logits, self.counts, self.cfg.presence_penalty, self.cfg.frequency_penalty)

    def choose(self, logits: torch.Tensor, extra_banned=()) -> torch.Tensor:
        """(B,V) logits -> (B,) token ids."""
        logits = self.scores(logits, extra_banned)
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(filter_logits(logits, self.cfg), dim=-1)
        return draw(probs, self.generator)

    def banned(self, extra=()) -> torch.Tensor | None:
        """The configured bans with `extra` added, as device ids (None: nothing banned)."""
        key = tuple(extra)
        if key not in self._bans:
            self._bans[key] = ban_ids(self.cfg.banned_tokens, key, self.vocab_size, self.device)
        return self._bans[key]

    def update(self, tokens: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts *= self.cfg.penalty_decay
            ones = torch.ones(tokens.shape[0], 1, dtype=self.counts.dtype, device=self.counts.device)
            self.counts.scatter_add_(1, tokens.view(-1, 1), ones)

    def keep_rows(self, rows: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts = self.counts[rows]
