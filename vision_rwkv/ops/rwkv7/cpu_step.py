"""The fused RWKV-7 inference operations on the CPU: kernels/rwkv7_cpu.cpp, built on first use for this
machine.

The same functions and in-place contracts as reference.py and triton_step.py, for the engine (lm/engine.py):
the fused step's ln_mix_matmul_, linear_ and wkv_step_, and the prefill's ln_mix_seq_, wkv_pre_, wkv_post_,
relu2_ and lora_act_ (also the split step's) are compiled; embed_ln_ and ln_mix_, which run once a step,
are the references themselves. step_fused_, which only this family has, runs the fused step's operations for
every layer in one call (the engine takes it when it is there).

The compiled products read each weight row once for all input rows together (up to MAX_ROWS), which is
what a step at a few rows needs: it is bound by the speed at which its weights stream from memory, and
BLAS's products at one row read fp32 weights at a fraction of that (BENCHMARKS.md). The products' weights
(and step_fused_'s embedding) may be fp32 or bf16, widened to fp32 as they are read: bf16 halves the bytes
a step streams. Everything else is fp32 (ACTIVATION_DTYPES): the engine takes these ops when its products
are fp32 or bf16 and the build works (`unavailable_reason`), the references otherwise; with bf16 products
its split path and prefill keep these fp32 activations and round each product's input to bf16 (torch's bf16
products run between the ops).
"""

from __future__ import annotations

import torch

from .. import _build
from ..wkv7.reference import LOG_DECAY_SCALE

# the rest of the family's API, which runs once a step: the references themselves
from .reference import embed_ln_, ln_mix_  # noqa: F401

ACTIVATION_DTYPES = (torch.float32,)  # of every tensor the ops take but the products' weights
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
MAX_ROWS = 16  # input rows the compiled products take at once (MAX_ROWS in rwkv7_cpu.cpp)
ONE_PASS_HEAD = True  # the engine's fused path multiplies by the head through linear_ too
# Batches up to this size take the fused path (lm/engine.py), larger ones the split path with oneDNN's products:
# at L12-D768 on 2 threads the fused path is 1.3-1.4x as fast up to 4 rows, the two are within noise of each
# other from 6 to 8, and the split path is 1.2x as fast at 16; at L6-D512 the two cross between 8 and 12
# rows (`bench/decoder_cpu.py --batches`, BENCHMARKS.md)
FUSED_MAX_BATCH = 8
# Narrow models (n_embd up to SMALL_WIDTH, the demo's 256) take the fused path up to MAX_ROWS: there oneDNN's
# products cost more in calls than in arithmetic, and the fused step was 1.65x and 1.25x the split one's
# speed at 12 and 16 rows (L4-D256, 2026-12-05, BENCHMARKS.md)
SMALL_WIDTH = 256


def fused_max_batch(n_embd: int) -> int:
    """The most rows the engine's fused path takes for a model of this width; more go the split path."""
    return MAX_ROWS if n_embd <= SMALL_WIDTH else FUSED_MAX_BATCH


def build() -> str | None:
    """Compile and load the ops (once a process; the compiled library is cached once a machine). Returns
    None on success, or why it failed (one line)."""
    return _build.cpu_kernels()


def unavailable_reason(dtype: torch.dtype) -> str | None:
    """Why the compiled ops cannot run a CPU step whose products are in `dtype`, or None when they can."""
    if dtype not in WEIGHT_DTYPES:
        return f"the CPU kernels read fp32 or bf16 weights, and this step's products are {dtype}"
    return build()


def ln_mix_matmul_(x, dx, x_out, xl_out, weight, bias, shift, mix, w, segments, out, block_n: int,
                   prev_xl=None, prev_shift=None) -> None:
    torch.ops.vision_rwkv_cpu.ln_mix_matmul_(x, dx, x_out, xl_out, weight.float(), bias.float(), shift,
                                             mix, w, segments, out, block_n, prev_xl, prev_shift)


def linear_(x, w, out, groups: int = 1) -> None:
    torch.ops.vision_rwkv_cpu.linear_(x, w, out, groups)


def wkv_step_(state, rkv, lora, vec, v_first, layer0: bool, out) -> None:
    torch.ops.vision_rwkv_cpu.wkv_step_(state, rkv, lora, vec, v_first, layer0, out, LOG_DECAY_SCALE)


def step_fused_(tokens, emb, ln0_w, ln0_b, layers: list, seg_in, seg_key, state, ln_out_w, ln_out_b, xf,
                block_n: int, lora_rank: int) -> None:
    """The engine's whole fused step in one call (StepEngine._step_fused's operations, in its order): xf (B,C)
    <- the final LayerNorm of the residual stream; state (fp32, contiguous) updated in place. layers: twelve
    tensors a layer, in StepEngine._step_layers' order."""
    torch.ops.vision_rwkv_cpu.step_fused_(tokens, emb, ln0_w, ln0_b, layers, seg_in, seg_key, state.att_shift,
                                          state.wkv, state.ffn_shift, ln_out_w, ln_out_b, xf, block_n, lora_rank,
                                          LOG_DECAY_SCALE)


# ---- GPT mode (a prefill), around torch's products ----------------------------------------------------

def ln_mix_seq_(x, dx, x_out, weight, bias, shift, mix, out) -> None:
    torch.ops.vision_rwkv_cpu.ln_mix_seq_(x, dx, x_out, weight.float(), bias.float(), shift, mix, out)


def wkv_pre_(rkv, lora, vec, v_first, layer0: bool, out, n_head: int) -> None:
    torch.ops.vision_rwkv_cpu.wkv_pre_(rkv, lora, vec, v_first, layer0, out, n_head)


def wkv_post_(y, r, k, v, g, vec, out, n_head: int) -> None:
    torch.ops.vision_rwkv_cpu.wkv_post_(y, r, k, v, g, vec, out, n_head)


def relu2_(h) -> None:
    torch.ops.vision_rwkv_cpu.relu2_(h)


def lora_act_(h) -> None:
    torch.ops.vision_rwkv_cpu.lora_act_(h)
