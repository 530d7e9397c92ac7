"""The CUDA WKV-4 kernel against the float64 reference: y, the final state and every gradient.

The reference is the per-step recurrence (reference.py, itself equal to the unscaled recurrence to 1e-12,
see test_wkv4.py) in float64, fed the same (rounded) inputs, differentiated by autograd. Upstream
gradients are random on y and on all three final-state outputs (num, den, max), so the gradient of the
running maximum (the argmax chain in kernels/README.md) is exercised too. Errors are relative over the
whole tensor.

Tolerances, from the arithmetic:
- fp32: the kernel computes in fp32 with ex2.approx exponentials (relative error ~2 ulp for the
  exponents that matter, all <= 0) and fast divisions (2 ulp). y and the state carry a few ulp per step
  of a contracting recurrence (every decay e^w < 1), which does not grow with T: bound 1e-5 (~100 ulp).
  The gradients are sums of such terms (dw and du over B*T steps, whose signs cancel part of the norm):
  bound 1e-4.
- bf16: inputs are bf16 and y, dk, dv are rounded to bf16 (relative step 2^-8), and the upstream
  gradient of y reaches the kernel rounded to bf16 too: bound 1e-2 on y and every gradient. The
  fp32 state sees only fp32 arithmetic on exactly the same inputs as the reference: bound 1e-4.
"""

import pytest
import torch

from vision_rwkv.ops.wkv4 import wkv4, wkv4_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]

TOL = {torch.float32: (1e-5, 1e-4, 1e-5), torch.bfloat16: (1e-2, 1e-2, 1e-4)}  # (y, grads, state)
NAMES = ["w", "u", "k", "v", "num0", "den0", "max0"]


def make(B, T, C, dtype, seed, with_state):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    w = -torch.exp(rnd(C))  # decays e^w spread over (0.95, 1) .. (0, 0.05)
    u, k, v = rnd(C), 2 * rnd(B, T, C), rnd(B, T, C)  # keys spread enough that they win the max at times
    state = None
    if with_state:  # a plausible state: den > 0, num/den a weighted mean of values
        den = torch.rand(B, C, device="cuda", generator=g) + 0.5
        state = (rnd(B, C) * den, den, rnd(B, C))
    return [w, u, k.to(dtype), v.to(dtype)], state


def rel(x, ref):
    """Relative error over the whole tensor, with a floor of one unit per element on the denominator
    (a gradient can be all but zero, e.g. dw at T=1 from a fresh state)."""
    floor = x.numel() ** 0.5
    return ((x.double() - ref).norm() / max(ref.norm().item(), floor)).item()


