"""Both modes of an RWKV-7 decoder's inference through one family of fused operations (vision_rwkv.ops.rwkv7).

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

With the kernels there is a second, fused path for a few rows (six launches a layer: LayerNorm, the
mixes and the products that read them in one kernel, ln_mix_matmul; the other products as one-pass
matrix-vector kernels, linear_), packed as w_in (3C + 4R, C), of which w_rkv and lora1 are views, and
lora2_in (4C, R), the four second low-rank matrices as four groups of one product; FUSED_MAX_BATCH says
when it runs. On the CPU the fused path runs the C++ kernels of ops/rwkv7/cpu_step.py (fp32 activations and
fp32 or bf16 weights, up to cpu_step.fused_max_batch(n_embd) rows, every layer in one call, step_fused_, and
the head through the one-pass linear_); the split path's products go through oneDNN's packed weights (fp32),
and with bf16 products the split path and the prefill keep the kernels' fp32 activations, each product's
input rounded to bf16 on its way in and its output widened (act_dtype).

GPT mode for inference (`engine.prefill(x, state)`: an image prefix or a prompt, forward only) runs each
layer through the same packed weights and the same family, about fourteen launches a layer: ln_mix_seq_
(LayerNorm and the six mixes with the position before), the r, k, v and low-rank products batched as in the
split path, lora_act_, wkv_pre_, the WKV-7 kernel over the whole sequence (ops/wkv7), wkv_post_, the output
product, ln_mix_seq_ again, the channel mix's two products and relu2_. Only the last position's logits
are computed, as a prefill needs.

Other matrices are the parameters themselves, or copies cast to the compute dtype when the weights have
another (fp32 weights under bf16 autocast). The residual stream, LayerNorms and the state are fp32; the
inputs of the matrix products are rounded to the compute dtype.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F

from ..errors import VisionRWKVError
from ..ops.rwkv7 import reference, step_ops
from .rwkv7 import RWKV7
from .state import DecoderState, RWKVState


def compute_dtype(lm: RWKV7) -> torch.dtype:
    """The dtype of the matrix products: autocast's where it is on for the decoder's device, else the weights'."""
    device = lm.emb.weight.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return lm.head.weight.dtype


# Batches up to this size take the fused path (six launches a layer, ln_mix_matmul_ and linear_ in their
# one-pass form), larger ones the split path (eleven, cuBLAS's products but for the one-pass linear_ up
# to its GEMV_MAX_ROWS). The one-pass LayerNorm product stops paying at more than two rows (H200,
# 2026-12-03, BENCHMARKS.md); the tiled form it takes above that was slower than the split path.
FUSED_MAX_BATCH = 2


def weights_fingerprint(module: torch.nn.Module) -> tuple[tuple, tuple]:
    """(where, versions) of every parameter of module: where is each one's address and dtype, which change when
    a weight is moved or replaced (graphs then capture again); versions its in-place version counter, which
    changes when its values do (packed weights are then packed again). A plain walk of the module tree,
    about 3x faster than module.parameters() (no de-duplication: a tied weight counts twice, harmlessly):
    the decoder's steppers check it at every decode, and the CPU step at every step."""
    where: list = []
    versions: list = []

    def walk(m: torch.nn.Module) -> None:
        for p in m._parameters.values():
            if p is not None:
                where.append(p.data_ptr())
                where.append(p.dtype)
                versions.append(p._version)
        for child in m._modules.values():
            if child is not None:
                walk(child)

    walk(module)
    return tuple(where), tuple(versions)


