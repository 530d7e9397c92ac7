"""RNN mode of an RWKV-7 decoder through the fused step operations (vision_rwkv.ops.rwkv7).

`lm.step` runs each layer as about eighty small PyTorch operations. `StepEngine(lm).step(tokens, state)`
runs the same step as eleven launches a layer: four fused kernels (LayerNorm with the token-shift mixes,
the low-rank activations, the WKV update with everything around it, relu^2) and seven matrix products,
three of them batched (r, k, v together; the four low-rank paths together, twice). It updates the state
in place, which is what a CUDA graph needs (graphs.py captures it), and reads the weights from packed
copies made once per weight version:

    w_rkv  (3, C, C)       the receptance, key and value weights, transposed and stacked
    lora1  (4, C, R)       w1, a1, v1, g1 in LORA_ROWS order, zero-padded to the largest rank R
    lora2  (4, R, C)       w2, a2, v2, g2 likewise
    mix_att (6, C), vec (8, C) fp32: the time-mix vectors the kernels read

Other matrices are the parameters themselves, or copies cast to the compute dtype when the weights have
another (fp32 weights under bf16 autocast). The residual stream, LayerNorms and the state are fp32; the
inputs of the matrix products are rounded to the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import VisionRWKVError
from ..ops.rwkv7 import reference, step_ops
from .rwkv7 import RWKV7
from .state import RWKVState


def compute_dtype(lm: RWKV7) -> torch.dtype:
    """The dtype of the matrix products: autocast's where it is on for the decoder's device, else the weights'."""
    device = lm.emb.weight.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return lm.head.weight.dtype


