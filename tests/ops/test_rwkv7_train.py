"""The GPT-mode training ops (vision_rwkv.ops.rwkv7.train: ln_mix_seq, wkv_pre, wkv_post) and the model's use.

Without a GPU the kernels run in Triton's interpreter, as in test_rwkv7_step.py. The op against its PyTorch
reference in outputs and every gradient; the model's training step with the ops against the same step with
plain operations (VISION_RWKV_FUSED_TRAIN=0), in the loss, every parameter's gradient and the initial
state's. Bounds: fp32 to rounding noise (both compute the LayerNorm in fp32, in different orders of
summation); the bf16 outputs to one bf16 rounding.
"""

import pytest
import torch
from test_rwkv7_step import DEVICE, KERNELS_UNAVAILABLE, interpreter, kernels_run, lm_on, rel, triton_ops

from vision_rwkv.ops.rwkv7 import train


@kernels_run
@pytest.mark.parametrize("T,G,with_dlast", [(1, 6, True), (7, 6, True), (7, 1, False), (33, 6, False)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_ln_mix_seq_equals_reference_in_outputs_and_every_gradient(T, G, with_dlast, out_dtype):
    triton_ops()  # the kernels' module, imported under the interpreter on the CPU
    g = torch.Generator().manual_seed(T + G)
    B, C = 3, 64
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(DEVICE)  # noqa: E731
    inputs = [3 * rnd(B, T, C), rnd(B, C), 1 + rnd(C, scale=0.2), rnd(C, scale=0.2), torch.rand(G, C, generator=g)]
    dout, dlast = rnd(G, B, T, C), rnd(B, C)
    results = []
    for fn in (train.ln_mix_seq, train.reference):
        leaves = [t.to(DEVICE).clone().requires_grad_() for t in inputs]
        with interpreter():
            out, last = fn(*leaves, out_dtype)
            loss = (out.float() * dout).sum() + ((last * dlast).sum() if with_dlast else 0)
            loss.backward()
        results.append([out.float(), last] + [t.grad for t in leaves])
    names = ["out", "last", "dx", "dshift", "dweight", "dbias", "dmix"]
    for name, got, want in zip(names, *results):
        bound = 8e-3 if name == "out" and out_dtype == torch.bfloat16 else 1e-5
        assert got.shape == want.shape and rel(got, want) <= bound, (name, rel(got, want))


@kernels_run
@pytest.mark.parametrize("autocast", [False, True])
def test_a_training_step_with_the_fused_op_equals_plain_operations(autocast, monkeypatch):
    """The loss reads the logits and the final state (so the shifts' gradients flow back), from a random
    initial state that takes a gradient too."""
    triton_ops()
    if autocast and DEVICE == "cpu":
        pytest.skip("bf16 autocast is the CUDA training setting")
    monkeypatch.setattr(train, "FUSED_TRAIN_MIN_ROWS", 1)  # this test's 18 positions take the kernels too
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("VISION_RWKV_FUSED_TRAIN", fused)
        lm = lm_on(DEVICE, seed=11).train()
        g = torch.Generator().manual_seed(12)
        tokens = torch.randint(0, 97, (2, 9), generator=g).to(DEVICE)
        state = lm.init_state(2)
        for t in (state.att_shift, state.wkv, state.ffn_shift):
            t.copy_(torch.randn(t.shape, generator=g))
            t.requires_grad_()
        with interpreter(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            logits, new = lm(tokens, state)
            loss = logits.float().square().mean() + new.att_shift.square().sum() + new.ffn_shift.sum()
            loss.backward()
        grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
        grads |= {f"state.{n}": getattr(state, n).grad for n in ("att_shift", "wkv", "ffn_shift")}
        results.append((loss.detach(), grads))
    (loss, grads), (want_loss, want) = results
    bound = 2e-2 if autocast else 1e-5
    assert rel(loss, want_loss) <= bound
    assert grads.keys() == want.keys()
    for name in want:
        assert rel(grads[name], want[name]) <= (5e-2 if autocast else 1e-4), (name, rel(grads[name], want[name]))


def test_the_model_uses_the_plain_operations_where_the_kernels_cannot_run_or_do_not_pay(monkeypatch):
    x = torch.zeros(1, train.FUSED_TRAIN_MIN_ROWS, 64)
    assert not train.fused_train_enabled(x, 16)  # the CPU without the interpreter
    if KERNELS_UNAVAILABLE is None:
        with interpreter():
            triton_ops()
            assert train.fused_train_enabled(x, 16) == (DEVICE == "cpu")  # the kernels run, interpreted
            assert not train.fused_train_enabled(x[:, 1:], 16)  # too few positions
    if DEVICE == "cuda":
        assert train.fused_train_enabled(x.cuda(), 16)
        monkeypatch.setenv("VISION_RWKV_FUSED_TRAIN", "0")
        assert not train.fused_train_enabled(x.cuda(), 16)


@kernels_run
@pytest.mark.parametrize("layer0", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv_pre_and_post_equal_their_references_in_outputs_and_every_gradient(layer0, dtype):
    """The arithmetic around the WKV kernel, forward and backward: inputs in the products' dtype, fp32
    vectors; in bf16 the outputs and gradients to a few bf16 roundings."""
    triton_ops()
    g = torch.Generator().manual_seed(21 + layer0)
    M, C, H = 37, 64, 4
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(DEVICE)  # noqa: E731
    pre_in = [rnd(M, C).to(dtype) for _ in range(5)] + [rnd(5, C), None if layer0 else rnd(M, C).to(dtype)]
    post_in = [rnd(M, C).to(dtype) for _ in range(5)] + [torch.cat([rnd(1, C, scale=0.3), 1 + rnd(1, C, scale=0.2),
                                                                    rnd(1, C, scale=0.2)])]
    if layer0:
        pre_in[2] = None  # layer 0 has no value-residual input
    d_pre, d_post = [rnd(M, C) for _ in range(5)], rnd(M, C)
    results = []
    for pre, post in ((train.wkv_pre, train.wkv_post), (train.pre_reference, train.post_reference)):
        a = [None if t is None else t.clone().requires_grad_() for t in pre_in]
        b = [t.clone().requires_grad_() for t in post_in]
        with interpreter():
            outs = pre(*a, H, dtype)
            out = post(*b, H, dtype)
            loss = sum((o.float() * d).sum() for o, d in zip(outs, d_pre)) + (out.float() * d_post).sum()
            loss.backward()
        results.append([o.float() for o in outs] + [out.float()] + [t.grad for t in a + b if t is not None])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for i, (got, want) in enumerate(zip(*results)):
        assert got.shape == want.shape and rel(got, want) <= tol, (i, rel(got, want))
