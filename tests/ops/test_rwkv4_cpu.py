"""RWKV-4's RNN step on the CPU through the C++ kernels (vision_rwkv.lm.engine4, kernels/rwkv4_cpu.cpp).

The truth is the model's own step in fp64; the engine's error against it may be at most FP32_SLACK times
that of the fp32 lm.step (the noise floor of fp32 in another order of reduction, as test_rwkv7_step.py
measures RWKV-7's). bf16 weights are checked bit for bit against the fp32 step of their values.
"""

import copy
import warnings

import pytest
import torch
from test_rwkv4 import randomize_
from test_rwkv7_step import FP32_SLACK, rel

from vision_rwkv import RWKV4, DecoderConfig
from vision_rwkv.errors import VisionRWKVError
from vision_rwkv.lm import engine4, graphs
from vision_rwkv.lm.engine import EngineStepper
from vision_rwkv.lm.engine4 import Step4Engine
from vision_rwkv.lm.graphs import rnn_stepper
from vision_rwkv.lm.state import RWKV4State
from vision_rwkv.ops import _build
from vision_rwkv.ops.rwkv7 import cpu_step

BUILD_FAILED = cpu_step.build()
built = pytest.mark.skipif(BUILD_FAILED is not None, reason=f"{BUILD_FAILED}")
V = 120


def model(seed=0, **kw) -> RWKV4:
    """Every parameter random (test_rwkv4.randomize_: the initialisation zeroes whole projections)."""
    cfg = DecoderConfig(**{**dict(arch="rwkv4", vocab_size=V, n_layer=3, n_embd=64, dim_ffn=160), **kw})
    return randomize_(RWKV4(cfg, init=False).eval(), seed=seed)


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(step, lm, toks, state=None):
    """The logits (B,T,V) of stepping through toks (B,T) from `state` (None: fresh), and the final state."""
    state = lm.init_state(toks.shape[0]) if state is None else state
    out = []
    for t in range(toks.shape[1]):
        logits, state = step(toks[:, t], state)
        out.append(logits)
    return torch.stack(out, 1), state


def fp64_truth(lm, toks):
    lm64 = copy.deepcopy(lm).double()
    state = RWKV4State(*(t.double() for t in lm.init_state(toks.shape[0]).tensors()))
    return run(lm64.step, lm64, toks, state)


@built
@torch.no_grad()
@pytest.mark.parametrize("B", [1, 3, 16])
def test_the_step_equals_lm_step_within_the_fp32_noise_floor(B):
    """Logits and every state field over six steps, against the fp64 step: at most FP32_SLACK times the fp32
    lm.step's own error (the channel mix's width, 160, is not a multiple of 64: blocks of 32 columns)."""
    lm = model(seed=B)
    toks = tokens(B, 6, seed=B)
    truth, truth_state = fp64_truth(lm, toks)
    base, base_state = run(lm.step, lm, toks)
    engine = Step4Engine(lm)
    got, got_state = run(lambda t, s: (engine.step(t, s), s), lm, toks, lm.init_state(B).contiguous_float())
    assert engine.block_n == 32 and truth.abs().max() > 1.0
    assert rel(got, truth) <= FP32_SLACK * max(rel(base, truth), 1e-7), (rel(got, truth), rel(base, truth))
    for name, g, b, t in zip(RWKV4State.names(), got_state.tensors(), base_state.tensors(), truth_state.tensors()):
        assert rel(g, t) <= FP32_SLACK * max(rel(b, t), 1e-7), name
    assert not torch.equal(got_state.num, lm.init_state(B).num)  # the state did move


@built
@torch.no_grad()
def test_a_gpt_mode_prefix_then_engine_steps_equal_one_gpt_pass():
    """The image-prefix pattern: lm(...) over the first positions, then the engine's steps from its state,
    against lm(...) over the whole sequence."""
    lm = model(seed=4)
    toks = tokens(2, 9, seed=4)
    whole, whole_state = lm(toks)
    _, state = lm(toks[:, :5])
    steps, state = run(rnn_stepper(lm), lm, toks[:, 5:], state)
    assert rel(steps, whole[:, 5:]) <= 1e-5
    for name, a, b in zip(RWKV4State.names(), state.tensors(), whole_state.tensors()):
        assert rel(a, b) <= 1e-5, name