class StepEngine:
    def __init__(self, lm: RWKV7, dtype: torch.dtype | None = None, ops=None, onednn: bool | None = None,
                 reduce: bool = False):
        """dtype: of the matrix products (None: compute_dtype(lm)); ops: the step ops' module (None: the
        kernels where they run); onednn: oneDNN's packed products on the CPU (None: where they work);
        reduce: one-row products as multiply-and-sum over (out, in) weights, which only torch.compile
        should run (it makes them one streaming reduction; eagerly they would build the whole product)."""
        cfg = lm.config
        self.lm = lm
        self.dtype = compute_dtype(lm) if dtype is None else dtype
        if ops is None:  # the compiled CPU step (reduce) traces the reference ops
            ops = reference if reduce else step_ops(lm.emb.weight.device, cfg.head_size, cfg.n_embd, self.dtype)
            if lm.emb.weight.dtype not in getattr(ops, "WEIGHT_DTYPES", (lm.emb.weight.dtype,)):
                ops = reference  # the CPU kernels read the embedding as it is: fp32 or bf16 (fp16 weights do not)
        self.ops = ops
        # the activations of the split path and the prefill (the buffers the ops write and the products read):
        # in the compute dtype, but the CPU kernels take fp32 activations only (ACTIVATION_DTYPES), so with
        # bf16 products they stay fp32 there, each product's input rounded to bf16 on its way in (where a bf16
        # buffer would round it) and its output widened (_bmm, _linear); the fused path's whole step keeps
        # its activations in fp32 too and reads the bf16 weights as they are
        acts = getattr(ops, "ACTIVATION_DTYPES", None)
        self.act_dtype = self.dtype if acts is None or self.dtype in acts else acts[0]
        self.lora_rank = -(-max(cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora) // 16) * 16
        self.fused_max_batch = ops.fused_max_batch(cfg.n_embd) if hasattr(ops, "fused_max_batch") \
            else getattr(ops, "FUSED_MAX_BATCH", FUSED_MAX_BATCH)
        # the most rows the kernels' linear_ takes (the CPU's one-pass products); Triton's takes any number
        self.one_pass_rows = getattr(ops, "MAX_ROWS", None)
        # output columns per program of the kernels' products: blocks must not straddle r|k|v|low-rank parts
        # (ops/rwkv7 serves only widths that are multiples of 16; the reference ops do not use it)
        self.block_n = next((n for n in (64, 32, 16) if math.gcd(cfg.n_embd, self.lora_rank) % n == 0), 16)
        # on the CPU, oneDNN's prepacked inner product reads fp32 weights about 1.5-2x faster than F.linear
        # at batch 1 (BENCHMARKS.md, the CPU decoder); the packed weights are opaque, so they are made again
        # whenever a weight changes (there are no graphs on the CPU to keep addresses for), and only for the
        # products that run: with the CPU kernels, only batches above their fused path use them
        cpu_fp32 = lm.emb.weight.device.type == "cpu" and self.dtype == torch.float32
        self.reduce = reduce
        self.onednn = not reduce and (cpu_fp32 and _onednn_works() if onednn is None else onednn and cpu_fp32)
        self._buffers: dict[str, torch.Tensor] | None = None
        self._onednn: dict[str, list[torch.Tensor]] = {}
        self._layers: list[torch.Tensor] | None = None  # _step_layers, made again at each packing
        self._version: tuple = ()
        self.sync()

    compilable = True  # EngineStepper may run its step through torch.compile (reduce=True)

    def takes(self, batch_size: int) -> bool:
        """Every batch size: the fused path up to fused_max_batch rows, the split path above."""
        return True

    @property
    def uses_kernels(self) -> bool:
        return self.ops is not reference

    # ---- weights -----------------------------------------------------------------------------------

    def sync(self, version: tuple | None = None) -> None:
        """Pack the weights again if any changed since the last packing. Values changed in place are
        written into the same buffers, so a graph captured over them stays valid; weights that moved
        (a .to(), a load that replaced tensors) get new buffers, and graphs.py captures again.
        version: weights_fingerprint(lm), if the caller has just taken it."""
        version = weights_fingerprint(self.lm) if version is None else version
        if version == self._version:
            return
        moved = not self._version or version[0] != self._version[0]
        self._layers = None
        with torch.no_grad():
            packed = self._pack()
            if self._buffers is None or moved or self.onednn:
                self._buffers = packed
                self._onednn = {}  # packed again on first use (_onednn_weights)
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
        C = lm.config.n_embd
        for i, block in enumerate(lm.blocks):
            att, ffn = block.att, block.ffn
            lora = [(getattr(att, f"{n}1"), getattr(att, f"{n}2")) for n in reference.LORA_ROWS]
            out |= {
                f"{i}.mix_att": torch.stack([f32(getattr(att, n)) for n in reference.ATT_MIX_ROWS]),
                f"{i}.mix_ffn": f32(ffn.x_k).unsqueeze(0),
                f"{i}.vec": torch.stack([f32(att.ln_x.weight if n == "ln_x_weight" else att.ln_x.bias
                                             if n == "ln_x_bias" else getattr(att, n))
                                         for n in reference.VEC_ROWS]),
                f"{i}.w_out": self._mat(att.output.weight),
                f"{i}.w_key": self._mat(ffn.key.weight),
                f"{i}.w_value": self._mat(ffn.value.weight),
            }
            rkv = [m.weight.detach() for m in (att.receptance, att.key, att.value)]
            low = [_padded(lo.detach().t(), R) for lo, _ in lora]  # (R, C) each
            high = [_padded(hi.detach(), R) for _, hi in lora]  # (R, C) each
            if self.uses_kernels:
                # one (3C + 4R, C) matrix for r, k, v and the first low-rank products, which one kernel
                # computes from LayerNorm and the mixes; the second low-rank products as one grouped
                # product over that kernel's last 4R output columns
                out[f"{i}.w_in"] = torch.cat(rkv + low).to(self.dtype)
                out[f"{i}.lora2_in"] = torch.cat([hi.t() for hi in high]).to(self.dtype)  # (4C, R), 4 groups
                # the split path (larger batches) reads the same weights as stacked (G,K,N) views
                w_in = out[f"{i}.w_in"]
                out[f"{i}.w_rkv"] = w_in[:3 * C].view(3, C, C).transpose(1, 2)
                out[f"{i}.lora1"] = w_in[3 * C:].view(4, R, C).transpose(1, 2)
                out[f"{i}.lora2"] = torch.stack(high).to(self.dtype)  # (4, R, C): cuBLAS's fast layout here
            else:
                # (G,K,N); the reduce products read them transposed, so keep (G,N,K) memory for them
                contiguous = (lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)) if self.reduce \
                    else (lambda t: t.contiguous())
                out[f"{i}.w_rkv"] = contiguous(torch.stack([w.t() for w in rkv]).to(self.dtype))
                out[f"{i}.lora1"] = contiguous(torch.stack([lo.t() for lo in low]).to(self.dtype))
                out[f"{i}.lora2"] = contiguous(torch.stack(high).to(self.dtype))
        if self.uses_kernels:
            bn = self.block_n
            blocks = lambda n: -(-n // bn)  # noqa: E731
            segs = [(0, 0)] * blocks(C) + [(1, 0)] * blocks(C) + [(2, 0)] * blocks(C)  # r, k, v: x_r, x_k, x_v
            mixes = {"v": 2, "w": 3, "a": 4, "g": 5}
            acts = {"w": reference.ACT_TANH, "g": reference.ACT_SIGMOID}
            for name in reference.LORA_ROWS:
                segs += [(mixes[name], acts.get(name, reference.ACT_NONE))] * blocks(R)
            device = lm.emb.weight.device
            table = lambda s: torch.tensor([m + 256 * a for m, a in s], dtype=torch.int32, device=device)  # noqa: E731
            out["seg_in"] = table(segs)
            out["seg_key"] = table([(0, reference.ACT_RELU2)] * blocks(lm.config.dim_ffn))
            out["seg_head"] = table([(0, reference.ACT_NONE)] * blocks(lm.config.vocab_size))
        return out

    # ---- the step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: RWKVState) -> torch.Tensor:
        """tokens (B,) -> logits (B,V); `state` (fp32, contiguous) is updated in place. No input checks
        beyond the state's layout: lm.step's checks read values back to the host, which graphs cannot."""
        self._check_state(state)
        tokens = tokens.contiguous()  # the kernels index rows by position
        fused = self.uses_kernels and tokens.shape[0] <= self.fused_max_batch
        with torch.autocast(tokens.device.type, enabled=False):
            return self._step_fused(tokens, state) if fused else self._step_split(tokens, state)

    @staticmethod
    def _check_state(state: RWKVState) -> None:
        for name in ("att_shift", "wkv", "ffn_shift"):
            t = getattr(state, name)
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise VisionRWKVError(f"the fused operations need a contiguous fp32 state; {name} is "
                                      f"{t.dtype}{'' if t.is_contiguous() else ', not contiguous'}")

    def _step_fused(self, tokens: torch.Tensor, state: RWKVState) -> torch.Tensor:
        """Six launches a layer: [LayerNorm + mixes + r, k, v and the first low-rank products], the second
        low-rank products, [the WKV step and everything around it], the output projection, [LayerNorm +
        mix + the channel mix's key + relu^2], its value. The residual stream ping-pongs between two fp32
        buffers, and each shift is written back by a later kernel, once every reader of the old one is done.
        Ops that have step_fused_ (the CPU kernels) run all of it, every layer, in that one call."""
        lm, ops, p, dt, bn = self.lm, self.ops, self._buffers, self.dtype, self.block_n
        cfg = lm.config
        B, C, R, L = tokens.shape[0], cfg.n_embd, self.lora_rank, cfg.n_layer
        dev = tokens.device
        f32 = dict(device=dev, dtype=torch.float32)
        ln0 = lm.blocks[0].ln0
        if hasattr(ops, "step_fused_"):  # every layer in one call (fp32 activations; fp32 or bf16 weights)
            xf = torch.empty(B, C, **f32)
            ln0_w, ln0_b, *layers, out_w, out_b = self._step_layers()
            ops.step_fused_(tokens.long(), p["emb"], ln0_w, ln0_b, layers, p["seg_in"], p["seg_key"], state,
                            out_w, out_b, xf, bn, R)
            return self._head(xf)
        xa, xb, xl_att, xl_ffn, v_first = (torch.empty(B, C, **f32) for _ in range(5))
        out_in = torch.empty(B, 3 * C + 4 * R, device=dev, dtype=dt)
        lora_out = torch.empty(B, 4 * C, device=dev, dtype=dt)
        k = torch.empty(B, cfg.dim_ffn, device=dev, dtype=dt)
        y, dx = (torch.empty(B, C, device=dev, dtype=dt) for _ in range(2))
        rkv = out_in[:, :3 * C].view(B, 3, C).transpose(0, 1)  # (3,B,C) views
        lora = lora_out.view(B, 4, C).transpose(0, 1)  # (4,B,C)
        ops.embed_ln_(tokens, p["emb"], ln0.weight, ln0.bias, xa)
        for i, block in enumerate(lm.blocks):
            prev = dict(prev_xl=xl_ffn, prev_shift=state.ffn_shift[i - 1]) if i else {}
            ops.ln_mix_matmul_(xa, dx if i else None, xb, xl_att, block.ln1.weight, block.ln1.bias,
                               state.att_shift[i], p[f"{i}.mix_att"], p[f"{i}.w_in"], p["seg_in"], out_in, bn,
                               **prev)
            ops.linear_(out_in[:, 3 * C:], p[f"{i}.lora2_in"], lora_out, groups=4)
            ops.wkv_step_(state.wkv[i], rkv, lora, p[f"{i}.vec"], v_first, i == 0, y)
            ops.linear_(y, p[f"{i}.w_out"], dx)
            ops.ln_mix_matmul_(xb, dx, xa, xl_ffn, block.ln2.weight, block.ln2.bias, state.ffn_shift[i],
                               p[f"{i}.mix_ffn"], p[f"{i}.w_key"], p["seg_key"], k, bn,
                               prev_xl=xl_att, prev_shift=state.att_shift[i])
            ops.linear_(k, p[f"{i}.w_value"], dx)
        # the head is bandwidth-bound: on CUDA cuBLAS's product reads it faster than the one-pass kernel
        # (26 against 34 us at L12-D768, V 65,536; BENCHMARKS.md); on the CPU the one-pass kernel is faster
        state.ffn_shift[L - 1].copy_(xl_ffn)
        xf = torch.empty(1, B, C, device=dev, dtype=dt)
        ops.ln_mix_(xa, dx, lm.ln_out.weight, lm.ln_out.bias, None, None, xf)
        return self._head(xf[0])

    def _step_layers(self) -> list[torch.Tensor]:
        """The tensors step_fused_ reads: ln0's weight and bias; twelve a layer in the order of _step_fused's
        operations (ln1's weight and bias, mix_att, w_in, lora2_in, vec, w_out, ln2's weight and bias, mix_ffn,
        w_key, w_value); ln_out's weight and bias. Made once a packing (the LayerNorms are lm's own fp32
        parameters, so values changed in place are seen)."""
        if self._layers is None:
            p, lm = self._buffers, self.lm
            f32 = lambda t: t.detach().float()  # noqa: E731
            ln0 = lm.blocks[0].ln0
            self._layers = [f32(ln0.weight), f32(ln0.bias)] + [t for i, block in enumerate(lm.blocks) for t in (
                f32(block.ln1.weight), f32(block.ln1.bias), p[f"{i}.mix_att"], p[f"{i}.w_in"], p[f"{i}.lora2_in"],
                p[f"{i}.vec"], p[f"{i}.w_out"], f32(block.ln2.weight), f32(block.ln2.bias), p[f"{i}.mix_ffn"],
                p[f"{i}.w_key"], p[f"{i}.w_value"])] + [f32(lm.ln_out.weight), f32(lm.ln_out.bias)]
        return self._layers

    def _step_split(self, tokens: torch.Tensor, state: RWKVState) -> torch.Tensor:
        """The same step as eleven operations a layer: the step ops (kernels, or the reference functions)
        and the matrix products apart, batched where they share a shape."""
        lm, ops, p, dt = self.lm, self.ops, self._buffers, self.act_dtype
        B, C = tokens.shape[0], lm.config.n_embd
        dev = tokens.device
        x = torch.empty(B, C, device=dev)  # the residual stream, fp32
        v_first = torch.empty(B, C, device=dev)
        xs = torch.empty(6, B, C, device=dev, dtype=dt)
        xf = torch.empty(1, B, C, device=dev, dtype=dt)
        y = torch.empty(B, C, device=dev, dtype=dt)
        ln0 = lm.blocks[0].ln0
        ops.embed_ln_(tokens, p["emb"], ln0.weight, ln0.bias, x)
        dx = None
        for i, block in enumerate(lm.blocks):
            ops.ln_mix_(x, dx, block.ln1.weight, block.ln1.bias, state.att_shift[i], p[f"{i}.mix_att"], xs)
            rkv = self._bmm(xs[:3], f"{i}.w_rkv")  # (3,B,C): r, k, v
            h = self._bmm(xs[2:], f"{i}.lora1")  # (4,B,R): v, w, a, g
            ops.lora_act_(h)
            lora = self._bmm(h, f"{i}.lora2")  # (4,B,C)
            ops.wkv_step_(state.wkv[i], rkv, lora, p[f"{i}.vec"], v_first, i == 0, y)
            dx = self._linear(y, f"{i}.w_out", one_pass=True)
            ops.ln_mix_(x, dx, block.ln2.weight, block.ln2.bias, state.ffn_shift[i], p[f"{i}.mix_ffn"], xf)
            k = self._linear(xf[0], f"{i}.w_key")  # (B,F)
            ops.relu2_(k)
            dx = self._linear(k, f"{i}.w_value", one_pass=True)
        ops.ln_mix_(x, dx, lm.ln_out.weight, lm.ln_out.bias, None, None, xf)
        return self._linear(xf[0], "head")

    # ---- GPT mode (a prefill) -----------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, state: RWKVState) -> torch.Tensor:
        """inputs_embeds x (B,T,C) from `state` (fp32, contiguous, updated in place) -> the last position's
        logits (B,V): lm(inputs_embeds=x, state=state, last_only=True) through the fused operations."""
        self._check_state(state)
        with torch.autocast(x.device.type, enabled=False):
            return self._prefill(x, state)

    def prefill_from(self, x: torch.Tensor, state: RWKVState | None) -> tuple[torch.Tensor, RWKVState]:
        """prefill(x, ...) from a copy of `state` (already lm.state_for's; None: the initial state) in a new
        fp32, contiguous state: (the last position's logits, that state). The caller's state is not changed."""
        own = self.lm.init_state(x.shape[0])
        if state is not None:
            own.copy_(state)
        return self.prefill(x, own), own

    def _prefill(self, x_in: torch.Tensor, state: RWKVState) -> torch.Tensor:
        from ..ops.wkv7 import wkv7

        lm, ops, p, dt = self.lm, self.ops, self._buffers, self.act_dtype
        cfg = lm.config
        B, T, C = x_in.shape
        H, N, M = cfg.n_head, cfg.head_size, B * T
        dev = x_in.device
        ln0 = lm.blocks[0].ln0
        # the residual stream ping-pongs between two fp32 buffers: ln_mix_seq_ reads one and writes the other
        xa = F.layer_norm(x_in.float(), (C,), ln0.weight.float(), ln0.bias.float(), reference.LN_EPS)
        xb = torch.empty_like(xa)
        xs = torch.empty(6, B, T, C, device=dev, dtype=dt)
        xf = torch.empty(1, B, T, C, device=dev, dtype=dt)
        pre = torch.empty(5, M, C, device=dev, dtype=dt)  # w, k, v, -kk, kk*a: the WKV kernel's inputs
        y = torch.empty(M, C, device=dev, dtype=dt)
        v_first = torch.empty(M, C, device=dev)
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        dx = None
        for i, block in enumerate(lm.blocks):
            ops.ln_mix_seq_(xa, dx, xb, block.ln1.weight, block.ln1.bias, state.att_shift[i], p[f"{i}.mix_att"], xs)
            if dx is not None:
                xa, xb = xb, xa
            mixed = xs.view(6, M, C)
            rkv = self._bmm(mixed[:3], f"{i}.w_rkv")  # (3,M,C): r, k, v
            h = self._bmm(mixed[2:], f"{i}.lora1")  # (4,M,R): v, w, a, g
            ops.lora_act_(h)
            lora = self._bmm(h, f"{i}.lora2")  # (4,M,C)
            ops.wkv_pre_(rkv, lora, p[f"{i}.vec"], v_first, i == 0, pre, H)
            out, new = wkv7(heads(rkv[0]), *map(heads, pre), state=state.wkv[i], impl=cfg.wkv_impl)
            state.wkv[i].copy_(new)
            ops.wkv_post_(out.reshape(M, C), rkv[0], pre[1], pre[2], lora[3], p[f"{i}.vec"], y, H)
            dx = self._linear(y, f"{i}.w_out").view(B, T, C)
            ops.ln_mix_seq_(xa, dx, xb, block.ln2.weight, block.ln2.bias, state.ffn_shift[i], p[f"{i}.mix_ffn"], xf)
            xa, xb = xb, xa
            k = self._linear(xf[0].view(M, C), f"{i}.w_key")
            ops.relu2_(k)
            dx = self._linear(k, f"{i}.w_value").view(B, T, C)
        last = xa[:, -1] + dx[:, -1].float()
        xl = F.layer_norm(last, (C,), lm.ln_out.weight.float(), lm.ln_out.bias.float(), reference.LN_EPS)
        return self._head(xl.to(dt))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of x (B,C): through the ops' one-pass linear_ where they say it is faster (the CPU
        kernels, up to their MAX_ROWS rows of fp32 inputs), else as the other products."""
        if getattr(self.ops, "ONE_PASS_HEAD", False) and x.shape[0] <= self.one_pass_rows and \
                x.dtype == torch.float32:
            logits = x.new_empty(x.shape[0], self._buffers["head"].shape[0])
            self.ops.linear_(x, self._buffers["head"], logits)
            return logits
        return self._linear(x, "head")

    def _bmm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (G,B,K) times the stacked weights `name` (G,K,N) -> (G,B,N)."""
        if self.reduce and x.shape[1] == 1:
            return (self._buffers[name].transpose(1, 2).unsqueeze(1) * x.unsqueeze(2)).sum(-1)
        if self.onednn:
            return torch.stack([_onednn_linear(xg, w) for xg, w in zip(x, self._onednn_weights(name))])
        w = self._buffers[name]
        return torch.bmm(x.to(w.dtype), w).to(self.act_dtype)  # .to: nothing, but fp32 activations' bf16 products

    def _linear(self, x: torch.Tensor, name: str, one_pass: bool = False) -> torch.Tensor:
        """x (B,K) times the weight `name` (N,K); one_pass: through the kernels' linear_, whose one-pass form
        (up to GEMV_MAX_ROWS rows) beat cuBLAS on the output and value products (BENCHMARKS.md)."""
        if one_pass and self.ops is not reference and (self.one_pass_rows is None or
                                                           x.shape[0] <= self.one_pass_rows):
            out = x.new_empty(x.shape[0], self._buffers[name].shape[0])
            self.ops.linear_(x, self._buffers[name], out)
            return out
        if self.reduce and x.shape[0] == 1:
            return (self._buffers[name] * x.unsqueeze(1)).sum(-1)
        if self.onednn:
            return _onednn_linear(x, self._onednn_weights(name)[0])
        w = self._buffers[name]
        return F.linear(x.to(w.dtype), w).to(self.act_dtype)

    def _onednn_weights(self, name: str) -> list[torch.Tensor]:
        """oneDNN's packed copies of the weights `name`, made on first use after each packing: the stacked
        (G,K,N) ones a group at a time, the (N,K) ones whole."""
        packed = self._onednn.get(name)
        if packed is None:
            t = self._buffers[name]
            stacked = name.rsplit(".", 1)[-1] in _STACKED
            packed = self._onednn[name] = [_onednn_weight(w.t()) for w in t] if stacked else [_onednn_weight(t)]
        return packed


