"""The fused RNN-step operations (vision_rwkv.ops.rwkv7) and the engine that runs them (lm/engine.py).

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set only while this
module imports them, so that the rest of the suite keeps the CPU's own path), so CI checks them op by op;
on a GPU the same tests run the compiled kernels.

Bounds. Everything here computes in fp32, so the truth is the model's own step in fp64, and the bound on
a fused result is measured rather than guessed: its error against the fp64 truth may be at most
FP32_SLACK times the error of the fp32 reference (lm.step) against the same truth, the noise floor of
fp32 in another order of reduction. With bf16 matrix inputs the step rounds each product input to 8
bits of mantissa (relative 2^-9 = 2e-3 per input), through a dozen layers: bound 3e-2 relative to the
largest logit, against the same step computed with fp32 matrices. That bound is stated for a few rows; the
largest error over more rows and logits grows with their number (the reference ops themselves reached
0.029 at 20 rows of the tiny model), so a step over many rows may also reach BF16_SLACK times the error
of the reference ops with the same bf16 products on the same rows, whichever is larger.
"""

import functools

import pytest
import torch
from conftest import interpreter, randomize_, tiny_config

from vision_rwkv import RWKV7
from vision_rwkv.errors import VisionRWKVError
from vision_rwkv.lm.engine import StepEngine, weights_fingerprint
from vision_rwkv.lm.state import RWKVState
from vision_rwkv.ops import rwkv7 as step_ops_pkg
from vision_rwkv.ops.rwkv7 import reference, step_ops, unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_SLACK = 4.0
BF16_BOUND = 3e-2
BF16_SLACK = 2.0


with interpreter():
    KERNELS_UNAVAILABLE = unavailable_reason(torch.device(DEVICE), 16, 64)
kernels_run = pytest.mark.skipif(KERNELS_UNAVAILABLE is not None, reason=f"{KERNELS_UNAVAILABLE}")


