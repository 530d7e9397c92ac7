"""The RNN step's C++ kernels for the CPU (vision_rwkv.ops.rwkv7.cpu_step, kernels/rwkv7_cpu.cpp).

Each op against its PyTorch reference on the same inputs here; the whole step and the prefill through them
against the model's own fp64 run in test_rwkv7_step.py (its "cpu" parameters), with its bound: at most
FP32_SLACK times the error of the fp32 reference (lm.step, lm(...)) against the same truth. The kernels
build on first use (a few seconds); where they cannot (no C++ compiler), these tests skip with the build's
reason, and the engine falls back to the reference ops with one warning, which the last tests check by
forcing a failed build.
"""

import pytest
import torch
from test_rwkv7_step import BF16_BOUND, BF16_SLACK, _no_warning, lm_on, rel, run_steps

from vision_rwkv.lm.engine import StepEngine
from vision_rwkv.ops import _build
from vision_rwkv.ops import rwkv7 as step_ops_pkg
from vision_rwkv.ops.rwkv7 import cpu_step, reference, step_ops
from vision_rwkv.ops.rwkv7.reference import ACT_NONE, ACT_RELU2, ACT_SIGMOID, ACT_TANH

BUILD_FAILED = cpu_step.build()
built = pytest.mark.skipif(BUILD_FAILED is not None, reason=f"{BUILD_FAILED}")


