"""RWKV-4's RNN step on the CPU through the C++ kernels (kernels/rwkv4_cpu.cpp): every layer of a step in
one call, the weights read once for all rows.

`lm.step` runs each RWKV-4 layer as a few dozen PyTorch operations, its products through BLAS, which at a
few rows reads fp32 weights at a fraction of the memory's speed (the same measurement as RWKV-7's,
BENCHMARKS.md). `Step4Engine(lm).step(tokens, state)` runs the same step through the kernels RWKV-7's CPU
step is made of (cpu_common.h): LayerNorm, the token-shift mixes and the products that read them in one
pass; the WKV-4 update; the output, value and receptance products. It updates the state in place and
reads the weights from copies packed once per weight version:

    w_att (3C, C)     the time mix's key, value and receptance weights, one matrix
    w_ffn (F+C, C)    the channel mix's key and receptance weights
    mix_att (3, C), mix_ffn (2, C)   1 - time_mix_*: the kernels mix as x + (previous - x) * m
    decay (C)         -exp(time_decay), as lm.step computes it

The matrices keep the weights' dtype (fp32 or bf16: widened as they are read; under autocast, the autocast
dtype); everything else is fp32, as is the state. Up to 16 rows run here with fp32 products (with bf16 ones
up to cpu_step.fused_max_batch(n_embd), as RWKV-7's fused path); more, and anything the kernels cannot run
(fp16 weights, no C++ compiler, VISION_RWKV_FUSED_STEP=0), take lm.step (graphs.rnn_stepper decides).
"""

from __future__ import annotations

import torch

from ..errors import VisionRWKVError
from ..ops.rwkv7 import cpu_step, reference
from .engine import compute_dtype, weights_fingerprint
from .rwkv4 import RWKV4
from .state import RWKV4State

LAYER_TENSORS = 12  # LAYER_TENSORS in kernels/rwkv4_cpu.cpp


def unavailable_reason(lm: RWKV4, dtype: torch.dtype | None = None) -> str | None:
    """Why the C++ step cannot run this decoder now (its products in `dtype`; None: compute_dtype's), or None
    when it can. Builds and loads the kernels on first use."""
    if lm.emb.weight.device.type != "cpu":
        return "the RWKV-4 step's kernels are the CPU's"
    if lm.emb.weight.dtype not in cpu_step.WEIGHT_DTYPES:
        return f"the CPU kernels read an fp32 or bf16 embedding, and this decoder's is {lm.emb.weight.dtype}"
    return cpu_step.unavailable_reason(compute_dtype(lm) if dtype is None else dtype)


def _block_n(C: int, F: int) -> int:
    """Output columns per segment of the products' tables: a block never straddles two of their parts."""
    return next(n for n in (64, 32, 16, 8, 4, 2, 1) if C % n == 0 and F % n == 0)