class _Interpreted:
    """The kernels' module, each function called with the interpreter on (Triton checks it at launch too)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def call(*args, **kw):
            with interpreter():
                return fn(*args, **kw)

        return call


@functools.lru_cache(maxsize=1)
def triton_ops():
    with interpreter():
        from vision_rwkv.ops.rwkv7 import triton_step
    return _Interpreted(triton_step)


def rel(a, b) -> float:
    """max |a - b| / max |b| (0 when both are all zeros)."""
    err = float((a.double() - b.double()).abs().max())
    return err / float(b.double().abs().max()) if err else 0.0


def lm_on(device, seed=0, **cfg):
    torch.manual_seed(seed)
    return randomize_(RWKV7(tiny_config(**cfg)).eval()).to(device)


def fp64_state(state: RWKVState) -> RWKVState:
    return RWKVState(state.att_shift.double(), state.wkv.double(), state.ffn_shift.double())


def run_steps(lm, ops, tokens, dtype=None, fused_max_batch=16):
    """Logits of every step and the final state, through the engine with `ops` (with kernels: the fused
    path for up to `fused_max_batch` rows, the split path above)."""
    engine = StepEngine(lm, dtype, ops=ops)
    engine.fused_max_batch = fused_max_batch
    state = lm.init_state(tokens.shape[0])
    logits = [engine.step(tokens[:, t], state) for t in range(tokens.shape[1])]
    return torch.stack(logits, 1), state


def run_lm(lm, tokens, state=None):
    logits = []
    for t in range(tokens.shape[1]):
        out, state = lm.step(tokens[:, t], state)
        logits.append(out)
    return torch.stack(logits, 1), state


# ---- the ops, one by one ----------------------------------------------------------------------------

def op_inputs(B=3, C=64, N=16, R=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(DEVICE)  # noqa: E731
    H = C // N
    return dict(
        x=rnd(B, C, scale=3.0), dx=rnd(B, C).to(dtype), w=1 + rnd(C, scale=0.2), b=rnd(C, scale=0.2),
        shift=rnd(B, C), mix=torch.rand(6, C, generator=g).to(DEVICE), tokens=torch.tensor([5, 0, 96][:B]).to(DEVICE),
        emb=rnd(97, C).to(dtype), h=rnd(4, B, R, scale=2.0).to(dtype), f=rnd(B, 4 * C, scale=2.0).to(dtype),
        state=rnd(B, H, N, N), rkv=rnd(3, B, C).to(dtype), lora=rnd(4, B, C).to(dtype),
        vec=torch.cat([rnd(5, C), rnd(1, C, scale=0.3), 1 + rnd(1, C, scale=0.2), rnd(1, C, scale=0.2)]),
        v_first=rnd(B, C),
    )


def clone(d):
    return {k: v.clone() for k, v in d.items()}


@kernels_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ln_mix_kernel_equals_reference(dtype):
    tri, ref = triton_ops(), reference
    for has_dx, groups, with_shift in ((True, 6, True), (False, 1, True), (True, 1, False)):
        outs = []
        for ops in (tri, ref):
            d = clone(op_inputs(dtype=dtype))
            out = torch.empty(groups, *d["x"].shape, dtype=dtype, device=DEVICE)
            ops.ln_mix_(d["x"], d["dx"] if has_dx else None, d["w"], d["b"], d["shift"] if with_shift else None,
                        d["mix"][:groups], out)
            outs.append((d["x"], d["shift"], out))
        for got, want in zip(*outs):
            assert rel(got, want) <= (1e-6 if got.dtype == torch.float32 else 8e-3), (has_dx, groups)


@kernels_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_lora_and_relu2_kernels_equal_reference(dtype):
    tri, ref = triton_ops(), reference
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    got, want = clone(op_inputs(dtype=dtype)), clone(op_inputs(dtype=dtype))
    tri.embed_ln_(got["tokens"], got["emb"], got["w"], got["b"], got["x"])
    ref.embed_ln_(want["tokens"], want["emb"], want["w"], want["b"], want["x"])
    assert rel(got["x"], want["x"]) <= 1e-6
    tri.lora_act_(got["h"])
    ref.lora_act_(want["h"])
    assert rel(got["h"], want["h"]) <= tol
    tri.relu2_(got["f"])
    ref.relu2_(want["f"])
    assert rel(got["f"], want["f"]) <= tol
    assert (got["f"] >= 0).all() and (got["f"] == 0).any()  # negatives became zeros


@kernels_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 20])  # the one-pass kernel (up to GEMV_MAX_ROWS rows), the tiled one
def test_ln_mix_matmul_kernel_equals_reference(dtype, B):
    """Every activation, a partial last block of columns (N = 88 with blocks of 16), with and without the
    residual input, the shift and the deferred shift copy. In bf16 the reference rounds the product before
    its activation and the kernel after, so relu^2 (which doubles a relative error) differs by up to
    three bf16 roundings (3 x 2^-8 = 1.2e-2): bound 2e-2."""
    from vision_rwkv.ops.rwkv7.reference import ACT_NONE, ACT_RELU2, ACT_SIGMOID, ACT_TANH

    g = torch.Generator().manual_seed(7)
    C, N, bn = 64, 88, 16
    base = {k: v for k, v in op_inputs(B=3, C=C).items() if k in ("w", "b", "mix")}
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x, dx, shift, prev_xl = 3 * rnd(B, C), rnd(B, C).to(dtype), rnd(B, C), rnd(B, C)
    w = (rnd(N, C) / 8).to(dtype)
    acts = [ACT_NONE, ACT_TANH, ACT_SIGMOID, ACT_RELU2, ACT_NONE, ACT_TANH]
    segments = torch.tensor([m + 256 * a for m, a in zip([0, 1, 2, 3, 4, 5], acts)], dtype=torch.int32,
                            device=DEVICE)
    for has_dx, has_shift, has_prev in ((True, True, True), (False, True, False), (True, False, True)):
        results = []
        for ops in (triton_ops(), reference):
            x_out, xl_out, prev_shift = (torch.zeros(B, C, device=DEVICE) for _ in range(3))
            out = torch.zeros(B, N, device=DEVICE, dtype=dtype)
            ops.ln_mix_matmul_(x, dx if has_dx else None, x_out, xl_out, base["w"], base["b"],
                               shift if has_shift else None, base["mix"], w, segments, out, bn,
                               **(dict(prev_xl=prev_xl, prev_shift=prev_shift) if has_prev else {}))
            results.append((out, x_out, xl_out, prev_shift))
        for got, want in zip(*results):
            assert rel(got, want) <= (1e-5 if got.dtype == torch.float32 else 2e-2), (has_dx, has_shift)
        assert (results[0][0][:, 48:64] >= 0).all()  # the relu^2 block


@kernels_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_kernel_equals_reference(dtype):
    """One group and four; rows that are views into wider rows (as the step's low-rank inputs are); one,
    three and (past GEMV_MAX_ROWS, cuBLAS a group at a time) six rows; an output width that is not a
    multiple of the kernel's block (N = 88)."""
    g = torch.Generator().manual_seed(8)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    for B in (1, 3, 6):
        for groups, K, N in ((1, 64, 88), (4, 32, 64 * 4), (1, 256, 64)):
            wide = rnd(B, 16 + groups * K).to(dtype)
            x = wide[:, 16:]  # strided rows
            w = (rnd(N, K) / 8).to(dtype)
            got, want = (torch.full((B, N), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2))
            triton_ops().linear_(x, w, got, groups=groups)
            reference.linear_(x, w, want, groups=groups)
            assert rel(got, want) <= (1e-5 if dtype == torch.float32 else 8e-3), (B, groups, K)
            if groups == 4:  # each group read its own input columns: the others do not matter
                x2 = x.clone()
                x2[:, :K] = 0
                again = torch.empty_like(got)
                triton_ops().linear_(x2, w, again, groups=groups)
                assert (again[:, :N // 4] == 0).all() and torch.equal(again[:, N // 4:], got[:, N // 4:])


@kernels_run
@pytest.mark.parametrize("layer0", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv_step_kernel_equals_reference_in_output_state_and_v_first(layer0, dtype):
    results = []
    for ops in (triton_ops(), reference):
        d = clone(op_inputs(dtype=dtype))
        out = torch.empty_like(d["x"], dtype=dtype)
        ops.wkv_step_(d["state"], d["rkv"], d["lora"], d["vec"], d["v_first"], layer0, out)
        results.append((out, d["state"], d["v_first"]))
    (out, state, v_first), (out_r, state_r, v_first_r) = results
    assert rel(state, state_r) <= 1e-6
    assert rel(v_first, v_first_r) <= 1e-6
    assert rel(out, out_r) <= (1e-5 if dtype == torch.float32 else 8e-3)


# ---- the whole step ---------------------------------------------------------------------------------

def _ops_under_test():
    """The reference ops, the Triton kernels and (CPU tensors only) the CPU kernels."""
    from vision_rwkv.ops.rwkv7 import cpu_step

    why = "the CPU kernels take CPU tensors" if DEVICE != "cpu" else cpu_step.build()
    return [pytest.param(reference, id="reference"), pytest.param("triton", id="triton", marks=kernels_run),
            pytest.param(cpu_step, id="cpu", marks=pytest.mark.skipif(why is not None, reason=f"{why}"))]


@torch.no_grad()
@pytest.mark.parametrize("ops", _ops_under_test())
# the fused path (one-pass, then tiled products), the split path (with one-pass, then cuBLAS products)
@pytest.mark.parametrize("B,fused_max", [(1, 16), (8, 16), (3, 0), (20, 16)])
def test_fused_step_equals_lm_step_within_the_fp32_noise_floor(ops, B, fused_max):
    ops = triton_ops() if ops == "triton" else ops
    lm = lm_on(DEVICE)
    tokens = torch.randint(0, 97, (B, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    truth, truth_state = run_lm(lm.double(), tokens, fp64_state(lm.init_state(B)))
    lm = lm.float()
    ref, ref_state = run_lm(lm, tokens)
    fused, fused_state = run_steps(lm, ops, tokens, fused_max_batch=fused_max)
    floor = rel(ref, truth)
    assert 0 < floor < 1e-5
    assert rel(fused, truth) <= FP32_SLACK * floor, (rel(fused, truth), floor)
    for name in ("att_shift", "wkv", "ffn_shift"):
        got, want, base = (getattr(s, name) for s in (fused_state, truth_state, ref_state))
        assert rel(got, want) <= FP32_SLACK * max(rel(base, want), 1e-7), name


@torch.no_grad()
@pytest.mark.parametrize("ops", _ops_under_test())
# the fused path; the split path at a few rows (its one-pass products) and at 20 (the library's products)
@pytest.mark.parametrize("B,fused_max", [(2, 16), (3, 0), (20, 16)])
def test_fused_step_with_bf16_matrices_stays_within_its_bound(ops, B, fused_max):
    """The CPU kernels keep their activations and logits in fp32 (only the products are bf16: the fused path
    reads bf16 weights, the split path rounds each product's input); the others round the products' inputs
    and give bf16 logits. The bound: BF16_BOUND, or BF16_SLACK times
    the bf16 reference ops' own error on the same rows, the larger (see the module's docstring)."""
    ops = triton_ops() if ops == "triton" else ops
    lm = lm_on(DEVICE, seed=3)
    tokens = torch.randint(0, 97, (B, 4), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want, _ = run_steps(lm, reference, tokens)
    floor = rel(run_steps(lm, reference, tokens, dtype=torch.bfloat16)[0], want)
    got, state = run_steps(lm, ops, tokens, dtype=torch.bfloat16, fused_max_batch=fused_max)
    fp32_logits = getattr(ops, "ACTIVATION_DTYPES", None) == (torch.float32,)
    assert got.dtype == (torch.float32 if fp32_logits else torch.bfloat16) and state.wkv.dtype == torch.float32
    assert 0 < floor and rel(got, want) <= max(BF16_BOUND, BF16_SLACK * floor), (rel(got, want), floor)


@torch.no_grad()
def test_batched_step_equals_row_by_row():
    lm = lm_on(DEVICE)
    tokens = torch.randint(0, 97, (4, 3), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    batched, state = run_steps(lm, reference, tokens)
    for row in range(4):
        alone, alone_state = run_steps(lm, reference, tokens[row:row + 1])
        assert rel(alone, batched[row:row + 1]) <= 1e-6
        assert rel(alone_state.wkv, state.wkv[:, row:row + 1]) <= 1e-6


@torch.no_grad()
def test_in_place_weight_changes_are_packed_into_the_same_buffers():
    lm = lm_on("cpu")
    engine = StepEngine(lm, ops=reference, onednn=False)
    before = {k: v.data_ptr() for k, v in engine._buffers.items()}
    for p in lm.parameters():
        p.mul_(0.9)
    engine.sync()
    assert {k: v.data_ptr() for k, v in engine._buffers.items()} == before
    tokens = torch.tensor([1, 2])
    state = lm.init_state(2)
    want, _ = lm.step(tokens, state.clone())
    assert rel(engine.step(tokens, state), want) <= 1e-5
    lm.head.weight = torch.nn.Parameter(lm.head.weight * 2)  # replaced, not changed in place
    engine.sync()
    assert rel(engine.step(tokens, lm.init_state(2)), lm.step(tokens)[0]) <= 1e-5


@torch.no_grad()
def test_onednn_products_on_the_cpu_equal_plain_ones_and_follow_weight_changes():
    lm = lm_on("cpu")
    tokens = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(5))
    fast = StepEngine(lm, ops=reference)
    plain = StepEngine(lm, ops=reference, onednn=False)
    assert fast.onednn and not plain.onednn
    for engine in (fast, plain):
        engine.state = lm.init_state(3)
    for t in range(4):
        assert rel(fast.step(tokens[:, t], fast.state), plain.step(tokens[:, t], plain.state)) <= 1e-5
    before = fast.step(tokens[:, 0], fast.state.clone())
    lm.head.weight.mul_(-1)  # in place: oneDNN's packed copy is made again
    fast.sync()
    after = fast.step(tokens[:, 0], fast.state.clone())
    assert rel(after, -before) <= 1e-5
    assert rel(after, plain.step(tokens[:, 0], plain.state)) <= 1e-5


def test_a_non_contiguous_state_is_one_clear_line():
    lm = lm_on("cpu")
    state = lm.init_state(4)[::2]  # every other row: a strided view
    with pytest.raises(VisionRWKVError, match="contiguous fp32 state; att_shift is torch.float32, not contiguous"):
        StepEngine(lm, ops=reference).step(torch.tensor([1, 2]), state)


# ---- GPT mode: the prefill through the same family ---------------------------------------------------

def seq_inputs(B=2, T=5, C=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(DEVICE)  # noqa: E731
    M = B * T
    return dict(x=rnd(B, T, C, scale=3.0), dx=rnd(B, T, C).to(dtype), shift=rnd(B, C),
                rkv=rnd(3, M, C).to(dtype), lora=rnd(4, M, C).to(dtype), v_first=rnd(M, C), y=rnd(M, C).to(dtype),
                vec=torch.cat([rnd(5, C), rnd(1, C, scale=0.3), 1 + rnd(1, C, scale=0.2), rnd(1, C, scale=0.2)]))


@kernels_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5])
def test_ln_mix_seq_kernel_equals_reference(dtype, T):
    """Every position's shift is the LayerNorm of the one before (the state's at t = 0); the state's shift
    becomes the last position's; x_out = x + dx, and x itself is left alone."""
    base = op_inputs(dtype=dtype)
    for has_dx, groups in ((True, 6), (False, 1)):
        results = []
        for ops in (triton_ops(), reference):
            d = clone(seq_inputs(T=T, dtype=dtype))
            x_before = d["x"].clone()
            x_out = torch.zeros_like(d["x"]) if has_dx else None
            out = torch.empty(groups, *d["x"].shape, dtype=dtype, device=DEVICE)
            ops.ln_mix_seq_(d["x"], d["dx"] if has_dx else None, x_out, base["w"], base["b"], d["shift"],
                            base["mix"][:groups], out)
            assert torch.equal(d["x"], x_before)
            results.append((out, d["shift"]) + ((x_out,) if has_dx else ()))
        for got, want in zip(*results):
            assert rel(got, want) <= (1e-6 if got.dtype == torch.float32 else 8e-3), (has_dx, groups)
    # the mix at t > 0 reads position t - 1, not the state: with mix = 1 the output is the position before
    d = clone(seq_inputs(T=T))
    out = torch.empty(1, *d["x"].shape, device=DEVICE)
    shift = d["shift"].clone()
    triton_ops().ln_mix_seq_(d["x"], None, None, base["w"], base["b"], d["shift"], torch.ones(1, 64, device=DEVICE),
                             out)
    xl = torch.nn.functional.layer_norm(d["x"], (64,), base["w"], base["b"], reference.LN_EPS)
    assert rel(out[0, :, 0], shift) <= 1e-6
    assert T == 1 or rel(out[0, :, 1:], xl[:, :-1]) <= 1e-6
    assert rel(d["shift"], xl[:, -1]) <= 1e-6


@kernels_run
@pytest.mark.parametrize("layer0", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv_pre_and_post_kernels_equal_reference(layer0, dtype):
    H = 4
    results = []
    for ops in (triton_ops(), reference):
        d = clone(seq_inputs(dtype=dtype))
        M, C = d["y"].shape
        pre = torch.empty(5, M, C, device=DEVICE, dtype=dtype)
        ops.wkv_pre_(d["rkv"], d["lora"], d["vec"], d["v_first"], layer0, pre, H)
        out = torch.empty(M, C, device=DEVICE, dtype=dtype)
        ops.wkv_post_(d["y"], d["rkv"][0], pre[1], pre[2], d["lora"][3], d["vec"], out, H)
        results.append((pre, d["v_first"], out))
    for got, want in zip(*results):
        assert rel(got, want) <= (1e-5 if dtype == torch.float32 else 2e-2), layer0
    if layer0:
        assert rel(results[0][1], seq_inputs(dtype=dtype)["rkv"][2]) <= 1e-6  # v_first <- v


def run_prefill(lm, ops, x, state, dtype=None):
    engine = StepEngine(lm, dtype, ops=ops)
    state = state.clone()
    return engine.prefill(x, state), state


@torch.no_grad()
@pytest.mark.parametrize("ops", _ops_under_test())
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7)])
def test_prefill_equals_gpt_mode_within_the_fp32_noise_floor(ops, B, T):
    """engine.prefill against lm(inputs_embeds=x, state=state, last_only=True), from a random state: the same
    measured bound as the step (FP32_SLACK times the fp32 model's own distance from its fp64 run)."""
    ops = triton_ops() if ops == "triton" else ops
    lm = lm_on(DEVICE, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, T, lm.config.n_embd, generator=g).to(DEVICE)
    s0 = lm.init_state(B)
    for t in (s0.att_shift, s0.wkv, s0.ffn_shift):
        t.copy_(torch.randn(t.shape, generator=g))
    truth, truth_state = lm.double()(inputs_embeds=x.double(), state=fp64_state(s0), last_only=True)
    lm = lm.float()
    ref, ref_state = lm(inputs_embeds=x, state=s0.clone(), last_only=True)
    got, state = run_prefill(lm, ops, x, s0)
    floor = rel(ref, truth)
    assert 0 < floor < 1e-5
    assert rel(got, truth) <= FP32_SLACK * floor, (rel(got, truth), floor)
    for name in ("att_shift", "wkv", "ffn_shift"):
        got_s, want, base = (getattr(s, name) for s in (state, truth_state, ref_state))
        assert rel(got_s, want) <= FP32_SLACK * max(rel(base, want), 1e-7), name


@torch.no_grad()
@pytest.mark.parametrize("ops", _ops_under_test())
def test_prefill_then_steps_equals_one_gpt_pass_and_batched_equals_one_by_one(ops):
    """A full pass = a prefill of the first positions then RNN steps from its state; and rows never mix."""
    ops = triton_ops() if ops == "triton" else ops
    lm = lm_on(DEVICE, seed=8)
    tokens = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    want, _ = lm(tokens)
    engine = StepEngine(lm, ops=ops)
    state = lm.init_state(3)
    logits = [engine.prefill(lm.emb(tokens[:, :4]), state)]
    logits += [engine.step(tokens[:, t], state) for t in (4, 5)]
    assert rel(torch.stack(logits, 1), want[:, 3:]) <= 1e-5
    for row in range(3):
        alone = lm.init_state(1)
        assert rel(engine.prefill(lm.emb(tokens[row:row + 1, :4]), alone), logits[0][row:row + 1]) <= 1e-6
        assert rel(alone.wkv, lm(tokens[row:row + 1, :4])[1].wkv) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("ops", _ops_under_test())  # the CPU's: fp32 activations around bf16 products
def test_prefill_with_bf16_matrices_stays_within_its_bound(ops):
    ops = triton_ops() if ops == "triton" else ops
    lm = lm_on(DEVICE, seed=3)
    x = torch.randn(2, 9, lm.config.n_embd, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want, _ = run_prefill(lm, reference, x, lm.init_state(2))
    got, state = run_prefill(lm, ops, x, lm.init_state(2), dtype=torch.bfloat16)
    fp32_logits = getattr(ops, "ACTIVATION_DTYPES", None) == (torch.float32,)  # the CPU kernels' activations
    assert got.dtype == (torch.float32 if fp32_logits else torch.bfloat16) and state.wkv.dtype == torch.float32
    assert rel(got, want) <= BF16_BOUND


# ---- what cannot run says so, once, and falls back --------------------------------------------------

def test_unavailable_kernels_say_why_once_and_fall_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(step_ops_pkg, "_warned", set())
    assert "head size 12 is not a power of two" in unavailable_reason(torch.device("cuda"), 12, 48)
    assert "n_embd 24 is not a multiple of 16" in unavailable_reason(torch.device("cuda"), 8, 24)
    with pytest.warns(UserWarning, match="PyTorch reference ops: head size 12"):
        assert step_ops("cuda", 12, 48) is reference
    with _no_warning():
        assert step_ops("cuda", 12, 48) is reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert unavailable_reason(torch.device("cpu"), 16, 64) == "the decoder is on cpu, not CUDA"
    with _no_warning():  # the CPU's own kernels (tests/ops/test_rwkv7_cpu.py), or the reference for fp16
        assert step_ops("cpu", 16, 64, torch.float16) is reference


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not self.seen, [str(w.message) for w in self.seen]


@torch.no_grad()
def test_the_compiled_cpu_step_equals_the_reference_and_follows_weight_changes(monkeypatch):
    """VISION_RWKV_COMPILE_STEP=1: the CPU stepper compiles the step with one-row products as reductions."""
    from vision_rwkv.lm.graphs import rnn_stepper

    monkeypatch.setenv("VISION_RWKV_COMPILE_STEP", "1")
    lm = lm_on("cpu")
    tokens = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(6))
    stepper = rnn_stepper(lm)
    want, want_state = run_lm(lm, tokens)
    state, got = None, []
    for t in range(4):
        logits, state = stepper(tokens[:, t], state)
        got.append(logits)
    (engine, _), = stepper.engines.values()
    assert engine.reduce and not engine.onednn
    assert stepper.fallback_reason is None or "off the eager step's" in stepper.fallback_reason  # torch 2.11
    assert rel(torch.stack(got, 1), want) <= 1e-5 and rel(state.wkv, want_state.wkv) <= 1e-5
    lm.head.weight.mul_(2)  # in place: packed again, and the compiled step reads the new weights
    assert rel(stepper(tokens[:, 0], None)[0], lm.step(tokens[:, 0])[0]) <= 1e-5


def test_graphs_fall_back_to_plain_operations_with_one_warning_when_the_kernels_cannot_run(monkeypatch):
    """What graphs.GraphedStep captures: the fused step, or, where its kernels cannot run (here: a decoder
    on the CPU, as a head size the kernels lack would be on CUDA), lm.step's operations, said once."""
    from vision_rwkv.lm import graphs

    monkeypatch.setattr(graphs, "_warned", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    stepper = graphs.GraphedStep(lm_on("cpu"))
    with pytest.warns(UserWarning, match=r"fused RNN step cannot run \(the decoder is on cpu, not CUDA\)"):
        assert stepper._engine() is None
    with _no_warning():
        assert stepper._engine() is None
    monkeypatch.setenv("VISION_RWKV_FUSED_STEP", "0")
    monkeypatch.setattr(graphs, "_warned", set())
    with _no_warning():
        assert stepper._engine() is None and not stepper.engines


@torch.no_grad()
def test_a_compiled_cpu_step_that_disagrees_with_the_eager_one_is_replaced_with_one_warning(monkeypatch):
    """torch 2.11's inductor compiled the CPU step wrong on the device's host; the stepper checks the first
    compiled call at each batch size against the eager step and falls back, said once."""
    from vision_rwkv.lm import engine as engine_module
    from vision_rwkv.lm.graphs import rnn_stepper

    def miscompile(fn, **kwargs):
        def wrong(tokens, state):
            fn(tokens, state)
            state.wkv.mul_(1.5)
            return fn(tokens, state) * 2
        return wrong

    monkeypatch.setenv("VISION_RWKV_COMPILE_STEP", "1")
    monkeypatch.setattr(engine_module.torch, "compile", miscompile)
    lm = lm_on("cpu")
    tokens = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(7))
    stepper = rnn_stepper(lm)
    want, want_state = run_lm(lm, tokens)
    state, got = None, []
    with pytest.warns(UserWarning, match="torch.compile of the CPU step gave results .* off the eager step's"):
        logits, state = stepper(tokens[:, 0], state)
    got.append(logits)
    with _no_warning():
        for t in range(1, 4):
            logits, state = stepper(tokens[:, t], state)
            got.append(logits)
    assert "off the eager step's" in stepper.fallback_reason
    assert rel(torch.stack(got, 1), want) <= 1e-5 and rel(state.wkv, want_state.wkv) <= 1e-5


def test_the_weights_fingerprint_sees_values_moves_and_replacements():
    """What the steppers check before each decode: the address and dtype of every parameter (moved or replaced:
    graphs capture again) and its version counter (changed in place: the engine packs again)."""
    lm = RWKV7(tiny_config(vocab_size=50)).eval()
    where, versions = weights_fingerprint(lm)
    params = list(lm.parameters())
    assert len(versions) == len(params) and len(where) == 2 * len(params)
    assert where[0::2] == tuple(p.data_ptr() for p in params) and where[1::2] == tuple(p.dtype for p in params)
    assert weights_fingerprint(lm) == (where, versions)  # nothing changed
    with torch.no_grad():
        lm.blocks[0].att.receptance.weight.add_(1)
    after = weights_fingerprint(lm)
    assert after[0] == where and after[1] != versions
    lm.head.weight = torch.nn.Parameter(lm.head.weight.detach().clone())
    assert weights_fingerprint(lm)[0] != where
    assert weights_fingerprint(lm.to(torch.bfloat16))[0][1::2] == (torch.bfloat16,) * len(params)


@pytest.mark.parametrize("weight", ["head.weight", "blocks.1.ffn.key.weight", "blocks.1.ln1.weight",
                                    "blocks.0.att.receptance.weight"])
def test_the_cpu_step_follows_in_place_weight_changes(weight):
    """The CPU stepper packs the weights once and checks the fingerprint at each step: a packed matrix, a
    LayerNorm the kernels read from lm itself, and the head all follow a change made in place."""
    from vision_rwkv.lm.graphs import rnn_stepper

    torch.manual_seed(0)
    lm = randomize_(RWKV7(tiny_config(vocab_size=50))).eval()
    tokens = torch.tensor([3, 7])
    with torch.no_grad():
        step = rnn_stepper(lm)
        before, _ = step(tokens, None)
        lm.get_parameter(weight).mul_(2)
        after, _ = step(tokens, None)
        want, _ = lm.step(tokens, None)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
