"""The recurrent state of an RWKV-7 decoder: what RNN mode carries from one token to the next.

Per layer it holds the time-mix shift vector (the last token's ln1 output), the WKV state and the
channel-mix shift vector (the last token's ln2 output). Everything is fp32 whatever the weights'
dtype. Layers are stacked along dim 0 so rows (dim 1) can be selected, reordered or joined at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .._fs import atomic_file
from ..errors import VisionRWKVError

STATE_FORMAT = "vision_rwkv.lm.state"
STATE_KEYS = ("att_shift", "wkv", "ffn_shift")


@dataclass
class RWKVState:
    att_shift: torch.Tensor  # (L, B, C)
    wkv: torch.Tensor  # (L, B, H, N, N), indexed [value, key]
    ffn_shift: torch.Tensor  # (L, B, C)

    @classmethod
    def zeros(cls, n_layer: int, batch_size: int, n_embd: int, head_size: int, device=None) -> RWKVState:
        H = n_embd // head_size
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            att_shift=torch.zeros(n_layer, batch_size, n_embd, **f32),
            wkv=torch.zeros(n_layer, batch_size, H, head_size, head_size, **f32),
            ffn_shift=torch.zeros(n_layer, batch_size, n_embd, **f32),
        )

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[1]

    @property
    def device(self) -> torch.device:
        return self.wkv.device

    def __getitem__(self, rows) -> RWKVState:
        """Select, reorder or repeat batch rows: an int, a slice, a list or an index tensor."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        if isinstance(rows, slice):
            return RWKVState(self.att_shift[:, rows], self.wkv[:, rows], self.ffn_shift[:, rows])
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return RWKVState(self.att_shift[:, idx], self.wkv[:, idx], self.ffn_shift[:, idx])

    def reorder_(self, rows: torch.Tensor, scratch: RWKVState) -> RWKVState:
        """Select, reorder or repeat rows in place: rows (B,) indexes this state's B rows. The selected rows
        pass through scratch, a state of the same shape, so no new state is allocated (beam search does
        this at every step)."""
        for name in STATE_KEYS:
            tensor, buffer = getattr(self, name), getattr(scratch, name)
            torch.index_select(tensor, 1, rows, out=buffer)
            tensor.copy_(buffer)
        return self

    @staticmethod
    def cat(states: list[RWKVState]) -> RWKVState:
        return RWKVState(
            torch.cat([s.att_shift for s in states], dim=1),
            torch.cat([s.wkv for s in states], dim=1),
            torch.cat([s.ffn_shift for s in states], dim=1),
        )

    def to(self, device) -> RWKVState:
        return RWKVState(self.att_shift.to(device), self.wkv.to(device), self.ffn_shift.to(device))

    def clone(self) -> RWKVState:
        return RWKVState(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def detach(self) -> RWKVState:
        return RWKVState(self.att_shift.detach(), self.wkv.detach(), self.ffn_shift.detach())

    # ---- files ----------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the state to a safetensors file (atomically), e.g. a prompt's state to start many runs from."""
        from safetensors.torch import save_file

        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in STATE_KEYS}
        with atomic_file(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})

    @classmethod
    def load(cls, path, device=None) -> RWKVState:
        """Read a state written by save(). Use it with a model of the same shape (lm.step checks)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta, names = f.metadata() or {}, set(f.keys())
                if meta.get("format") != STATE_FORMAT or names != set(STATE_KEYS):
                    raise VisionRWKVError(f"{path} is not an RWKV state file; expected one written by "
                                          "RWKVState.save (tensors att_shift, wkv, ffn_shift)")
                state = cls(*(f.get_tensor(name).float().to(device) for name in STATE_KEYS))
        except (SafetensorError, OSError) as e:
            raise VisionRWKVError(f"cannot read the state file {path}: {str(e).splitlines()[0]}") from None
        if state.att_shift.dim() != 3 or state.wkv.dim() != 5:
            raise VisionRWKVError(f"{path} holds tensors of the wrong rank; expected att_shift (L,B,C), "
                                  "wkv (L,B,H,N,N), ffn_shift (L,B,C)")
        L, B, C = state.att_shift.shape
        state.check(L, C, state.wkv.shape[-1], B)  # the three agree with each other
        return state

    def check(self, n_layer: int, n_embd: int, head_size: int, batch_size: int | None = None) -> None:
        """Raise one clear line if this state does not belong to a model of this shape."""
        if not isinstance(self, RWKVState):
            raise VisionRWKVError(f"state must be an RWKVState, got {type(self).__name__}")
        H = n_embd // head_size
        B = self.batch_size if batch_size is None else batch_size
        expected = {
            "att_shift": (n_layer, B, n_embd),
            "wkv": (n_layer, B, H, head_size, head_size),
            "ffn_shift": (n_layer, B, n_embd),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise VisionRWKVError(
                    f"state.{name} has shape {got}, but this model (n_layer={n_layer}, n_embd={n_embd}, "
                    f"head_size={head_size}) with batch {B} expects {shape}"
                )
