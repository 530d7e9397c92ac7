"""The chunked head + cross-entropy op against the unfused formula: the loss and both gradients."""

import pytest
import torch

from vision_rwkv.ops.linear_ce import linear_cross_entropy, reference


def inputs(n=37, c=24, v=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, c, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(v, c, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


def grads(fn, h, w, t, scale=1.0):
    h.grad = w.grad = None
    loss = fn(h, w, t)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
def test_the_loss_and_gradients_are_the_unfused_formulas(chunk):
    h, w, t = inputs()
    expected = grads(reference, h, w, t, scale=0.7)
    got = grads(lambda *a: linear_cross_entropy(*a, chunk=chunk), h, w, t, scale=0.7)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-10, atol=1e-10)


def test_fp32_is_within_its_own_noise():
    """fp32: the bound is the reference against itself in fp64, times 4 (a different summation order)."""
    h, w, t = inputs(n=300, c=64, v=2000)
    exact = grads(reference, h, w, t)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref32 = grads(reference, h32, w32, t)
    ours = grads(lambda *a: linear_cross_entropy(*a, chunk=64), h32, w32, t)
    for e, r, o in zip(exact, ref32, ours):
        noise = (r.double() - e).abs().max().item()
        assert (o.double() - e).abs().max().item() <= 4 * noise + 1e-6


def test_under_bf16_autocast_it_is_as_close_to_the_truth_as_the_autocast_formula():
    """bf16 products: both round, differently (per chunk here, once there), so both are held against the fp64
    truth; ours must be no farther from it than the unfused formula under autocast, within 2x."""
    h, w, t = inputs(n=64, c=32, v=300, dtype=torch.float32)
    truth = grads(reference, h.detach().double().requires_grad_(), w.detach().double().requires_grad_(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = grads(reference, h, w, t)
        ours = grads(lambda *a: linear_cross_entropy(*a, chunk=16), h, w, t)
    for x, u, o in zip(truth, unfused, ours):
        err_unfused = (u.double() - x).abs().max().item()
        err_ours = (o.double() - x).abs().max().item()
        assert err_ours <= 2 * err_unfused + 1e-6, (err_ours, err_unfused)


def test_only_the_gradients_asked_for_are_computed():
    h, w, t = inputs()
    w.requires_grad_(False)
    linear_cross_entropy(h, w, t, chunk=8).backward()
    assert h.grad is not None and w.grad is None


def test_no_rows_and_bad_shapes():
    h, w, t = inputs(n=0)
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == h.shape
    with pytest.raises(ValueError, match="expected \\(N, C\\), \\(V, C\\), \\(N,\\)"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