def rnd(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


def layer_vectors(g, C):
    """vec (8,C) in VEC_ROWS order, with ln_x's weight near 1."""
    return torch.cat([rnd(g, 5, C), rnd(g, 1, C, scale=0.3), 1 + rnd(g, 1, C, scale=0.2), rnd(g, 1, C, scale=0.2)])


@built
@pytest.mark.parametrize("B", [1, 3, 16])
def test_ln_mix_matmul_equals_reference(B):
    """Every activation and mix row, a partial last block of columns (N = 88 in blocks of 16), with and
    without the residual input, the shift and the deferred shift copy."""
    g = torch.Generator().manual_seed(7)
    C, N, bn = 64, 88, 16
    x, dx, shift, prev_xl = rnd(g, B, C, scale=3.0), rnd(g, B, C), rnd(g, B, C), rnd(g, B, C)
    weight, bias, mix = 1 + rnd(g, C, scale=0.2), rnd(g, C, scale=0.2), torch.rand(6, C, generator=g)
    w = rnd(g, N, C) / 8
    acts = [ACT_NONE, ACT_TANH, ACT_SIGMOID, ACT_RELU2, ACT_NONE, ACT_TANH]
    segments = torch.tensor([m + 256 * a for m, a in zip([0, 1, 2, 3, 4, 5], acts)], dtype=torch.int32)
    for has_dx, has_shift, has_prev in ((True, True, True), (False, True, False), (True, False, True)):
        results = []
        for ops in (cpu_step, reference):
            x_out, xl_out, prev_shift = (torch.zeros(B, C) for _ in range(3))
            out = torch.full((B, N), float("nan"))
            ops.ln_mix_matmul_(x, dx if has_dx else None, x_out, xl_out, weight, bias,
                               shift if has_shift else None, mix, w, segments, out, bn,
                               **(dict(prev_xl=prev_xl, prev_shift=prev_shift) if has_prev else {}))
            results.append((out, x_out, xl_out, prev_shift))
        for got, want in zip(*results):
            assert rel(got, want) <= 1e-6, (has_dx, has_shift, has_prev)
        assert (results[0][0][:, 48:64] >= 0).all()  # the relu^2 block


@built
@pytest.mark.parametrize("B", [1, 3, 16])
def test_grouped_linear_equals_reference(B):
    """One group and four; rows that are views into wider rows (as the step's low-rank inputs are); an
    output width that is not a multiple of 16, and an input width that is not either (the tail loop)."""
    g = torch.Generator().manual_seed(8)
    for groups, K, N in ((1, 64, 88), (4, 32, 64 * 4), (1, 100, 24), (1, 768, 40)):
        x = rnd(g, B, 16 + groups * K)[:, 16:]  # strided rows
        w = rnd(g, N, K) / 8
        got, want = (torch.full((B, N), float("nan")) for _ in range(2))
        cpu_step.linear_(x, w, got, groups=groups)
        reference.linear_(x, w, want, groups=groups)
        assert rel(got, want) <= 1e-6, (groups, K, N)
        if groups == 4:  # each group read its own input columns: the others do not matter
            x2 = x.clone()
            x2[:, :K] = 0
            again = torch.empty_like(got)
            cpu_step.linear_(x2, w, again, groups=groups)
            assert (again[:, :N // 4] == 0).all() and torch.equal(again[:, N // 4:], got[:, N // 4:])


@built
@pytest.mark.parametrize("layer0", [True, False])
@pytest.mark.parametrize("B,H,N", [(1, 4, 16), (3, 2, 64)])
def test_wkv_step_equals_reference_in_output_state_and_v_first(layer0, B, H, N):
    """rkv and lora as the engine passes them: (G,B,C) views into one (B, G*C + ...) buffer."""
    C = H * N
    results = []
    for ops in (cpu_step, reference):
        g = torch.Generator().manual_seed(5)
        state = rnd(g, B, H, N, N)
        rkv = rnd(g, B, 3 * C + 8)[:, :3 * C].view(B, 3, C).transpose(0, 1)
        lora = rnd(g, B, 4 * C).view(B, 4, C).transpose(0, 1)
        vec, v_first, out = layer_vectors(g, C), rnd(g, B, C), torch.full((B, C), float("nan"))
        ops.wkv_step_(state, rkv, lora, vec, v_first, layer0, out)
        results.append((out, state, v_first))
    (out, state, v_first), (out_r, state_r, v_first_r) = results
    assert rel(state, state_r) <= 1e-6
    assert rel(v_first, v_first_r) <= 1e-6
    assert rel(out, out_r) <= 1e-5


@built
def test_bad_inputs_are_one_clear_line():
    w, out = torch.randn(8, 16), torch.empty(1, 8)
    with pytest.raises(RuntimeError, match="linear_'s w must be an fp32 or bf16 CPU tensor, got Half"):
        cpu_step.linear_(torch.randn(1, 16), w.half(), out)
    with pytest.raises(RuntimeError, match="linear_'s x must be an fp32 CPU tensor, got BFloat16"):
        cpu_step.linear_(torch.randn(1, 16).bfloat16(), w, out)
    with pytest.raises(RuntimeError, match="linear_ takes at most 16 rows, got 17"):
        cpu_step.linear_(torch.randn(17, 16), w, torch.empty(17, 8))
    with pytest.raises(RuntimeError, match="linear_: shapes"):
        cpu_step.linear_(torch.randn(1, 12), w, out)


@built
@pytest.mark.parametrize("B", [1, 7, 16])
def test_bf16_weights_give_the_products_of_their_fp32_values(B):
    """bf16 weights are widened to fp32 exactly as they are read, and summed in the same order: the products
    equal those of the same values stored as fp32, bit for bit (K = 100: the tail loop reads them too)."""
    g = torch.Generator().manual_seed(9)
    for groups, K, N in ((1, 64, 88), (4, 32, 64 * 4), (1, 100, 24)):
        x = rnd(g, B, groups * K)
        w = (rnd(g, N, K) / 8).bfloat16()
        got, want = (torch.full((B, N), float("nan")) for _ in range(2))
        cpu_step.linear_(x, w, got, groups=groups)
        cpu_step.linear_(x, w.float(), want, groups=groups)
        assert torch.equal(got, want), (groups, K, N)
    C, N = 64, 88
    x, shift = rnd(g, B, C), rnd(g, B, C)
    weight, bias, mix = 1 + rnd(g, C, scale=0.2), rnd(g, C, scale=0.2), torch.rand(6, C, generator=g)
    w = (rnd(g, N, C) / 8).bfloat16()
    segments = torch.tensor([m + 256 * a for m, a in zip(range(6), [0, 1, 2, 3, 0, 1])], dtype=torch.int32)
    results = []
    for weights in (w, w.float()):
        x_out, xl_out, out = torch.empty(B, C), torch.empty(B, C), torch.empty(B, N)
        cpu_step.ln_mix_matmul_(x, None, x_out, xl_out, weight, bias, shift, mix, weights, segments, out, 16)
        results.append(out)
    assert torch.equal(*results) and not results[0].isnan().any()


# ---- the whole step ---------------------------------------------------------------------------------

@built
@torch.no_grad()
@pytest.mark.parametrize("B", [1, 3])
def test_the_whole_step_with_bf16_weights_equals_the_fp32_step_of_their_values(B):
    """A bf16 model's fused CPU step (bf16 weights and embedding read as they are, fp32 activations) against
    the fp32 step of the same model widened to fp32: the same logits and state, bit for bit, over four steps;
    and the bf16 model's packed matrices take half the bytes."""
    lm16 = lm_on("cpu", seed=5).to(torch.bfloat16)
    lm32 = lm_on("cpu", seed=5).to(torch.bfloat16).float()
    tokens = torch.randint(0, 97, (B, 4), generator=torch.Generator().manual_seed(1))
    got, got_state = run_steps(lm16, cpu_step, tokens)
    want, want_state = run_steps(lm32, cpu_step, tokens)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert torch.equal(getattr(got_state, name), getattr(want_state, name)), name
    packed16, packed32 = StepEngine(lm16)._buffers, StepEngine(lm32)._buffers
    for name in ("0.w_in", "0.lora2_in", "0.w_out", "0.w_key", "0.w_value", "head", "emb"):
        assert packed16[name].dtype == torch.bfloat16 and torch.equal(packed16[name].float(), packed32[name]), name


@built
@torch.no_grad()
def test_a_bf16_step_above_the_fused_rows_and_a_bf16_prefill_keep_fp32_activations_within_the_bf16_bound():
    """Past the fused path's rows (the split path) and in the prefill, bf16 products run between the kernels'
    fp32 activations: each product's input rounded to bf16 and its output widened. Within test_rwkv7_step's
    bf16 bound of the fp32 step (BF16_BOUND, or BF16_SLACK times the bf16 reference ops' own error on the
    same rows), and the logits stay fp32."""
    lm = lm_on("cpu", seed=3)
    B = 20
    tokens = torch.randint(0, 97, (B, 3), generator=torch.Generator().manual_seed(2))
    want, _ = run_steps(lm, reference, tokens)
    floor = rel(run_steps(lm, reference, tokens, dtype=torch.bfloat16)[0], want)
    got, state = run_steps(lm, cpu_step, tokens, dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and 0 < rel(got, want) <= max(BF16_BOUND, BF16_SLACK * floor)
    assert not torch.equal(got, want)  # the products did round
    x = torch.randn(2, 5, lm.config.n_embd, generator=torch.Generator().manual_seed(4))
    engine = StepEngine(lm, torch.bfloat16)
    assert engine.ops is cpu_step and engine.act_dtype == torch.float32
    truth = lm(inputs_embeds=x, last_only=True)[0]
    floor = rel(StepEngine(lm, torch.bfloat16, ops=reference).prefill(x, lm.init_state(2)), truth)
    got = engine.prefill(x, lm.init_state(2))
    assert got.dtype == torch.float32 and 0 < rel(got, truth) <= max(BF16_BOUND, BF16_SLACK * floor)


@built
@torch.no_grad()
def test_the_cpu_step_under_bf16_autocast_reads_bf16_copies_of_the_matrices():
    """fp32 weights under bf16 autocast: the fused step reads bf16 copies of the products' weights (the
    embedding, LayerNorms and vectors stay fp32), which is the fp32 step of a model whose matrices alone are
    rounded to bf16, bit for bit."""
    lm = lm_on("cpu", seed=8)
    rounded = lm_on("cpu", seed=8)
    matrices = [m.weight for m in rounded.modules() if isinstance(m, torch.nn.Linear)]
    matrices += [getattr(b.att, f"{n}{i}") for b in rounded.blocks for n in reference.LORA_ROWS for i in (1, 2)]
    for p in matrices:
        p.data.copy_(p.data.bfloat16().float())
    tokens = torch.randint(0, 97, (2, 3), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine = StepEngine(lm)
        state = lm.init_state(2)
        got = torch.stack([engine.step(tokens[:, t], state) for t in range(3)], 1)
    assert engine.ops is cpu_step and engine.dtype == torch.bfloat16
    want, want_state = run_steps(rounded, cpu_step, tokens)
    assert torch.equal(got, want) and torch.equal(state.wkv, want_state.wkv)
    assert not torch.equal(want, run_steps(lm, cpu_step, tokens)[0])  # the rounding did change something


@built
@torch.no_grad()
def test_batched_equals_one_by_one():
    lm = lm_on("cpu", seed=2)
    tokens = torch.randint(0, 97, (4, 3), generator=torch.Generator().manual_seed(4))
    batched, state = run_steps(lm, cpu_step, tokens)
    for row in range(4):
        alone, alone_state = run_steps(lm, cpu_step, tokens[row:row + 1])
        assert rel(alone, batched[row:row + 1]) <= 1e-6
        assert rel(alone_state.wkv, state.wkv[:, row:row + 1]) <= 1e-6


@built
@torch.no_grad()
@pytest.mark.parametrize("B", [1, 3, 8])
def test_the_whole_step_in_one_call_equals_the_step_op_by_op(B):
    """step_fused_ (every layer in one C++ call, the engine's default with these kernels) against the same
    operations called one by one from Python, as every other family runs them: logits and the whole state
    over four steps. Its first and last LayerNorms are the kernels' rather than torch's, hence not bitwise."""
    import types

    one_by_one = types.SimpleNamespace(**{n: getattr(cpu_step, n) for n in dir(cpu_step)
                                          if not n.startswith("__") and n != "step_fused_"})
    lm = lm_on("cpu", seed=6)
    tokens = torch.randint(0, 97, (B, 4), generator=torch.Generator().manual_seed(7))
    whole, whole_state = run_steps(lm, cpu_step, tokens, fused_max_batch=8)
    split, split_state = run_steps(lm, one_by_one, tokens, fused_max_batch=8)
    assert rel(whole, split) <= 1e-6
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert rel(getattr(whole_state, name), getattr(split_state, name)) <= 1e-6, name
    assert not torch.equal(whole_state.wkv, lm.init_state(B).wkv)  # the state did move


@built
@torch.no_grad()
def test_the_whole_step_checks_its_tokens_and_its_layer_list():
    from vision_rwkv.lm.engine import StepEngine as Engine

    lm = lm_on("cpu", seed=6)
    engine = Engine(lm)
    state = lm.init_state(1)
    with pytest.raises(RuntimeError, match="token 97 is outside 0..96"):
        engine.step(torch.tensor([97]), state)
    as_int32 = engine.step(torch.tensor([5, 9], dtype=torch.int32), lm.init_state(2))
    assert torch.equal(as_int32, engine.step(torch.tensor([5, 9]), lm.init_state(2)))
    p, ln0 = engine._buffers, lm.blocks[0].ln0
    with pytest.raises(RuntimeError, match="the state must hold 3 layers of 1 rows of width 64"):
        cpu_step.step_fused_(torch.tensor([1]), p["emb"], ln0.weight, ln0.bias, engine._step_layers()[2:-2],
                             p["seg_in"], p["seg_key"], lm.init_state(2), lm.ln_out.weight, lm.ln_out.bias,
                             torch.empty(1, lm.config.n_embd), engine.block_n, engine.lora_rank)
    with pytest.raises(RuntimeError, match="12 tensors a layer"):
        cpu_step.step_fused_(torch.tensor([1]), p["emb"], ln0.weight, ln0.bias, engine._step_layers()[2:-3],
                             p["seg_in"], p["seg_key"], state, lm.ln_out.weight, lm.ln_out.bias,
                             torch.empty(1, lm.config.n_embd), engine.block_n, engine.lora_rank)


@built
@torch.no_grad()
def test_the_cpu_engine_takes_the_kernels_for_fp32_and_bf16_products_and_the_reference_otherwise():
    lm = lm_on("cpu")
    engine = StepEngine(lm)
    assert engine.ops is cpu_step and engine.uses_kernels
    assert engine.fused_max_batch == cpu_step.MAX_ROWS  # a narrow model: the fused path up to 16 rows
    assert StepEngine(lm_on("cpu", n_embd=512, head_size=64)).fused_max_batch == cpu_step.FUSED_MAX_BATCH
    assert engine._onednn == {}  # the fused path made no oneDNN copies
    bf16 = StepEngine(lm, torch.bfloat16)  # bf16 weights in the fused step; fp32 activations around the others
    assert bf16.ops is cpu_step and bf16._buffers["0.w_in"].dtype == torch.bfloat16
    assert bf16.act_dtype == torch.float32 and engine.act_dtype == torch.float32
    with _no_warning():
        assert StepEngine(lm, torch.float16).ops is reference
        assert StepEngine(lm_on("cpu").half(), torch.bfloat16).ops is reference  # bf16 products, fp16 embedding
    assert StepEngine(lm, reduce=True).ops is reference  # the compiled step traces the reference ops


def test_a_failed_build_says_why_once_and_the_step_runs_the_reference(monkeypatch):
    monkeypatch.setattr(step_ops_pkg, "_warned", set())
    monkeypatch.setattr(_build, "_cpu_built", ["the CPU kernel failed to build: g++: not found"])
    why = "reference ops on the CPU: the CPU kernel failed to build: g\\+\\+: not found"
    with pytest.warns(UserWarning, match=why):
        assert step_ops("cpu", 16, 64) is reference
    lm, tokens = lm_on("cpu"), torch.tensor([3, 9])
    with _no_warning(), torch.no_grad():
        assert step_ops("cpu", 16, 64) is reference
        engine = StepEngine(lm)
        got = engine.step(tokens, lm.init_state(2))
    assert engine.ops is reference and rel(got, lm.step(tokens)[0]) <= 1e-5


@built
def test_the_cpu_prefill_runner_is_the_engine_equals_gpt_mode_and_leaves_the_callers_state():
    from vision_rwkv.errors import VisionRWKVError
    from vision_rwkv.lm.engine import EngineStepper
    from vision_rwkv.lm.graphs import prefill_runner

    lm = lm_on("cpu", seed=4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, lm.config.n_embd, generator=g)
    s0 = lm.init_state(2)
    for t in (s0.att_shift, s0.wkv, s0.ffn_shift):
        t.copy_(torch.randn(t.shape, generator=g))
    before = s0.clone()
    with torch.no_grad():
        run = prefill_runner(lm)
        assert isinstance(run.__self__, EngineStepper)
        got, state = run(x, s0)
        want, want_state = lm(inputs_embeds=x, state=s0, last_only=True)
        fresh, _ = run(x)  # from the zero state
        with pytest.raises(VisionRWKVError, match=r"inputs_embeds must have shape \(B, T, 64\)"):
            run(torch.randn(2, 5, 63))
    assert rel(got, want) <= 1e-5 and rel(state.wkv, want_state.wkv) <= 1e-5
    assert rel(fresh, lm(inputs_embeds=x, last_only=True)[0].detach()) <= 1e-5
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert torch.equal(getattr(s0, name), getattr(before, name)), name
    assert not isinstance(getattr(prefill_runner(lm), "__self__", None), EngineStepper)  # autograd on: plain


# ---- GPT mode's ops --------------------------------------------------------------------------------------

@built
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("C", [64, 72])
def test_ln_mix_seq_equals_reference(T, C):
    """Every position's shift is the LayerNorm of the one before (the state's at t = 0); the state's shift
    becomes the last position's; x_out = x + dx, and x itself is left alone. C 72 ends in a partial vector."""
    B = 3
    for has_dx, groups in ((True, 6), (False, 1)):
        results = []
        for ops in (cpu_step, reference):
            g = torch.Generator().manual_seed(11)
            x, dx, shift = rnd(g, B, T, C, scale=3.0), rnd(g, B, T, C), rnd(g, B, C)
            weight, bias, mix = 1 + rnd(g, C, scale=0.2), rnd(g, C, scale=0.2), torch.rand(groups, C, generator=g)
            x_before = x.clone()
            x_out = torch.full_like(x, float("nan")) if has_dx else None
            out = torch.full((groups, B, T, C), float("nan"))
            ops.ln_mix_seq_(x, dx if has_dx else None, x_out, weight, bias, shift, mix, out)
            assert torch.equal(x, x_before)
            results.append((out, shift) + ((x_out,) if has_dx else ()))
        for got, want in zip(*results):
            assert rel(got, want) <= 1e-6, (has_dx, groups)


@built
@pytest.mark.parametrize("layer0", [True, False])
@pytest.mark.parametrize("N", [16, 24])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_wkv_pre_and_post_equal_reference(layer0, N, scale):
    """rkv and lora as the engine passes them (stacked products); wkv_post_ reads rows of them as views. N 24
    takes wkv_pre_'s 16-wide form and its one-at-a-time tail; scale 40 sends the sigmoids' arguments past
    +-88, where the vectorised exp clamps."""
    M, H = 10, 4
    C = H * N
    results = []
    for ops in (cpu_step, reference):
        g = torch.Generator().manual_seed(12)
        rkv, lora, vec = rnd(g, 3, M, C), rnd(g, 4, M, C, scale=scale), layer_vectors(g, C)
        v_first, y = rnd(g, M, C), rnd(g, M, C)
        pre, out = torch.full((5, M, C), float("nan")), torch.full((M, C), float("nan"))
        ops.wkv_pre_(rkv, lora, vec, v_first, layer0, pre, H)
        ops.wkv_post_(y, rkv[0], pre[1], pre[2], lora[3], vec, out, H)
        results.append((pre, v_first, out))
    for got, want in zip(*results):
        assert rel(got, want) <= 1e-6


@built
def test_wkv_pre_keeps_nans_where_the_reference_has_them():
    """A NaN in an input reaches the same outputs as in the reference (the vectorised sigmoid keeps it)."""
    M, H, N = 3, 2, 32
    C = H * N
    g = torch.Generator().manual_seed(14)
    rkv, lora, vec = rnd(g, 3, M, C), rnd(g, 4, M, C), layer_vectors(g, C)
    lora[2, 1, 5] = float("nan")  # the in-context rate's low-rank input, row 1, channel 5 (head 0)
    lora[0, 2, 40] = float("nan")  # the value residual's, row 2, channel 40 (head 1)
    got = []
    for ops in (cpu_step, reference):
        v_first, pre = rnd(torch.Generator().manual_seed(15), M, C), torch.zeros(5, M, C)
        ops.wkv_pre_(rkv, lora, vec, v_first, False, pre, H)
        got.append(pre)
    assert torch.isnan(got[1]).any()
    assert torch.equal(torch.isnan(got[0]), torch.isnan(got[1]))


@built
def test_relu2_and_lora_act_equal_reference():
    g = torch.Generator().manual_seed(13)
    h, f = rnd(g, 4, 3, 32, scale=3.0), rnd(g, 3, 200, scale=3.0)
    got_h, got_f = h.clone(), f.clone()
    cpu_step.lora_act_(got_h)
    cpu_step.relu2_(got_f)
    reference.lora_act_(h)
    reference.relu2_(f)
    assert rel(got_h, h) <= 1e-6 and rel(got_f, f) <= 1e-6


def test_the_cpu_kernels_switched_off_leave_the_reference_ops_and_the_chunked_wkv_without_a_warning(monkeypatch):
    from vision_rwkv.ops.wkv7 import cpu_unavailable_reason

    monkeypatch.setenv("VISION_RWKV_CPU_KERNELS", "0")
    monkeypatch.setattr(step_ops_pkg, "_warned", set())
    lm = lm_on("cpu")
    x = torch.randn(1, 3, 2, 16)
    with _no_warning(), torch.no_grad():
        assert step_ops("cpu", 16, 64) is reference and StepEngine(lm).ops is reference
        assert cpu_unavailable_reason(x, x, x, x, x, x) == "switched off (VISION_RWKV_CPU_KERNELS=0)"


@built
@pytest.mark.slow
@torch.no_grad()
def test_greedy_decoding_of_a_random_l12_model_through_the_cpu_engine_gives_lm_steps_tokens(monkeypatch):
    """Issue 18's check at full size: a randomised L12-D768 V65536 decoder, 8 prompts and then 1, 32 greedy
    tokens each, prefill and steps through the engine (the kernels' fused path) against lm's plain
    operations (VISION_RWKV_FUSED_STEP=0)."""
    from conftest import randomize_

    from vision_rwkv import RWKV7, RWKV7Config
    from vision_rwkv.lm.graphs import prefill_runner, rnn_stepper

    lm = randomize_(RWKV7(RWKV7Config(vocab_size=65536, n_layer=12, n_embd=768), init=False).eval(), seed=1)
    prompts = torch.randint(0, 65536, (8, 6), generator=torch.Generator().manual_seed(0))

    def greedy(rows, fused):
        monkeypatch.setenv("VISION_RWKV_FUSED_STEP", "1" if fused else "0")
        logits, state = prefill_runner(lm)(lm.emb(rows))
        step, tokens = rnn_stepper(lm), []
        for _ in range(32):
            tokens.append(logits.argmax(-1))
            logits, state = step(tokens[-1], state)
        return torch.stack(tokens, 1)

    for rows in (prompts, prompts[:1]):
        assert torch.equal(greedy(rows, True), greedy(rows, False))


@built
def test_a_segment_table_that_names_a_missing_mix_row_is_one_clear_line():
    C = 32
    x, w = torch.randn(1, C), torch.randn(16, C)
    ones, zeros = torch.ones(C), torch.zeros(C)
    bad = torch.tensor([2], dtype=torch.int32)  # mix row 2 of a one-row mix table
    with pytest.raises(RuntimeError, match="segment 0 is 2, expected a mix row below 1"):
        cpu_step.ln_mix_matmul_(x, None, torch.empty(1, C), torch.empty(1, C), ones, zeros, torch.zeros(1, C),
                                torch.rand(1, C), w, bad, torch.empty(1, 16), 16)