class Step4Engine:
    compilable = False  # EngineStepper compiles RWKV-7's engine only (VISION_RWKV_COMPILE_STEP)

    def __init__(self, lm: RWKV4, dtype: torch.dtype | None = None):
        cfg = lm.config
        self.lm = lm
        self.dtype = compute_dtype(lm) if dtype is None else dtype
        reason = unavailable_reason(lm, self.dtype)
        if reason is not None:
            raise VisionRWKVError(f"the RWKV-4 CPU step cannot run: {reason}")
        self.block_n = _block_n(cfg.n_embd, cfg.dim_ffn)
        # rows the C++ step takes (more run lm.step): with fp32 products all it can, MAX_ROWS (at L12-D768 it was
        # 1.2x lm.step's speed at 12 and 16 rows, 2.0x at 8); with bf16 ones cpu_step.fused_max_batch, as RWKV-7's
        # fused path (lm.step with torch's bf16 products ties at 8 rows, and is 1.1x and 1.7x at 12 and 16:
        # this CPU has AVX-512 BF16); an inline timing on this project's 2-core machine, 2026-12-05
        self.max_rows = cpu_step.MAX_ROWS if self.dtype == torch.float32 else cpu_step.fused_max_batch(cfg.n_embd)
        self._layers: list[torch.Tensor] = []
        self._version: tuple = ()
        self.sync()

    def takes(self, batch_size: int) -> bool:
        return batch_size <= self.max_rows

    def sync(self, version: tuple | None = None) -> None:
        """Pack the weights again if any changed (moved, replaced or written in place) since the last packing."""
        version = weights_fingerprint(self.lm) if version is None else version
        if version != self._version:
            with torch.no_grad():
                self._pack()
            self._version = version

    def _mat(self, *ws: torch.Tensor) -> torch.Tensor:
        """The matrices ws stacked in the compute dtype: one matrix already in it is used as it is (no copy:
        the head alone is 154 MB in fp32 at RWKV-4 169M's shape)."""
        if len(ws) == 1 and ws[0].dtype == self.dtype:
            return ws[0].detach().contiguous()
        return torch.cat([w.detach() for w in ws]).to(self.dtype)

    def _pack(self) -> None:
        lm, C = self.lm, self.lm.config.n_embd
        vec = lambda t: t.detach().float().reshape(C).contiguous()  # noqa: E731  (C,) fp32: LayerNorms, mixes
        ln0 = lm.blocks[0].ln0
        self._layers = [vec(ln0.weight), vec(ln0.bias)]
        for block in lm.blocks:
            att, ffn = block.att, block.ffn
            self._layers += [
                vec(block.ln1.weight), vec(block.ln1.bias),
                1 - torch.stack([vec(att.time_mix_k), vec(att.time_mix_v), vec(att.time_mix_r)]),
                self._mat(att.key.weight, att.value.weight, att.receptance.weight),
                -torch.exp(vec(att.time_decay)), vec(att.time_first),
                self._mat(att.output.weight),
                vec(block.ln2.weight), vec(block.ln2.bias),
                1 - torch.stack([vec(ffn.time_mix_k), vec(ffn.time_mix_r)]),
                self._mat(ffn.key.weight, ffn.receptance.weight),
                self._mat(ffn.value.weight),
            ]
        self._layers += [vec(lm.ln_out.weight), vec(lm.ln_out.bias)]
        assert len(self._layers) == 2 + LAYER_TENSORS * lm.config.n_layer + 2
        self._emb = lm.emb.weight.detach()
        self._head = self._mat(lm.head.weight)
        bn, F = self.block_n, lm.config.dim_ffn
        table = lambda segs: torch.tensor([m + 256 * a for m, a in segs], dtype=torch.int32)  # noqa: E731
        self._seg_att = table([(0, reference.ACT_NONE)] * (C // bn) + [(1, reference.ACT_NONE)] * (C // bn)
                              + [(2, reference.ACT_SIGMOID)] * (C // bn))
        self._seg_ffn = table([(0, reference.ACT_RELU2)] * (F // bn) + [(1, reference.ACT_SIGMOID)] * (C // bn))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: RWKV4State) -> torch.Tensor:
        """tokens (B,) int64, B <= max_rows -> logits (B,V) fp32; `state` (fp32, contiguous) is updated in
        place. No checks beyond the kernel's own: the stepper (engine.EngineStepper) makes lm.step's."""
        B, C = tokens.shape[0], self.lm.config.n_embd
        xf = torch.empty(B, C)
        ln0_w, ln0_b, *layers, out_w, out_b = self._layers
        torch.ops.vision_rwkv_cpu.rwkv4_step_fused_(
            tokens.long().contiguous(), self._emb, ln0_w, ln0_b, layers, self._seg_att, self._seg_ffn,
            state.att_shift, state.num, state.den, state.max, state.ffn_shift, out_w, out_b, xf, self.block_n)
        logits = xf.new_empty(B, self._head.shape[0])
        cpu_step.linear_(xf, self._head, logits)
        return logits