@built
@torch.no_grad()
@pytest.mark.parametrize("B", [1, 3])
def test_bf16_weights_give_the_fp32_step_of_their_values_bit_for_bit(B):
    """A bf16 model's step (its matrices and embedding read as they are, everything else fp32) equals the
    fp32 step of the same model widened, logits and state; its packed matrices take half the bytes."""
    lm16 = model(seed=5).to(torch.bfloat16)
    lm32 = copy.deepcopy(lm16).float()
    toks = tokens(B, 4, seed=5)
    e16, e32 = Step4Engine(lm16), Step4Engine(lm32)
    got, got_state = run(lambda t, s: (e16.step(t, s), s), lm16, toks, lm16.init_state(B).contiguous_float())
    want, want_state = run(lambda t, s: (e32.step(t, s), s), lm32, toks, lm32.init_state(B).contiguous_float())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for name, a, b in zip(RWKV4State.names(), got_state.tensors(), want_state.tensors()):
        assert torch.equal(a, b), name
    assert e16._head.dtype == torch.bfloat16 and e16._layers[2 + 3].dtype == torch.bfloat16  # layer 0's w_att
    assert torch.equal(e16._layers[2 + 3].float(), e32._layers[2 + 3])
    # a single matrix already in the compute dtype is read where it is, not copied (the head's 154 MB at 169M)
    assert e32._head.data_ptr() == lm32.head.weight.data_ptr()
    assert e32._layers[2 + 6].data_ptr() == lm32.blocks[0].att.output.weight.data_ptr()


