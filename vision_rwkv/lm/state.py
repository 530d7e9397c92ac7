"""The recurrent state of a decoder: what RNN mode carries from one token to the next.

The contract (what decoding, beam search, serving and a state projector may rely on):
- a state is a small dataclass of fp32 tensors, whatever the weights' dtype;
- every field holds all layers stacked along dim 0 and the batch rows along dim 1, so rows can be
  selected, reordered, repeated or joined at once for every field (state[rows], reorder_, cat);
- GPT mode returns exactly the state RNN mode would reach after the same tokens;
- save() and load() round-trip it through a safetensors file that names its kind.

Each decoder generation has its own fields:

    RWKVState (RWKV-7)    att_shift (L,B,C), wkv (L,B,H,N,N), ffn_shift (L,B,C)
    RWKV4State (RWKV-4)   att_shift (L,B,C), num, den, max (L,B,C) each, ffn_shift (L,B,C)

The shift vectors are the last token's LayerNorm output (the token shift's memory); the rest is the
WKV recurrence's memory (see ops/wkv7 and ops/wkv4 for its math).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .._fs import atomic_file
from ..errors import VisionRWKVError

STATE_FORMAT = "vision_rwkv.lm.state"
STATE_KEYS = ("att_shift", "wkv", "ffn_shift")  # RWKV-7's fields, in order


class DecoderState:
    """What every generation's state can do; subclasses are dataclasses whose fields are the tensors."""

    KIND: ClassVar[str]  # written into saved files, so a file loads as the state it was
    DESCRIPTION: ClassVar[str]  # the fields and their shapes, for error messages

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.names())

    def _map(self, fn) -> DecoderState:
        return type(self)(*(fn(t) for t in self.tensors()))

    @property
    def batch_size(self) -> int:
        return self.tensors()[0].shape[1]

    @property
    def n_layer(self) -> int:
        return self.tensors()[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    def __getitem__(self, rows) -> DecoderState:
        """Select, reorder or repeat batch rows: an int, a slice, a list or an index tensor."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        if isinstance(rows, slice):
            return self._map(lambda t: t[:, rows])
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return self._map(lambda t: t[:, idx])

    def reorder_(self, rows: torch.Tensor, scratch: DecoderState) -> DecoderState:
        """Select, reorder or repeat rows in place: rows (B,) indexes this state's B rows. The selected rows
        pass through scratch, a state of the same shape, so no new state is allocated (beam search does
        this at every step)."""
        for tensor, buffer in zip(self.tensors(), scratch.tensors()):
            torch.index_select(tensor, 1, rows, out=buffer)
            tensor.copy_(buffer)
        return self

    def copy_(self, other: DecoderState) -> DecoderState:
        """Overwrite every tensor in place with other's (the same kind and shape)."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)
        return self

    @staticmethod
    def cat(states: list[DecoderState]) -> DecoderState:
        """Join the rows of states of one kind."""
        kind = type(states[0])
        if any(type(s) is not kind for s in states):
            kinds = sorted({type(s).__name__ for s in states})
            raise VisionRWKVError(f"cannot join states of different kinds: {kinds}")
        return kind(*(torch.cat(ts, dim=1) for ts in zip(*(s.tensors() for s in states))))

    def to(self, device) -> DecoderState:
        return self._map(lambda t: t.to(device))

    def clone(self) -> DecoderState:
        return self._map(torch.Tensor.clone)

    def detach(self) -> DecoderState:
        return self._map(torch.Tensor.detach)

    def empty_like(self) -> DecoderState:
        return self._map(torch.empty_like)

    def contiguous_float(self) -> DecoderState:
        """A contiguous fp32 copy (a buffer of one's own to update in place)."""
        return self._map(lambda t: t.clone(memory_format=torch.contiguous_format).float())

    # ---- files ----------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the state to a safetensors file (atomically), e.g. a prompt's state to start many runs from."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous().cpu() for name, t in zip(self.names(), self.tensors())}
        with atomic_file(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT, "kind": self.KIND})

    @classmethod
    def load(cls, path, device=None) -> DecoderState:
        """Read a state written by save(). DecoderState.load takes any kind; a subclass's load only its own.
        Use it with a model of the same shape (lm.step checks)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta, names = f.metadata() or {}, set(f.keys())
                kind = _KINDS.get(meta.get("kind", RWKVState.KIND))  # files from before RWKV-4 are RWKV-7's
                if meta.get("format") != STATE_FORMAT or kind is None or names != set(kind.names()):
                    raise VisionRWKVError(f"{path} is not an RWKV state file; expected one written by a state's save()")
                if cls is not DecoderState and kind is not cls:
                    raise VisionRWKVError(f"{path} holds an {kind.KIND} state, not an {cls.KIND} one")
                state = kind(*(f.get_tensor(name).float().to(device) for name in kind.names()))
        except (SafetensorError, OSError) as e:
            raise VisionRWKVError(f"cannot read the state file {path}: {str(e).splitlines()[0]}") from None
        state.check_consistent(str(path))
        return state

    # ---- checks ---------------------------------------------------------------------------------------

    def check_shapes(self, expected: dict[str, tuple[int, ...]], model: str) -> None:
        """Raise one clear line if a tensor's shape is not the expected one for this model."""
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise VisionRWKVError(f"state.{name} has shape {got}, but {model} expects {shape}")

    def check_consistent(self, source: str) -> None:
        """The fields agree with each other (layers, rows, widths): one line naming the first that does not."""
        ranks = {name: len(shape) for name, shape in self.shapes(1, 1, 1, 1).items()}
        for name, t in zip(self.names(), self.tensors()):
            if t.dim() != ranks[name]:
                raise VisionRWKVError(f"{source} holds tensors of the wrong rank; expected {self.DESCRIPTION}")
        first = self.tensors()[0]
        L, B, C = first.shape[0], first.shape[1], first.shape[-1]
        self.check_shapes(self.shapes(L, B, C, self.head_size_hint()), f"a state with {L} layers, {B} rows, width {C}")

    def head_size_hint(self) -> int:
        return 1

    @classmethod
    def shapes(cls, n_layer: int, batch_size: int, n_embd: int, head_size: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError


@dataclass
class RWKVState(DecoderState):
    """RWKV-7's state. The WKV state is indexed [value, key]."""

    att_shift: torch.Tensor  # (L, B, C)
    wkv: torch.Tensor  # (L, B, H, N, N)
    ffn_shift: torch.Tensor  # (L, B, C)

    KIND: ClassVar[str] = "RWKV-7"
    DESCRIPTION: ClassVar[str] = "att_shift (L,B,C), wkv (L,B,H,N,N), ffn_shift (L,B,C)"

    @classmethod
    def zeros(cls, n_layer: int, batch_size: int, n_embd: int, head_size: int, device=None) -> RWKVState:
        f32 = dict(dtype=torch.float32, device=device)
        shapes = cls.shapes(n_layer, batch_size, n_embd, head_size)
        return cls(*(torch.zeros(shape, **f32) for shape in shapes.values()))

    @classmethod
    def shapes(cls, n_layer, batch_size, n_embd, head_size):
        H = n_embd // head_size
        return {"att_shift": (n_layer, batch_size, n_embd), "wkv": (n_layer, batch_size, H, head_size, head_size),
                "ffn_shift": (n_layer, batch_size, n_embd)}

    def head_size_hint(self) -> int:
        return self.wkv.shape[-1]

    def check_consistent(self, source: str) -> None:
        if self.att_shift.dim() == 3 and self.wkv.dim() == 5 and self.wkv.shape[-1] \
                and self.att_shift.shape[-1] != self.wkv.shape[2] * self.wkv.shape[-1]:
            raise VisionRWKVError(f"{source}: wkv has {self.wkv.shape[2]} heads of {self.wkv.shape[-1]}, which do "
                                  f"not make the width {self.att_shift.shape[-1]} of att_shift")
        super().check_consistent(source)

    def check(self, n_layer: int, n_embd: int, head_size: int, batch_size: int | None = None) -> None:
        """Raise one clear line if this state does not belong to an RWKV-7 model of this shape."""
        if not isinstance(self, RWKVState):
            raise VisionRWKVError(f"state must be an RWKVState, got {type(self).__name__}")
        B = self.batch_size if batch_size is None else batch_size
        self.check_shapes(self.shapes(n_layer, B, n_embd, head_size),
                          f"this model (n_layer={n_layer}, n_embd={n_embd}, head_size={head_size}) with batch {B}")


@dataclass
class RWKV4State(DecoderState):
    """RWKV-4's state: the WKV-4 numerator, denominator and running maximum per channel (ops/wkv4)."""

    att_shift: torch.Tensor  # (L, B, C)
    num: torch.Tensor  # (L, B, C)
    den: torch.Tensor  # (L, B, C)
    max: torch.Tensor  # (L, B, C); -1e38 in a fresh state
    ffn_shift: torch.Tensor  # (L, B, C)

    KIND: ClassVar[str] = "RWKV-4"
    DESCRIPTION: ClassVar[str] = "att_shift, num, den, max, ffn_shift, each (L,B,C)"

    @classmethod
    def fresh(cls, n_layer: int, batch_size: int, n_embd: int, device=None) -> RWKV4State:
        from ..ops.wkv4 import MAX_INIT

        zeros = lambda: torch.zeros(n_layer, batch_size, n_embd, dtype=torch.float32, device=device)  # noqa: E731
        return cls(zeros(), zeros(), zeros(), zeros().fill_(MAX_INIT), zeros())

    @classmethod
    def shapes(cls, n_layer, batch_size, n_embd, head_size=None):
        return {name: (n_layer, batch_size, n_embd) for name in cls.names()}


_KINDS = {kind.KIND: kind for kind in (RWKVState, RWKV4State)}
