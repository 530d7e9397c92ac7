"""The CUDA WKV-7 kernel against the PyTorch reference: outputs, final states and every gradient.

The reference is the chunked PyTorch path in float64 (itself equal to the per-step recurrence to 1e-10,
see test_wkv7.py), fed the same (rounded) inputs as the kernel. Errors are relative: |x - ref| / |ref|
over the whole tensor.

impl="cuda" picks the kernel as the model does: the row kernels (layouts 0-2) for fp32 inputs, the
tensor-core kernel (layout 3) for bf16 and fp16 at head size 64; the layout-3 tests below also run it
on fp32 inputs, with their own bound (TC_TOL).

Tolerances, from the arithmetic:
- fp32 (row kernels): the kernel computes in fp32; y and the state carry the rounding of a contracting recurrence
  (~1e-7 per step, not growing with T because every decay is < 1): bound 1e-5. The backward also
  recovers S_{t-1} from S_t by dividing by the decay (>= 0.545) for up to 16 steps between
  checkpoints, which can amplify rounding by up to 1/0.545^16 ~ 1.6e4 in the worst case but by
  ~1/0.74^16 ~ 1.2e2 for these inputs (decays spread over (0.545, 1)): bound 1e-4 on gradients.
- bf16: inputs are bf16 and every output is rounded to bf16 (relative step 2^-8 = 3.9e-3), so each
  element is off by up to 2e-3 from rounding alone: bound 1e-2 on outputs and gradients; the fp32
  state (no output rounding) must stay within the fp32 bound times the bf16 input error, 1e-2. The
  tensor-core kernel's tf32 products (relative error < 2^-10 per term) sit below that bound.
"""

import pytest
import torch

from vision_rwkv.ops.wkv7 import wkv7, wkv7_chunked

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]

TOL = {torch.float32: (1e-5, 1e-4, 1e-5), torch.bfloat16: (1e-2, 1e-2, 1e-2)}  # (y, grads, state)


def make(B, T, H, N, dtype, seed, with_state):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, device="cuda", generator=g)  # noqa: E731
    r, w, k, v = rnd(), 2 * rnd(), 0.5 * rnd(), rnd()
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    a = torch.rand(B, T, H, N, device="cuda", generator=g)
    s0 = torch.randn(B, H, N, N, device="cuda", generator=g) if with_state else None
    return [x.to(dtype) for x in (r, w, k, v, -kk, kk * a)], s0


def rel(x, ref):
    """Relative error over the whole tensor, with a floor of one unit per element on the denominator:
    some gradients are exactly zero (dw, da at T=1 from a zero state), where only an absolute bound means
    anything; every other quantity here has elements of order one."""
    floor = x.numel() ** 0.5
    return ((x.double() - ref).norm() / max(ref.norm().item(), floor)).item()


def run(fn, xs, s0, dy, dsT):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    s = None if s0 is None else s0.detach().clone().requires_grad_()
    y, sT = fn(*leaves, s)
    ((y.double() * dy).sum() + (sT.double() * dsT).sum()).backward()
    grads = [x.grad for x in leaves] + ([s.grad] if s is not None else [])
    return y.detach(), sT.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 64, 1000, 4096])
@pytest.mark.parametrize("BH", [(1, 1), (2, 3), (3, 8)], ids=lambda bh: f"B{bh[0]}H{bh[1]}")
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
def test_kernel_matches_reference(dtype, T, BH, with_state):
    B, H = BH
    N = 64
    xs, s0 = make(B, T, H, N, dtype, seed=T * 7 + B + H, with_state=with_state)
    g = torch.Generator(device="cuda").manual_seed(1)
    dy = torch.randn(B, T, H, N, device="cuda", generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, N, N, device="cuda", generator=g, dtype=torch.float64)
    ref = run(lambda *a: wkv7_chunked(*(x.double() for x in a[:6]), None if a[6] is None else a[6].double()),
              xs, s0, dy, dsT)
    out = run(lambda *a: wkv7(*a[:6], state=a[6], impl="cuda"), xs, s0, dy, dsT)
    tol_y, tol_g, tol_s = TOL[dtype]
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert rel(out[0], ref[0]) < tol_y, f"y: {rel(out[0], ref[0]):.2e}"
    assert rel(out[1], ref[1]) < tol_s, f"state: {rel(out[1], ref[1]):.2e}"
    names = ["r", "w", "k", "v", "a", "b", "s0"]
    for name, g_out, g_ref in zip(names, out[2], ref[2]):
        assert g_out is not None and torch.isfinite(g_out).all(), name
        assert g_out.dtype == (torch.float32 if name == "s0" else dtype)
        assert rel(g_out, g_ref) < tol_g, f"d{name}: {rel(g_out, g_ref):.2e}"