def run(fn, xs, state, dy, ds):
    """Outputs and the gradients of sum(y dy) + sum(sT ds) (ds entries may be None: that output unused)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    s = None if state is None else [x.detach().clone().requires_grad_() for x in state]
    y, sT = fn(*leaves, s)
    loss = 0
    if dy is not None:
        loss = loss + (y.double() * dy).sum()
    for out, g in zip(sT, ds):
        if g is not None:
            loss = loss + (out.double() * g).sum()
    loss.backward()
    grads = [x.grad for x in leaves] + ([x.grad for x in s] if s is not None else [])
    return y.detach(), [x.detach() for x in sT], grads


def reference(w, u, k, v, s):
    state = None if s is None else [x.double() for x in s]
    return wkv4_reference(w.double(), u.double(), k.double(), v.double(), state)


def upstream(B, T, C, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dy = torch.randn(B, T, C, device="cuda", generator=g, dtype=torch.float64)
    return dy, [torch.randn(B, C, device="cuda", generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 2, 17, 256, 1500])
@pytest.mark.parametrize("C", [96, 100])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_kernel_matches_reference(dtype, T, C, with_state):
    B = 3
    xs, s0 = make(B, T, C, dtype, seed=T * 7 + C, with_state=with_state)
    dy, ds = upstream(B, T, C, seed=T + 1)
    ref = run(reference, xs, s0, dy, ds)
    out = run(lambda *a: wkv4(*a[:4], a[4], impl="cuda"), xs, s0, dy, ds)
    tol_y, tol_g, tol_s = TOL[dtype]
    assert out[0].dtype == dtype and all(x.dtype == torch.float32 for x in out[1])
    assert rel(out[0], ref[0]) < tol_y, f"y: {rel(out[0], ref[0]):.2e}"
    for name, s_out, s_ref in zip(["num", "den", "max"], out[1], ref[1]):
        assert rel(s_out, s_ref) < tol_s, f"{name}T: {rel(s_out, s_ref):.2e}"
    assert len(out[2]) == (7 if with_state else 4)
    for name, g_out, g_ref in zip(NAMES, out[2], ref[2]):
        assert g_out is not None and torch.isfinite(g_out).all(), name
        expected = dtype if name in ("k", "v") else torch.float32
        assert g_out.dtype == expected, name
        assert rel(g_out, g_ref) < tol_g, f"d{name}: {rel(g_out, g_ref):.2e}"


@pytest.mark.parametrize("which", ["y", "state"])
def test_gradients_of_one_output_alone(which):
    """Only y's gradient (the final state unused: GPT-mode training) or only the state's (y unused): the
    absent gradients reach the kernel as None, not as zero tensors, and change nothing."""
    B, T, C = 3, 70, 100
    xs, s0 = make(B, T, C, torch.float32, seed=3, with_state=True)
    dy, ds = upstream(B, T, C, seed=4)
    if which == "y":
        ds = [None, None, None]
    else:
        dy, ds = None, [ds[0], None, ds[2]]
    ref = run(reference, xs, s0, dy, ds)
    out = run(lambda *a: wkv4(*a[:4], a[4], impl="cuda"), xs, s0, dy, ds)
    for name, g_out, g_ref in zip(NAMES, out[2], ref[2]):
        if g_ref is None:  # y unused: u and den0 reach no used output; autograd gives None, the kernel zeros
            assert which == "state" and not g_out.any(), name
            continue
        assert rel(g_out, g_ref) < 1e-4, f"d{name}: {rel(g_out, g_ref):.2e}"


def test_chunks_with_the_state_carried_equal_one_pass():
    xs, _ = make(2, 300, 64, torch.float32, seed=5, with_state=False)
    w, u, k, v = xs
    y, s = wkv4(w, u, k, v, impl="cuda")
    y1, s1 = wkv4(w, u, k[:, :123], v[:, :123], impl="cuda")
    y2, s2 = wkv4(w, u, k[:, 123:], v[:, 123:], s1, impl="cuda")
    assert rel(torch.cat([y1, y2], 1), y.double()) < 1e-6
    for a, b in zip(s2, s):
        assert rel(a, b.double()) < 1e-6


def test_fp16_inputs():
    xs, s0 = make(2, 100, 96, torch.float16, seed=6, with_state=True)
    dy, ds = upstream(2, 100, 96, seed=7)
    ref = run(reference, xs, s0, dy, ds)
    out = run(lambda *a: wkv4(*a[:4], a[4], impl="cuda"), xs, s0, dy, ds)
    assert out[0].dtype == torch.float16 and rel(out[0], ref[0]) < 5e-3  # fp16 keeps 3 more bits than bf16
    for name, g_out, g_ref in zip(NAMES, out[2], ref[2]):
        assert rel(g_out, g_ref) < 5e-3, f"d{name}: {rel(g_out, g_ref):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_compile_traces_through_the_kernel(dtype):
    """The ops have fake (shape-only) versions, so torch.compile builds one graph around them (fullgraph):
    the compiled function gives the eager outputs and gradients, up to the compiler's own rounding of the
    ops around the kernel."""
    B, T, C = 2, 40, 96
    xs, s0 = make(B, T, C, dtype, seed=8, with_state=True)
    dy, ds = upstream(B, T, C, seed=9)

    def fn(w, u, k, v, s):
        y, (num, den, mx) = wkv4(w, u, k, v, s, impl="cuda")
        return torch.tanh(y) * 2, (num * 1.0, den, mx)  # something around the op for the compiler to fuse

    eager = run(fn, xs, s0, dy, ds)
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, fullgraph=True), xs, s0, dy, ds)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for e, c in zip([eager[0], *eager[1], *eager[2]], [compiled[0], *compiled[1], *compiled[2]]):
        assert rel(c, e.double()) <= bound