_STACKED = ("w_rkv", "lora1", "lora2")  # (G,K,N), read by _bmm; the others are (N,K), nn.Linear's layout


def _onednn_weight(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@functools.lru_cache(maxsize=1)
def _onednn_works() -> bool:
    """oneDNN's packed linear is a private PyTorch operator: used only if it is there and gives F.linear's
    result on a small product."""
    try:
        w, x = torch.randn(24, 16), torch.randn(2, 16)
        return bool(torch.allclose(_onednn_linear(x, _onednn_weight(w)), F.linear(x, w), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def _padded(w: torch.Tensor, rank: int) -> torch.Tensor:
    """A low-rank factor (r, C) zero-padded to (rank, C)."""
    z = w.new_zeros(rank, w.shape[1])
    z[: w.shape[0]].copy_(w)
    return z


COMPILED_STEP_BOUND = 1e-4  # relative; the fp32 compiled step sits within about 1e-6 of the eager one


def compile_step_enabled() -> bool:
    return os.environ.get("VISION_RWKV_COMPILE_STEP", "0") == "1"


class EngineStepper:
    """RNN mode through a StepEngine where there are no graphs (the CPU): a callable
    (tokens (B,), state) -> (logits (B,V), state) with lm.step's checks. As with graphs.GraphedStep, the
    state it returns is its own buffer, updated in place by the next call for the same batch size: select
    rows from it (which copies) before keeping it across calls. engine_class: StepEngine (RWKV-7), or
    engine4.Step4Engine (RWKV-4), whose batches above what it takes run lm.step.

    With VISION_RWKV_COMPILE_STEP=1 the step is compiled by torch.compile (inductor's C++ on the CPU), with
    one-row products as streaming reductions: about twice the speed at batch 1 (BENCHMARKS.md), after a
    compile of about half a minute for each batch size on first use, which is why it is not the default.
    torch's inductor cache (TORCHINDUCTOR_CACHE_DIR) keeps the compiled code for later processes: 5.3 s
    against 42.0 s for the first call at L12-D768 on this project's 2-core machine."""

    bucketed = False  # decode_loop drops finished rows at once (graphs keep power-of-two batches)

    def __init__(self, lm, engine_class=None):
        self.lm = lm
        self.engine_class = StepEngine if engine_class is None else engine_class
        self.engines: dict[tuple, tuple] = {}  # (compute dtype, compiled) -> (the engine, its step function)
        self.states: dict[int, DecoderState] = {}
        self.verified: set[tuple] = set()  # (compute dtype, batch size) where the compiled step was checked
        self.fallback_reason: str | None = None  # why a compiled step was found wrong and replaced, if it was

    def __call__(self, tokens: torch.Tensor, state: RWKVState | None):
        lm = self.lm
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            return lm.step(tokens, state)  # lm.step's own one-line error
        lm._check_ids(tokens)
        B = tokens.shape[0]
        state = lm.state_for(state, B)
        dtype = compute_dtype(lm)
        compiled = compile_step_enabled() and self.engine_class.compilable
        engine, step = self._engine(dtype, compiled)
        if not engine.takes(B):
            return lm.step(tokens, state)
        own = self.states.get(B)
        if state is not own:
            own = self.states[B] = state.contiguous_float()
        tokens = tokens.contiguous()
        if compiled and step != engine.step and (dtype, B) not in self.verified:  # compiled, not yet checked
            return self._verified_step(engine, step, dtype, tokens, own), own
        return step(tokens, own), own

    def _engine(self, dtype: torch.dtype, compiled: bool) -> tuple[StepEngine, object]:
        """The engine for this compute dtype (compiled: the one whose step torch.compile runs) and its step
        function, with the weights packed as they are now."""
        if (dtype, compiled) not in self.engines:
            engine = self.engine_class(self.lm, dtype, reduce=True) if compiled else self.engine_class(self.lm, dtype)
            self.engines[(dtype, compiled)] = engine, torch.compile(engine.step, dynamic=False) if compiled \
                else engine.step
        engine, step = self.engines[(dtype, compiled)]
        engine.sync()
        return engine, step

    def prefill(self, x: torch.Tensor, state: RWKVState | None = None):
        """GPT mode through the same engine: (inputs_embeds (B,T,C), initial state or None) -> (the last
        position's logits (B,V), the new state), as lm(inputs_embeds=x, state=state, last_only=True). The
        products go through oneDNN's packed weights, the WKV through the CPU kernel; the caller's state is
        not changed."""
        lm = self.lm
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.device != lm.emb.weight.device:
            return lm(inputs_embeds=x, state=state, last_only=True)  # lm's own checks and one-line errors
        lm.checked_inputs(None, x)
        engine, _ = self._engine(compute_dtype(lm), False)
        return engine.prefill_from(x, None if state is None else lm.state_for(state, x.shape[0]))

    def _verified_step(self, engine: StepEngine, step, dtype, tokens, own: RWKVState) -> torch.Tensor:
        """The compiled step's first call at a batch size, checked against the same step run eagerly from a
        copy of the state. Some torch versions compile it wrong (torch 2.11's inductor on an H200 host gave
        logits 23% off); then the eager step serves from here on, said once."""
        probe = own.clone()
        want = engine.step(tokens, probe)
        got = step(tokens, own)
        errors = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                  for a, b in ((got, want), (own.wkv, probe.wkv), (own.att_shift, probe.att_shift))]
        if max(errors) <= COMPILED_STEP_BOUND:
            self.verified.add((dtype, tokens.shape[0]))
            return got
        self.fallback_reason = (f"torch.compile of the CPU step gave results {max(errors):.2g} off the eager "
                                f"step's on torch {torch.__version__}")
        warnings.warn(f"vision_rwkv: {self.fallback_reason}; decoding runs the step eagerly instead", stacklevel=3)
        self.engines[(dtype, True)] = engine, engine.step
        own.copy_(probe)
        return want
