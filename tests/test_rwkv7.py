"""The decoder: GPT mode = RNN mode, chunked prefill = one pass, inputs_embeds, dtypes, bad input."""

import pytest
import torch
from conftest import randomize_, tiny_config

from vision_rwkv import RWKV7, RWKVState, VisionRWKVError


@torch.no_grad()
def rnn_logits(model, tokens, state=None):
    outs = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        outs.append(logits)
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("wkv_impl", ["chunked", "reference"])
def test_gpt_mode_equals_rnn_mode(wkv_impl):
    model = randomize_(RWKV7(tiny_config(wkv_impl=wkv_impl)).eval(), seed=1)
    tokens = torch.randint(0, 97, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gpt, gpt_state = model(tokens)
    rnn, rnn_state = rnn_logits(model, tokens)
    assert gpt.shape == (3, 64, 97)
    assert gpt.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert (gpt - rnn).abs().max() <= 1e-5
    for name in ("att_shift", "wkv", "ffn_shift"):  # states reach |5|: compare relative to size
        torch.testing.assert_close(getattr(gpt_state, name), getattr(rnn_state, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 17, 32, 63])
def test_chunked_prefill_equals_one_pass(tiny_model, k):
    tokens = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        full, full_state = tiny_model(tokens)
        first, state = tiny_model(tokens[:, :k])
        rest, state = tiny_model(tokens[:, k:], state=state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.wkv, full_state.wkv, rtol=1e-5, atol=1e-5)


def test_gpt_prefix_then_rnn_continuation(tiny_model):
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = tiny_model(tokens)
        _, state = tiny_model(tokens[:, :20])
        cont, _ = rnn_logits(tiny_model, tokens[:, 20:], state)
    torch.testing.assert_close(cont, full[:, 20:], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_equal_token_ids(tiny_model):
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        by_ids, s1 = tiny_model(tokens)
        by_embeds, s2 = tiny_model(inputs_embeds=tiny_model.emb(tokens))
        last, _ = tiny_model(tokens, last_only=True)
    torch.testing.assert_close(by_embeds, by_ids)
    torch.testing.assert_close(s2.wkv, s1.wkv)
    torch.testing.assert_close(last, by_ids[:, -1])


def test_batched_equals_one_by_one(tiny_model):
    tokens = torch.randint(0, 97, (3, 25))
    with torch.no_grad():
        batched, state = tiny_model(tokens)
        for i in range(3):
            single, s = tiny_model(tokens[i : i + 1])
            torch.testing.assert_close(single, batched[i : i + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s.wkv, state[i].wkv, rtol=1e-5, atol=1e-5)


def test_a_one_row_step_on_the_cpu_equals_gpt_mode_and_follows_weight_changes(tiny_model):
    """Batch 1 on the CPU reads a transposed copy of the head (RWKV7._logits_one_row): the same logits as GPT
    mode, and a changed head weight is seen at the next step."""
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        gpt, _ = tiny_model(tokens)
        rnn, _ = rnn_logits(tiny_model, tokens)
        assert (gpt - rnn).abs().max() <= 1e-5
        _, state = tiny_model(tokens[:, :10])
        before, _ = tiny_model.step(tokens[:, 10], state)
        tiny_model.head.weight.mul_(2)
        try:
            after, _ = tiny_model.step(tokens[:, 10], state)
        finally:
            tiny_model.head.weight.div_(2)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


def test_state_is_fp32_for_bf16_weights():
    model = randomize_(RWKV7(tiny_config())).to(torch.bfloat16).eval()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        logits, state = model(tokens)
        step_logits, state2 = model.step(tokens[:, 0], state)
    assert logits.dtype == torch.bfloat16
    for s in (state, state2):
        assert s.att_shift.dtype == s.wkv.dtype == s.ffn_shift.dtype == torch.float32
    assert torch.isfinite(step_logits).all()


def test_state_rows_can_be_selected_and_joined(tiny_model):
    tokens = torch.randint(0, 97, (3, 8))
    with torch.no_grad():
        _, state = tiny_model(tokens)
    picked = state[[2, 0]]
    assert picked.batch_size == 2
    torch.testing.assert_close(picked.wkv[:, 0], state.wkv[:, 2])
    joined = RWKVState.cat([state[0], state[1:]])
    torch.testing.assert_close(joined.ffn_shift, state.ffn_shift)


def test_state_rows_can_be_reordered_in_place(tiny_model):
    with torch.no_grad():
        _, state = tiny_model(torch.randint(0, 97, (5, 4)))
    rows = torch.tensor([4, 4, 0, 2, 1])
    expected = state[rows]
    scratch = state.clone()
    pointers = [t.data_ptr() for t in (state.att_shift, state.wkv, state.ffn_shift)]
    state.reorder_(rows, scratch)
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert torch.equal(getattr(state, name), getattr(expected, name))
    assert pointers == [t.data_ptr() for t in (state.att_shift, state.wkv, state.ffn_shift)]


def test_gradients_flow_through_gpt_mode_and_the_initial_state(tiny_model):
    tokens = torch.randint(0, 97, (2, 40))
    state = tiny_model.init_state(2)
    state.wkv.requires_grad_(True)
    logits, _ = tiny_model(tokens, state)
    logits.float().pow(2).mean().backward()
    assert state.wkv.grad is not None and state.wkv.grad.abs().sum() > 0
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # layer 0 makes v_first instead
    for name, p in tiny_model.named_parameters():
        assert (p.grad is None) == (name in unused), name


def test_activation_checkpointing_gives_the_same_loss_state_and_gradients(tiny_model):
    """Blocks recomputed in the backward pass: the same loss, final state and every gradient (the
    initial state's too) as with stored activations, and fewer tensors saved for the backward pass."""
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    runs = {}
    for recompute in (False, True):
        tiny_model.zero_grad(set_to_none=True)
        tiny_model.activation_checkpointing = recompute
        state = tiny_model.init_state(2)
        state.wkv.requires_grad_(True)
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, final = tiny_model(tokens, state)
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        runs[recompute] = logits.detach(), final.wkv.detach(), state.wkv.grad.clone(), grads, sum(saved)
    tiny_model.activation_checkpointing = False
    (l0, s0, g0, p0, n0), (l1, s1, g1, p1, n1) = runs[False], runs[True]
    assert torch.equal(l0, l1) and torch.equal(s0, s1)
    assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.allclose(p0[name], p1[name], rtol=1e-5, atol=1e-7), name
    assert n1 < n0 / 2, (n1, n0)


# ---- bad input: one clear line each -------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary(tiny_model):
    with pytest.raises(VisionRWKVError, match=r"token id 97 is outside .* \[0, 97\)"):
        tiny_model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(VisionRWKVError, match="token id -1"):
        tiny_model.step(torch.tensor([-1]), None)


def test_wrong_token_types_and_shapes(tiny_model):
    with pytest.raises(VisionRWKVError, match="integer"):
        tiny_model(torch.rand(1, 4))
    with pytest.raises(VisionRWKVError, match=r"shape \(B, T\)"):
        tiny_model(torch.tensor([1, 2, 3]))
    with pytest.raises(VisionRWKVError, match="one token per row"):
        tiny_model.step(torch.tensor([[1, 2]]), None)
    with pytest.raises(VisionRWKVError, match="exactly one"):
        tiny_model()
    with pytest.raises(VisionRWKVError, match="inputs_embeds must have shape"):
        tiny_model(inputs_embeds=torch.zeros(1, 3, 65))


def test_state_from_another_model_shape(tiny_model):
    other = RWKV7(tiny_config(n_embd=32, head_size=16)).eval()
    _, state = other(torch.tensor([[1, 2]]))
    with pytest.raises(VisionRWKVError, match=r"state\.att_shift has shape .* expects"):
        tiny_model(torch.tensor([[1, 2]]), state)
    _, state = tiny_model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(VisionRWKVError, match="with batch 1"):
        tiny_model.step(torch.tensor([1]), state)
    with pytest.raises(VisionRWKVError, match="must be an RWKVState"):
        tiny_model.step(torch.tensor([1]), [torch.zeros(1)])


def test_bad_config_is_one_line():
    with pytest.raises(VisionRWKVError, match="multiple of decoder.head_size"):
        RWKV7(tiny_config(n_embd=60))


def test_unused_parameters_are_exactly_those_without_a_gradient(tiny_model):
    """DDP needs every trained parameter to get a gradient; training freezes the ones no pass reads."""
    tokens = torch.randint(0, 97, (2, 5))
    logits, _ = tiny_model(tokens)
    logits.square().mean().backward()
    no_grad = {n for n, p in tiny_model.named_parameters() if p.grad is None or not p.grad.any()}
    unused = {id(p) for p in tiny_model.unused_parameters()}
    assert no_grad == {n for n, p in tiny_model.named_parameters() if id(p) in unused}
    assert no_grad == {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


def test_a_saved_state_continues_exactly_like_the_original(tiny_model, tmp_path):
    from vision_rwkv import RWKVState, VisionRWKVError

    tokens = torch.randint(0, 97, (2, 9))
    _, state = tiny_model(tokens[:, :6])
    state.save(tmp_path / "prompt.state")
    loaded = RWKVState.load(tmp_path / "prompt.state")
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert torch.equal(getattr(loaded, name), getattr(state, name))
    a, _ = tiny_model(tokens[:, 6:], state)
    b, _ = tiny_model(tokens[:, 6:], loaded)
    assert torch.equal(a, b)
    (tmp_path / "junk.state").write_bytes(b"not a state")
    with pytest.raises(VisionRWKVError, match="cannot read the state file"):
        RWKVState.load(tmp_path / "junk.state")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VisionRWKVError, match="not an RWKV state file"):
        RWKVState.load(tmp_path / "other.safetensors")
    with pytest.raises(VisionRWKVError, match="state.wkv has shape"):  # another model's shape: one line
        tiny_model.step(tokens[:, 0], RWKVState.zeros(3, 2, 64, 32))


def test_a_compiled_training_step_equals_eager_in_loss_and_every_gradient():
    """torch.compile with the model's COMPILE_OPTIONS (lm/rwkv7.py) over the loss and its backward, on the CPU.
    (The GPU failure those options avoid needs a GPU to show; bench/train_lm.py runs that shape there.)"""
    from vision_rwkv.lm.rwkv7 import COMPILE_OPTIONS
    from vision_rwkv.ops.linear_ce import linear_cross_entropy

    torch.manual_seed(0)
    lm = randomize_(RWKV7(tiny_config()))

    def loss_fn(model, tokens):
        h, _ = model.hidden(tokens[:, :-1])
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head.weight, tokens[:, 1:].reshape(-1))

    tokens = torch.randint(0, lm.config.vocab_size, (2, 17))
    eager = loss_fn(lm, tokens)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad(set_to_none=True)
    compiled = torch.compile(loss_fn, dynamic=False, options=COMPILE_OPTIONS)(lm, tokens)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    got = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    assert got.keys() == grads.keys() and len(got) > 50
    for name, g in grads.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-5), name


class _Step(torch.nn.Module):
    """lm.step with the state as plain tensors, as torch.export takes inputs."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, tokens, att_shift, wkv, ffn_shift):
        logits, state = self.lm.step(tokens, RWKVState(att_shift, wkv, ffn_shift))
        return logits, state.att_shift, state.wkv, state.ffn_shift


@torch.no_grad()
def test_the_plain_step_exports_to_aten_ops_and_equals_the_eager_step(tiny_model):
    """The exportable path (lm.step, plain PyTorch; the fused step is switched off with
    VISION_RWKV_FUSED_STEP=0): torch.export traces it to core ATen operations only, ready for an ONNX
    exporter, and the exported program gives the eager step's logits and state, token-id check aside."""
    state = tiny_model.init_state(2)
    _, state = tiny_model(torch.tensor([[1, 2, 3], [4, 5, 6]]), state)
    args = (torch.tensor([3, 5]), state.att_shift, state.wkv, state.ffn_shift)
    program = torch.export.export(_Step(tiny_model), args)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets and all(t.startswith("aten.") for t in targets), sorted(targets)
    for got, want in zip(program.module()(*args), _Step(tiny_model)(*args)):
        assert torch.equal(got, want)
    with pytest.raises(VisionRWKVError, match="outside this model's vocabulary"):  # still checked eagerly
        _Step(tiny_model)(torch.tensor([3, 10_000]), *args[1:])