@built
@torch.no_grad()
def test_under_bf16_autocast_the_step_reads_bf16_copies_of_the_matrices():
    """fp32 weights under bf16 autocast: the fp32 step of a model whose matrices alone are rounded to bf16."""
    lm, rounded = model(seed=6), model(seed=6)
    for m in rounded.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.copy_(m.weight.bfloat16().float())
    toks = tokens(2, 3, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = run(rnn_stepper(lm), lm, toks)
    want, _ = run(rnn_stepper(rounded), rounded, toks)
    assert torch.equal(got, want)
    assert not torch.equal(want, run(rnn_stepper(lm), lm, toks)[0])  # the rounding did change something


@built
@torch.no_grad()
def test_batched_equals_one_by_one():
    lm = model(seed=7)
    toks = tokens(4, 3, seed=7)
    step = rnn_stepper(lm)
    batched, state = run(step, lm, toks)
    state = state[torch.arange(4)]  # the stepper's own buffer: a copy before the next calls
    for row in range(4):
        alone, alone_state = run(step, lm, toks[row:row + 1])
        assert rel(alone, batched[row:row + 1]) <= 1e-6
        assert rel(alone_state.num, state.num[:, row:row + 1]) <= 1e-6


@built
@torch.no_grad()
def test_rnn_stepper_takes_the_engine_up_to_its_rows_and_lm_step_above():
    lm = model(seed=8)
    step = rnn_stepper(lm)
    assert isinstance(step, EngineStepper) and step.engine_class is Step4Engine
    rows = cpu_step.MAX_ROWS  # with fp32 products (bf16 ones: cpu_step.fused_max_batch)
    assert step._engine(torch.float32, False)[0].max_rows == rows
    wide = model(seed=8, n_layer=1, n_embd=512, dim_ffn=1024)
    assert Step4Engine(wide, torch.bfloat16).max_rows == cpu_step.FUSED_MAX_BATCH == 8
    assert Step4Engine(wide).max_rows == 16
    toks = tokens(rows + 1, 2, seed=8)
    below, below_state = run(step, lm, toks[:rows])
    assert below_state is step.states[rows]  # the engine's own buffer, stepped in place
    above, above_state = run(step, lm, toks)
    assert rows + 1 not in step.states  # lm.step's functional state
    assert rel(above[:rows], below) <= 1e-5
    with torch.enable_grad():
        assert rnn_stepper(lm) == lm.step  # autograd on: lm.step
    lm.train()
    assert rnn_stepper(lm) == lm.step


@built
@torch.no_grad()
def test_tokens_and_states_are_checked_in_one_line():
    lm = model(seed=9)
    step = rnn_stepper(lm)
    with pytest.raises(VisionRWKVError, match=f"token id {V} is outside this model.s vocabulary"):
        step(torch.tensor([V]), None)
    with pytest.raises(VisionRWKVError, match="RWKV-4"):
        step(torch.tensor([1, 2]), lm.init_state(3))
    engine = step._engine(torch.float32, False)[0]
    ln0_w, ln0_b, *layers, out_w, out_b = engine._layers
    state = lm.init_state(1)

    def call(toks, layer_list, st):
        torch.ops.vision_rwkv_cpu.rwkv4_step_fused_(toks, engine._emb, ln0_w, ln0_b, layer_list, engine._seg_att,
                                                    engine._seg_ffn, *st.tensors(), out_w, out_b,
                                                    torch.empty(toks.shape[0], 64), engine.block_n)

    with pytest.raises(RuntimeError, match=f"token {V} is outside 0..{V - 1}"):
        call(torch.tensor([V]), layers, state)
    with pytest.raises(RuntimeError, match="12 tensors a layer"):
        call(torch.tensor([1]), layers[:-1], state)
    with pytest.raises(RuntimeError, match="each state field must be \\(3, 1, 64\\)"):
        call(torch.tensor([1]), layers, lm.init_state(2))
    swapped = list(layers)
    swapped[3], swapped[6] = swapped[6], swapped[3]  # the output matrix where the key-value-receptance one goes
    with pytest.raises(RuntimeError, match="layer 0's weights do not have RWKV-4's shapes"):
        call(torch.tensor([1]), swapped, state)
    narrow = list(layers)
    narrow[12 + 4] = narrow[12 + 4][:32].contiguous()  # layer 1's decay, half as wide
    with pytest.raises(RuntimeError, match="layer 1's weights do not have RWKV-4's shapes"):
        call(torch.tensor([1]), narrow, state)
    assert torch.equal(state.num, lm.init_state(1).num)  # nothing was stepped


def test_fp16_weights_and_the_kernels_switched_off_take_lm_step_quietly(monkeypatch):
    lm = model(seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            half = copy.deepcopy(lm).half()
            assert rnn_stepper(half) == half.step
            monkeypatch.setenv("VISION_RWKV_FUSED_STEP", "0")
            assert rnn_stepper(lm) == lm.step
            monkeypatch.setenv("VISION_RWKV_FUSED_STEP", "1")
            monkeypatch.setenv("VISION_RWKV_CPU_KERNELS", "0")
            assert rnn_stepper(lm) == lm.step
    assert "fp16" in engine4.unavailable_reason(half) or "float16" in engine4.unavailable_reason(half)


def test_the_engine_itself_refuses_what_its_kernels_cannot_run_in_one_line():
    with pytest.raises(VisionRWKVError, match="the RWKV-4 CPU step cannot run: the CPU kernels read fp32 or bf16"):
        Step4Engine(model(seed=14), torch.float16)


def test_a_failed_build_says_why_once_and_the_step_is_lm_step(monkeypatch):
    monkeypatch.setattr(graphs, "_warned", set())
    monkeypatch.setattr(_build, "_cpu_built", ["the CPU kernel failed to build: g++: not found"])
    lm = model(seed=11)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="RWKV-4 step runs lm.step on the CPU: the CPU kernel failed to build"):
            assert rnn_stepper(lm) == lm.step
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert rnn_stepper(lm) == lm.step


@built
@torch.no_grad()
def test_weights_changed_in_place_are_packed_again():
    lm = model(seed=12)
    step = rnn_stepper(lm)
    toks = tokens(1, 2, seed=12)
    before, _ = run(step, lm, toks)
    lm.blocks[1].ffn.value.weight.mul_(2)
    after, _ = run(step, lm, toks)
    want, _ = run(lm.step, lm, toks)
    assert not torch.equal(before, after) and rel(after, want) <= 1e-5


@built
@pytest.mark.slow
@torch.no_grad()
def test_greedy_decoding_of_a_random_169m_sized_model_gives_lm_steps_tokens(monkeypatch):
    """RWKV-4 169M's shape (L12-D768, V50277), random weights: 4 prompts and then 1, 24 greedy tokens
    each, the GPT-mode prompt then steps through the engine, against lm.step's (VISION_RWKV_FUSED_STEP=0)."""
    lm = model(seed=13, vocab_size=50277, n_layer=12, n_embd=768, dim_ffn=3072)
    prompts = torch.randint(0, 50277, (4, 6), generator=torch.Generator().manual_seed(0))

    def greedy(rows, fused):
        monkeypatch.setenv("VISION_RWKV_FUSED_STEP", "1" if fused else "0")
        logits, state = lm(rows, last_only=True)
        step, out = rnn_stepper(lm), []
        for _ in range(24):
            out.append(logits.argmax(-1))
            logits, state = step(out[-1], state)
        return torch.stack(out, 1)

    for rows in (prompts, prompts[:1]):
        assert torch.equal(greedy(rows, True), greedy(rows, False))


# ---- the WKV-4 recurrence over a sequence (GPT mode's inference): kernels/rwkv4_cpu.cpp's wkv4_forward ----------


def wkv4_inputs(B, T, C, seed=0, with_state=True):
    from vision_rwkv.ops.wkv4 import MAX_INIT

    g = torch.Generator().manual_seed(seed)
    w, u = -torch.exp(torch.randn(C, generator=g) - 1), 0.5 * torch.randn(C, generator=g)
    k, v = 3 * torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    state = None
    if with_state:
        state = (torch.randn(B, C, generator=g), 0.1 + torch.rand(B, C, generator=g), torch.randn(B, C, generator=g))
        state[2][0, :3] = MAX_INIT  # a fresh channel beside the others
    return w, u, k, v, state


@built
@torch.no_grad()
@pytest.mark.parametrize("B,T,C", [(1, 1, 16), (2, 37, 72), (3, 5, 7), (1, 200, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_the_wkv4_kernel_equals_the_fp64_recurrence_within_the_fp32_noise_floor(B, T, C, with_state):
    """Outputs and the final state, against the reference in fp64: at most FP32_SLACK times the fp32
    reference's own error (widths that are not a multiple of 16 run the scalar tail, 7 only that)."""
    from vision_rwkv.ops.wkv4 import wkv4, wkv4_reference

    w, u, k, v, state = wkv4_inputs(B, T, C, seed=B * T + C, with_state=with_state)
    as64 = lambda ts: None if ts is None else tuple(t.double() for t in ts)  # noqa: E731
    truth, truth_state = wkv4_reference(*as64((w, u, k, v)), as64(state))
    base, base_state = wkv4_reference(w, u, k, v, state)
    got, got_state = wkv4(w, u, k, v, state, impl="cpu")
    assert got.dtype == torch.float32 and got.shape == k.shape
    assert rel(got, truth) <= FP32_SLACK * max(rel(base, truth), 1e-7)
    for name, a, b, t in zip(("num", "den", "max"), got_state, base_state, truth_state):
        assert rel(a, t) <= FP32_SLACK * max(rel(b, t), 1e-7), name
    if state is not None:  # the caller's state is not changed
        assert torch.equal(state[0], wkv4_inputs(B, T, C, seed=B * T + C)[4][0])


@built
@torch.no_grad()
def test_an_empty_sequence_returns_the_state_it_was_given():
    from vision_rwkv.ops.wkv4 import fresh_state, wkv4

    w, u, k, v, state = wkv4_inputs(2, 0, 24, seed=3)
    y, out = wkv4(w, u, k, v, state, impl="cpu")
    assert y.shape == (2, 0, 24) and all(torch.equal(a, b) for a, b in zip(out, state))
    y, out = wkv4(w, u, k, v, None, impl="cpu")
    assert all(torch.equal(a, b) for a, b in zip(out, fresh_state(2, 24, k.device)))


@built
def test_auto_takes_the_wkv4_kernel_for_inference_and_the_reference_for_gradients_and_fp64(monkeypatch):
    from vision_rwkv.ops import wkv4 as wkv4_pkg
    from vision_rwkv.ops.wkv4 import cpu as cpu_impl

    calls = []
    monkeypatch.setattr(cpu_impl, "wkv4_cpu", lambda *a: calls.append("cpu") or wkv4_pkg.wkv4_reference(*a))
    w, u, k, v, state = wkv4_inputs(1, 4, 32, seed=4)
    with torch.no_grad():
        wkv4_pkg.wkv4(w, u, k, v, state)
        wkv4_pkg.wkv4(w, u, k.bfloat16(), v.bfloat16(), state)  # bf16: the kernel too, in fp32
        wkv4_pkg.wkv4(w.double(), u.double(), k.double(), v.double(), None)  # fp64: the reference, quietly
    assert calls == ["cpu", "cpu"]
    k.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = wkv4_pkg.wkv4(w, u, k, v, state)  # gradients needed: the reference, quietly
    y.sum().backward()
    assert calls == ["cpu", "cpu"] and k.grad is not None and k.grad.abs().sum() > 0
    with pytest.raises(VisionRWKVError, match="wkv4 impl 'cpu' was asked for but cannot run: gradients are needed"):
        wkv4_pkg.wkv4(w, u, k, v, state, impl="cpu")
    with pytest.raises(VisionRWKVError, match="cannot run: inputs are torch.float64; the CPU kernel takes fp32, bf16"):
        wkv4_pkg.wkv4(w.double(), u.double(), k.detach().double(), v.double(), None, impl="cpu")


@built
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_wkv4_kernel_computes_half_precision_inputs_in_fp32_as_the_reference_does(dtype):
    """k and v in bf16 or fp16: both compute in fp32 from the same rounded values and return y in k's dtype,
    so they agree to fp32's noise before y's rounding (the state, fp32, within FP32_SLACK of its floor)."""
    from vision_rwkv.ops.wkv4 import wkv4, wkv4_reference

    w, u, k, v, state = wkv4_inputs(2, 19, 40, seed=6)
    k, v = k.to(dtype), v.to(dtype)
    got, got_state = wkv4(w, u, k, v, state, impl="cpu")
    want, want_state = wkv4_reference(w, u, k, v, state)
    as64 = (t.double() for t in (w, u, k, v))
    truth, truth_state = wkv4_reference(*as64, tuple(t.double() for t in state))
    assert got.dtype == want.dtype == dtype
    assert rel(got, truth) <= max(rel(want, truth), 1e-7) * FP32_SLACK
    for name, a, b, t in zip(("num", "den", "max"), got_state, want_state, truth_state):
        assert a.dtype == torch.float32 and rel(a, t) <= FP32_SLACK * max(rel(b, t), 1e-7), name


@built
@torch.no_grad()
def test_the_wkv4_kernels_state_is_all_or_nothing():
    w, u, k, v, state = wkv4_inputs(1, 3, 16, seed=5)
    with pytest.raises(RuntimeError, match="takes the whole state \\(num, den, max\\) or none of it"):
        torch.ops.vision_rwkv_cpu.wkv4_forward(w, u, k, v, state[0], None, None, -1e38)
    with pytest.raises(RuntimeError, match="state must be \\(1, 16\\) each"):
        torch.ops.vision_rwkv_cpu.wkv4_forward(w, u, k, v, *(t[:, :8].contiguous() for t in state), -1e38)