@pytest.mark.parametrize("layout", [0, 1, 2])
def test_strongest_decay_bounds_the_state_reconstruction(layout):
    """Every decay at its floor exp(-exp(-0.5)) = 0.545: the backward's division by the decay amplifies
    fp32 rounding (2^-24 = 6e-8) by up to 1/0.545^15 = 9e3 within a 16-step checkpoint interval, i.e.
    ~5e-4 on the recovered state. That is the worst case the soft clamp allows (the official kernel
    recovers states the same way); gradients that read recovered states (dr, dw, da) get a 5e-3 bound; y, the
    final state and the gradients that never read a recovered state (k, v, b, s0) keep the fp32 bounds.
    Measured on an H100 (2026-11-24): dr 1.4e-4, the others of k, v at 1e-7."""
    from vision_rwkv.ops.wkv7.cuda import wkv7_cuda

    xs, s0 = make(2, 200, 3, 64, torch.float32, seed=11, with_state=True)
    xs[1] = torch.full_like(xs[1], 30.0)  # sigmoid(30) = 1: decay at its floor everywhere
    g = torch.Generator(device="cuda").manual_seed(3)
    dy = torch.randn(2, 200, 3, 64, device="cuda", generator=g, dtype=torch.float64)
    dsT = torch.randn(2, 3, 64, 64, device="cuda", generator=g, dtype=torch.float64)
    ref = run(lambda *a: wkv7_chunked(*(x.double() for x in a[:6]), a[6].double()), xs, s0, dy, dsT)
    out = run(lambda *a: wkv7_cuda(*a[:6], a[6], layout=layout), xs, s0, dy, dsT)
    assert rel(out[0], ref[0]) < 1e-5 and rel(out[1], ref[1]) < 1e-5
    errors = {n: rel(o, r) for n, o, r in zip(["r", "w", "k", "v", "a", "b", "s0"], out[2], ref[2])}
    assert all(errors[n] < 5e-3 for n in errors), errors
    assert all(errors[n] < 1e-4 for n in ["k", "v", "b", "s0"]), errors


@pytest.mark.parametrize("N,layout", [(16, 0), (32, 0), (64, 0), (64, 1), (64, 2)])
def test_head_sizes_and_thread_layouts(N, layout):
    from vision_rwkv.ops.wkv7.cuda import wkv7_cuda

    xs, s0 = make(2, 77, 3, N, torch.float32, seed=N, with_state=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    dy = torch.randn(2, 77, 3, N, device="cuda", generator=g, dtype=torch.float64)
    dsT = torch.randn(2, 3, N, N, device="cuda", generator=g, dtype=torch.float64)
    ref = run(lambda *a: wkv7_chunked(*(x.double() for x in a[:6]), a[6].double()), xs, s0, dy, dsT)
    out = run(lambda *a: wkv7_cuda(*a[:6], a[6], layout=layout), xs, s0, dy, dsT)
    assert rel(out[0], ref[0]) < 1e-5 and rel(out[1], ref[1]) < 1e-5
    for g_out, g_ref in zip(out[2], ref[2]):
        assert rel(g_out, g_ref) < 1e-4


def test_fp16_inputs():
    xs, s0 = make(2, 100, 2, 64, torch.float16, seed=5, with_state=False)
    y_ref, s_ref = wkv7_chunked(*(x.double() for x in xs))
    y, s = wkv7(*xs, impl="cuda")
    assert y.dtype == torch.float16 and rel(y, y_ref) < 1e-2 and rel(s, s_ref) < 1e-3


def test_long_sequence_16k_forward_and_backward():
    xs, _ = make(1, 16384, 2, 64, torch.bfloat16, seed=3, with_state=False)
    leaves = [x.requires_grad_() for x in xs]
    y, s = wkv7(*leaves, impl="cuda")
    y.float().sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(x.grad).all() for x in leaves)
    # memory stays linear in T: checkpoints every 16 steps, no per-thread arrays of length T
    y_ref, s_ref = wkv7_chunked(*(x.detach().double() for x in xs))
    assert rel(y.detach(), y_ref) < 1e-2 and rel(s, s_ref) < 1e-2


