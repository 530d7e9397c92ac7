"""Typed configuration dataclasses for every component.

The library takes these dataclasses, never an OmegaConf object; Hydra's YAML in conf/ fills them and
the entry scripts convert. Every field is a plain type so a config can be saved beside the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import VisionRWKVError

WKV_IMPLS = ("auto", "cuda", "chunked", "reference")


def _lora_dim(n_embd: int, factor: float) -> int:
    # The official RWKV-7 suggestion: a multiple of 32 near factor*sqrt(C), at least 32.
    return max(32, int(round(factor * n_embd**0.5 / 32) * 32))


@dataclass
class RWKV7Config:
    """Shape of an RWKV-7 ("x070") decoder. The None fields take the official defaults."""

    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: Optional[int] = None  # 4 * n_embd, as in the released RWKV-7 models
    d_decay_lora: Optional[int] = None
    d_aaa_lora: Optional[int] = None
    d_mv_lora: Optional[int] = None
    d_gate_lora: Optional[int] = None
    wkv_impl: str = "auto"  # which WKV implementation GPT mode uses: auto | cuda | chunked | reference

    def resolved(self) -> RWKV7Config:
        """A copy with every None filled in, after checking that the shape is buildable."""
        for name in ("vocab_size", "n_layer", "n_embd", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise VisionRWKVError(f"decoder.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.head_size:
            raise VisionRWKVError(
                f"decoder.n_embd ({self.n_embd}) must be a multiple of decoder.head_size ({self.head_size})"
            )
        if self.wkv_impl not in WKV_IMPLS:
            raise VisionRWKVError(f"decoder.wkv_impl is {self.wkv_impl!r}; expected one of {', '.join(WKV_IMPLS)}")
        c = self.n_embd
        return dataclasses.replace(
            self,
            dim_ffn=self.dim_ffn or 4 * c,
            d_decay_lora=self.d_decay_lora or _lora_dim(c, 2.5),
            d_aaa_lora=self.d_aaa_lora or _lora_dim(c, 2.5),
            d_mv_lora=self.d_mv_lora or _lora_dim(c, 1.7),
            d_gate_lora=self.d_gate_lora or _lora_dim(c, 5.0),
        )

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RWKV7Config:
        return from_dict(cls, data, "decoder")


@dataclass
class SamplingConfig:
    """How the next token is chosen. Filters act on each row of a batch of logits independently.

    The filters see the model's own distribution (temperature 1), as in RWKV-LM; the temperature
    then reshapes what survives. temperature 0 (or strategy greedy) takes the argmax.
    """

    strategy: str = "greedy"  # greedy | sample | beam (beam: captioning only)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    top_a: float = 0.0  # 0.0: off; drops tokens with p < top_a * p_max**2
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0  # occurrence counts are multiplied by this after every step
    banned_tokens: list[int] = field(default_factory=list)
    stop_tokens: list[int] = field(default_factory=list)  # besides the tokenizer's end-of-text
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 4
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: Optional[int] = None

    def validate(self) -> SamplingConfig:
        if self.strategy not in ("greedy", "sample", "beam"):
            raise VisionRWKVError(f"sampling.strategy is {self.strategy!r}; expected greedy, sample or beam")
        checks = [
            (self.temperature >= 0, "sampling.temperature must be >= 0"),
            (self.top_k >= 0, "sampling.top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "sampling.top_p must be in (0, 1] (1 turns it off)"),
            (0 <= self.top_a <= 1, "sampling.top_a must be in [0, 1] (0 turns it off)"),
            (0 <= self.penalty_decay <= 1, "sampling.penalty_decay must be in [0, 1]"),
            (self.max_new_tokens >= 1, "sampling.max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "sampling.min_new_tokens must be in [0, max_new_tokens]"),
            (self.num_beams >= 1, "sampling.num_beams must be >= 1"),
            (1 <= self.num_return_sequences, "sampling.num_return_sequences must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise VisionRWKVError(f"{message}, got config {self.short()}")
        return self

    def short(self) -> str:
        default = SamplingConfig()
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)}
        return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"


def from_dict(cls, data: dict[str, Any], where: str):
    """Build a dataclass from a plain dict, naming the first unknown key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VisionRWKVError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise VisionRWKVError(f"unknown key {where}.{key}; expected one of {', '.join(sorted(names))}")
    return cls(**data)