class StepEngine:
    def __init__(self, lm: RWKV7, dtype: torch.dtype | None = None, ops=None):
        cfg = lm.config
        self.lm = lm
        self.dtype = compute_dtype(lm) if dtype is None else dtype
        self.ops = step_ops(lm.emb.weight.device, cfg.head_size, cfg.n_embd) if ops is None else ops
        self.lora_rank = -(-max(cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora) // 16) * 16
        self._buffers: dict[str, torch.Tensor] | None = None
        self._version: tuple = ()
        self.sync()

    @property
    def uses_kernels(self) -> bool:
        return self.ops is not reference

    # ---- weights -----------------------------------------------------------------------------------

    def _weight_version(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.lm.parameters())

    def sync(self) -> None:
        """Pack the weights again if any changed since the last packing. Values changed in place are
        written into the same buffers, so a graph captured over them stays valid; weights that moved
        (a .to(), a load that replaced tensors) get new buffers, and graphs.py captures again."""
        version = self._weight_version()
        if version == self._version:
            return
        moved = [ptr for ptr, _ in version] != [ptr for ptr, _ in self._version]
        with torch.no_grad():
            packed = self._pack()
            if self._buffers is None or moved:
                self._buffers = packed
            else:
                for name, t in packed.items():
                    if self._buffers[name].data_ptr() != t.data_ptr():
                        self._buffers[name].copy_(t)
        self._version = version

    def _mat(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach() if w.dtype == self.dtype else w.detach().to(self.dtype)

    def _pack(self) -> dict[str, torch.Tensor]:
        lm, R = self.lm, self.lora_rank
        f32 = lambda t: t.detach().float().reshape(-1)  # noqa: E731
        out = {"emb": lm.emb.weight.detach(), "head": self._mat(lm.head.weight)}
        for i, block in enumerate(lm.blocks):
            att, ffn = block.att, block.ffn
            lora = [(getattr(att, f"{n}1"), getattr(att, f"{n}2")) for n in reference.LORA_ROWS]
            out |= {
                f"{i}.w_rkv": torch.stack([w.weight.detach().t() for w in (att.receptance, att.key, att.value)])
                .to(self.dtype).contiguous(),
                f"{i}.lora1": torch.stack([_padded(lo.detach(), R, rows=False) for lo, _ in lora]).to(self.dtype),
                f"{i}.lora2": torch.stack([_padded(hi.detach(), R, rows=True) for _, hi in lora]).to(self.dtype),
                f"{i}.mix_att": torch.stack([f32(getattr(att, n)) for n in reference.ATT_MIX_ROWS]),
                f"{i}.mix_ffn": f32(ffn.x_k).unsqueeze(0),
                f"{i}.vec": torch.stack([f32(att.ln_x.weight if n == "ln_x_weight" else att.ln_x.bias
                                             if n == "ln_x_bias" else getattr(att, n))
                                         for n in reference.VEC_ROWS]),
                f"{i}.w_out": self._mat(att.output.weight),
                f"{i}.w_key": self._mat(ffn.key.weight),
                f"{i}.w_value": self._mat(ffn.value.weight),
            }
        return out

    # ---- the step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: RWKVState) -> torch.Tensor:
        """tokens (B,) -> logits (B,V); `state` (fp32, contiguous) is updated in place. No input checks
        beyond the state's layout: lm.step's checks read values back to the host, which graphs cannot."""
        for name in ("att_shift", "wkv", "ffn_shift"):
            t = getattr(state, name)
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise VisionRWKVError(f"the fused RNN step needs a contiguous fp32 state; {name} is "
                                      f"{t.dtype}{'' if t.is_contiguous() else ', not contiguous'}")
        lm, ops, p, dt = self.lm, self.ops, self._buffers, self.dtype
        tokens = tokens.contiguous()  # the kernels index rows by position
        B, C = tokens.shape[0], lm.config.n_embd
        dev = tokens.device
        x = torch.empty(B, C, device=dev)  # the residual stream, fp32
        v_first = torch.empty(B, C, device=dev)
        xs = torch.empty(6, B, C, device=dev, dtype=dt)
        xf = torch.empty(1, B, C, device=dev, dtype=dt)
        y = torch.empty(B, C, device=dev, dtype=dt)
        with torch.autocast(dev.type, enabled=False):
            ln0 = lm.blocks[0].ln0
            ops.embed_ln_(tokens, p["emb"], ln0.weight, ln0.bias, x)
            dx = None
            for i, block in enumerate(lm.blocks):
                ops.ln_mix_(x, dx, block.ln1.weight, block.ln1.bias, state.att_shift[i], p[f"{i}.mix_att"], xs)
                rkv = torch.bmm(xs[:3], p[f"{i}.w_rkv"])  # (3,B,C): r, k, v
                h = torch.bmm(xs[2:], p[f"{i}.lora1"])  # (4,B,R): v, w, a, g
                ops.lora_act_(h)
                lora = torch.bmm(h, p[f"{i}.lora2"])  # (4,B,C)
                ops.wkv_step_(state.wkv[i], rkv, lora, p[f"{i}.vec"], v_first, i == 0, y)
                dx = F.linear(y, p[f"{i}.w_out"])
                ops.ln_mix_(x, dx, block.ln2.weight, block.ln2.bias, state.ffn_shift[i], p[f"{i}.mix_ffn"], xf)
                k = F.linear(xf[0], p[f"{i}.w_key"])  # (B,F)
                ops.relu2_(k)
                dx = F.linear(k, p[f"{i}.w_value"])
            ops.ln_mix_(x, dx, lm.ln_out.weight, lm.ln_out.bias, None, None, xf)
            return F.linear(xf[0], p["head"])


def _padded(w: torch.Tensor, rank: int, rows: bool) -> torch.Tensor:
    """A low-rank factor zero-padded to `rank` rows ((r, C) -> (rank, C)) or columns ((C, r) -> (C, rank))."""
    z = w.new_zeros((rank, w.shape[1]) if rows else (w.shape[0], rank))
    (z[: w.shape[0]] if rows else z[:, : w.shape[1]]).copy_(w)
    return z