def test_auto_dispatch_uses_the_kernel_and_the_model_matches_on_cuda():
    from conftest import randomize_, tiny_config

    from vision_rwkv import RWKV7

    cpu = randomize_(RWKV7(tiny_config(head_size=16)).eval(), seed=2)
    gpu = randomize_(RWKV7(tiny_config(head_size=16)).eval(), seed=2).cuda()
    tokens = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        ref, s_ref = cpu(tokens)
        out, s = gpu(tokens.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.wkv.cpu(), s_ref.wkv, rtol=1e-4, atol=1e-4)


# The tensor-core kernel (layout 3) rounds the operands of its matrix products to tf32 (10-bit mantissa,
# relative step 2^-11 = 4.9e-4); sums and the carried state stay fp32. Each product term is off by up
# to ~1e-3 relative, and terms of mixed sign average out, so fp32 inputs get a 3e-3 bound on every
# output and gradient (two orders above tf32's step would be a bug, not rounding). bf16 inputs keep the
# bf16 bound of 1e-2 (output rounding, 2e-3, dominates).
TC_TOL = {torch.float32: 3e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 64, 1000, 4096])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
def test_tensor_core_kernel_matches_reference(dtype, T, with_state):
    from vision_rwkv.ops.wkv7.cuda import TENSOR_CORES, wkv7_cuda

    B, H, N = 2, 3, 64
    xs, s0 = make(B, T, H, N, dtype, seed=T * 5 + 1, with_state=with_state)
    g = torch.Generator(device="cuda").manual_seed(4)
    dy = torch.randn(B, T, H, N, device="cuda", generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, N, N, device="cuda", generator=g, dtype=torch.float64)
    ref = run(lambda *a: wkv7_chunked(*(x.double() for x in a[:6]), None if a[6] is None else a[6].double()),
              xs, s0, dy, dsT)
    out = run(lambda *a: wkv7_cuda(*a[:6], a[6], layout=TENSOR_CORES), xs, s0, dy, dsT)
    tol = TC_TOL[dtype]
    errors = {"y": rel(out[0], ref[0]), "state": rel(out[1], ref[1])}
    for name, g_out, g_ref in zip(["r", "w", "k", "v", "a", "b", "s0"], out[2], ref[2]):
        assert g_out is not None and torch.isfinite(g_out).all(), name
        errors["d" + name] = rel(g_out, g_ref)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert all(e < tol for e in errors.values()), {k: f"{e:.1e}" for k, e in errors.items()}


def test_tensor_core_kernel_at_the_strongest_decay_and_without_gradients():
    """Every decay at its floor (0.545): the chunk's factors e^{+-g} reach e^{+-9.7}, their widest.
    Also the forward alone (no checkpoints saved) must give the same y and state."""
    from vision_rwkv.ops.wkv7.cuda import TENSOR_CORES, wkv7_cuda

    xs, s0 = make(2, 200, 3, 64, torch.float32, seed=11, with_state=True)
    xs[1] = torch.full_like(xs[1], 30.0)
    g = torch.Generator(device="cuda").manual_seed(3)
    dy = torch.randn(2, 200, 3, 64, device="cuda", generator=g, dtype=torch.float64)
    dsT = torch.randn(2, 3, 64, 64, device="cuda", generator=g, dtype=torch.float64)
    ref = run(lambda *a: wkv7_chunked(*(x.double() for x in a[:6]), a[6].double()), xs, s0, dy, dsT)
    out = run(lambda *a: wkv7_cuda(*a[:6], a[6], layout=TENSOR_CORES), xs, s0, dy, dsT)
    errors = [rel(out[0], ref[0]), rel(out[1], ref[1])] + [rel(o, r) for o, r in zip(out[2], ref[2])]
    assert max(errors) < TC_TOL[torch.float32], errors
    with torch.no_grad():
        y, s = wkv7_cuda(*xs, s0, layout=TENSOR_CORES)
    assert torch.equal(y, out[0]) and torch.equal(s, out[1])


@pytest.mark.parametrize("T", [17, 64])
@pytest.mark.parametrize("state", ["none", "frozen", "trained"])
def test_tensor_core_kernel_when_only_y_is_used(T, state):
    """The training case: the loss sees y only, so the final state's gradient is None (the backward then
    skips its column sums), and the initial state is absent (not saved: zero), frozen (saved, no
    gradient) or trained (saved, with a gradient)."""
    from vision_rwkv.ops.wkv7.cuda import TENSOR_CORES, wkv7_cuda

    xs, s0 = make(2, T, 3, 64, torch.bfloat16, seed=T, with_state=state != "none")
    dy = torch.randn(2, T, 3, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(8),
                     dtype=torch.float64)

    def grads(fn):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        s = None if s0 is None else s0.detach().clone().requires_grad_(state == "trained")
        y, _ = fn(*leaves, s)
        (y.double() * dy).sum().backward()
        return [x.grad for x in leaves] + ([s.grad] if state == "trained" else [])

    ref = grads(lambda *a: wkv7_chunked(*(x.double() for x in a[:6]), None if a[6] is None else a[6].double()))
    out = grads(lambda *a: wkv7_cuda(*a[:6], a[6], layout=TENSOR_CORES))
    errors = {name: rel(o, r) for name, o, r in zip(["r", "w", "k", "v", "a", "b", "s0"], out, ref)}
    assert all(e < TC_TOL[torch.bfloat16] for e in errors.values()), {k: f"{e:.1e}" for k, e in errors.items()}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
def test_tensor_core_kernel_with_more_heads_than_multiprocessors(with_state):
    """B*H above the SM count selects the other launches (two blocks per SM, 128 registers, products
    paired by shared operand): they must match the reference as the one-block launches do."""
    from vision_rwkv.ops.wkv7.cuda import TENSOR_CORES, wkv7_cuda

    H = 4
    B = torch.cuda.get_device_properties(0).multi_processor_count // H + 2
    T = 40  # two whole chunks and a partial one
    xs, s0 = make(B, T, H, 64, torch.bfloat16, seed=21, with_state=with_state)
    g = torch.Generator(device="cuda").manual_seed(6)
    dy = torch.randn(B, T, H, 64, device="cuda", generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, 64, 64, device="cuda", generator=g, dtype=torch.float64)
    ref = run(lambda *a: wkv7_chunked(*(x.double() for x in a[:6]), None if a[6] is None else a[6].double()),
              xs, s0, dy, dsT)
    out = run(lambda *a: wkv7_cuda(*a[:6], a[6], layout=TENSOR_CORES), xs, s0, dy, dsT)
    errors = {"y": rel(out[0], ref[0]), "state": rel(out[1], ref[1])}
    errors.update({"d" + n: rel(o, r) for n, o, r in zip(["r", "w", "k", "v", "a", "b", "s0"], out[2], ref[2])})
    assert all(e < TC_TOL[torch.bfloat16] for e in errors.values()), {k: f"{e:.1e}" for k, e in errors.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_traces_through_the_kernel(dtype):
    """The ops have fake (shape-only) versions, so torch.compile builds one graph around them (fullgraph: no
    break): the compiled function gives the eager outputs and gradients, up to the compiler's own rounding
    of the ops around the kernel (in bf16 it computes tanh in fp32 and rounds once, eager rounds twice)."""
    xs, s0 = make(2, 40, 3, 64, dtype, seed=11, with_state=True)
    g = torch.Generator(device="cuda").manual_seed(12)
    dy = torch.randn(*xs[0].shape, device="cuda", generator=g, dtype=torch.float64)
    dsT = torch.randn(2, 3, 64, 64, device="cuda", generator=g, dtype=torch.float64)

    def fn(r, w, k, v, a, b, s):
        y, sT = wkv7(r, w, k, v, a, b, s, impl="cuda")
        return torch.tanh(y) * 2, sT * 1.0  # something around the op for the compiler to fuse

    eager = run(fn, xs, s0, dy, dsT)
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, fullgraph=True), xs, s0, dy, dsT)
    bound = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the outputs apart (TOL)
    for e, c in zip([eager[0], eager[1], *eager[2]], [compiled[0], compiled[1], *compiled[2]]):
        assert rel(c, e.double()) <= bound
