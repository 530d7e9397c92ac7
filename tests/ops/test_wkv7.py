"""The two PyTorch WKV-7 implementations agree: outputs, final states and every gradient."""

import pytest
import torch

from vision_rwkv import VisionRWKVError
from vision_rwkv.ops.wkv7 import wkv7, wkv7_chunked, wkv7_reference


def make_inputs(B, T, H, N, dtype=torch.float64, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    r, w, k, v = rnd(B, T, H, N), 2 * rnd(B, T, H, N), 0.5 * rnd(B, T, H, N), rnd(B, T, H, N)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    s0 = rnd(B, H, N, N) if with_state else None
    return [r, w, k, v, -kk, kk * a], s0


@pytest.mark.parametrize("T", [1, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference_fp64(T, with_state):
    xs, s0 = make_inputs(2, T, 3, 8, with_state=with_state, seed=T)
    y1, s1 = wkv7_reference(*xs, s0)
    y2, s2 = wkv7_chunked(*xs, s0)
    assert y1.shape == y2.shape == xs[0].shape and s1.shape == s2.shape == (2, 3, 8, 8)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_len", [1, 7, 16, 64])
def test_chunk_length_does_not_change_the_result(chunk_len):
    xs, s0 = make_inputs(1, 50, 2, 8, seed=3)
    y1, s1 = wkv7_reference(*xs, s0)
    y2, s2 = wkv7_chunked(*xs, s0, chunk_len=chunk_len)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)


def test_fp32_paths_agree_and_keep_fp32_state():
    xs, s0 = make_inputs(2, 70, 2, 16, dtype=torch.float32, seed=1)
    y1, s1 = wkv7_reference(*xs, s0.float())
    y2, s2 = wkv7_chunked(*xs, s0.float())
    assert s1.dtype == s2.dtype == torch.float32
    # fp32 rounding over 70 steps of a contracting recurrence: relative error ~1e-6
    assert (y2 - y1).norm() / y1.norm() < 1e-5
    assert (s2 - s1).norm() / s1.norm() < 1e-5


def test_bf16_inputs_give_bf16_output_and_fp32_state():
    xs, s0 = make_inputs(1, 40, 2, 16, dtype=torch.float32, seed=2)
    y, s = wkv7_chunked(*(x.bfloat16() for x in xs), s0)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, _ = wkv7_reference(*(x.bfloat16().float() for x in xs), s0)
    assert (y.float() - y_ref).norm() / y_ref.norm() < 1e-2  # bf16 output rounding


@pytest.mark.parametrize("T", [1, 20, 45])
def test_gradients_agree_for_every_input_and_the_state(T):
    xs, s0 = make_inputs(2, T, 2, 8, seed=10 + T)
    grads = []
    for fn in (wkv7_reference, wkv7_chunked):
        leaves = [x.clone().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
        y, s = fn(*leaves[:6], leaves[6])
        g = torch.Generator().manual_seed(99)
        dy = torch.randn(y.shape, generator=g, dtype=y.dtype)
        ds = torch.randn(s.shape, generator=g, dtype=s.dtype)
        loss = (y * dy).sum() + (s * ds).sum()
        loss.backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, g_ref, g_chunk in zip(["r", "w", "k", "v", "a", "b", "state"], *grads):
        assert g_ref is not None and g_chunk is not None, name
        assert g_ref.abs().max() > 0, f"gradient of {name} is identically zero: the test would prove nothing"
        torch.testing.assert_close(g_chunk, g_ref, rtol=1e-9, atol=1e-9, msg=f"d/d{name}")


def test_dispatcher_runs_each_impl_and_rejects_bad_shapes():
    xs, s0 = make_inputs(1, 9, 2, 8, seed=4)
    y_ref, s_ref = wkv7(*xs, state=s0, impl="reference")
    y_chk, s_chk = wkv7(*xs, state=s0, impl="chunked")
    y_auto, _ = wkv7(*xs, state=s0)
    torch.testing.assert_close(y_chk, y_ref)
    torch.testing.assert_close(y_auto, y_chk)
    with pytest.raises(VisionRWKVError, match="state has shape"):
        wkv7(*xs, state=s0[:, :1])
    with pytest.raises(VisionRWKVError, match="k has shape"):
        wkv7(xs[0], xs[1], xs[2][:, :3], *xs[3:])
    with pytest.raises(VisionRWKVError, match="impl"):
        wkv7(*xs, impl="fast")
    with pytest.raises(VisionRWKVError, match="cannot run"):
        wkv7(*xs, impl="cuda")


def test_decay_is_the_soft_clamped_exponential():
    # A single step from a known state isolates the decay: S1 = S0 * d (a = b = k = 0), y = S1 r.
    N = 4
    w = torch.tensor([-30.0, 0.0, 2.0, 30.0], dtype=torch.float64).view(1, 1, 1, N)
    zeros = torch.zeros(1, 1, 1, N, dtype=torch.float64)
    s0 = torch.ones(1, 1, N, N, dtype=torch.float64)
    _, s1 = wkv7_reference(zeros, w, zeros, zeros, zeros, zeros, s0)
    expected = torch.exp(-torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * torch.sigmoid(w.view(N)))
    torch.testing.assert_close(s1[0, 0, 0], expected)
    assert expected.min() > 0.545 and expected.max() < 1


def test_fallback_on_cuda_inputs_warns_once_with_the_reason_and_cpu_inputs_never():
    import warnings

    from vision_rwkv.ops import wkv7 as dispatcher

    dispatcher._warned.clear()
    xs, _ = make_inputs(1, 3, 1, 4, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wkv7(*xs)  # CPU inputs: the PyTorch path is the only one, and no news
        dispatcher._note_fallback("inputs are on cpu, not CUDA", "cpu")
    with pytest.warns(UserWarning, match="PyTorch path: the kernel failed to build: boom"):
        dispatcher._note_fallback("the kernel failed to build: boom", "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatcher._note_fallback("the kernel failed to build: boom", "cuda")  # the second time stays quiet


def test_build_failure_reason_names_the_compiler_error():
    from vision_rwkv.ops.wkv7.cuda import first_error_line

    log = ("Error building extension 'x': [1/2] nvcc ...\nFAILED: wkv7.o\n"
           "/src/kernels/wkv7.cu(42): error: identifier \"foo\" is undefined\n1 error detected")
    assert first_error_line(log) == '/src/kernels/wkv7.cu(42): error: identifier "foo" is undefined'


@pytest.mark.parametrize("T", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("with_state", [False, True])
def test_explicit_chunked_backward_matches_autograd(T, with_state):
    """wkv7_chunked_backward is the tensor-core kernel's backward algorithm in PyTorch (CI has no GPU):
    its gradients must equal autograd's through the per-step reference, in float64."""
    from vision_rwkv.ops.wkv7.chunked import wkv7_chunked_backward

    xs, s0 = make_inputs(2, T, 2, 8, seed=30 + T, with_state=with_state)
    g = torch.Generator().manual_seed(T)
    dy = torch.randn(2, T, 2, 8, generator=g, dtype=torch.float64)
    dsT = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in xs]
    s = None if s0 is None else s0.clone().requires_grad_()
    y, sT = wkv7_reference(*leaves, s)
    ((y * dy).sum() + (sT * dsT).sum()).backward()
    ours = wkv7_chunked_backward(*xs, dy, s0, dsT)
    for name, mine, ref in zip("rwkvab", ours[:6], leaves):
        torch.testing.assert_close(mine, ref.grad, rtol=1e-9, atol=1e-9, msg=f"d{name}")
    if s is not None:
        torch.testing.assert_close(ours[6], s.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "major,minor,optin,dtype,expected",
    [
        (9, 0, 232_448, torch.bfloat16, 3),  # H100: the tensor-core kernel
        (8, 0, 166_912, torch.float16, 3),  # A100
        (8, 9, 101_376, torch.bfloat16, 3),  # RTX 40xx: 99 KB of shared memory per block, enough
        (8, 0, 98_304, torch.bfloat16, 2),  # a part with less shared memory than layout 3's backward
        (7, 5, 65_536, torch.bfloat16, 2),  # T4: no tf32 tensor cores
        (9, 0, 232_448, torch.float32, 2),  # fp32 keeps the exact row kernels
        (9, 0, None, torch.bfloat16, 3),  # a torch without shared_memory_per_block_optin: by capability
        (8, 6, None, torch.bfloat16, 3),
        (7, 0, None, torch.bfloat16, 2),
    ],
)
def test_kernel_choice_follows_dtype_and_device(monkeypatch, major, minor, optin, dtype, expected):
    """pick_layout runs anywhere (it only reads device properties): layout 3 only where it can launch."""
    import types

    from vision_rwkv.ops.wkv7 import cuda as cuda_impl

    props = types.SimpleNamespace(major=major, minor=minor, multi_processor_count=132)
    if optin is not None:
        props.shared_memory_per_block_optin = optin
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: props)
    assert cuda_impl.pick_layout(8, 12, 64, device=0, dtype=dtype) == expected
    assert cuda_impl.pick_layout(8, 12, 32, device=0, dtype=dtype) == 0  # other head sizes: one layout


# ---- the CPU kernel (forward only, fp32): kernels/rwkv7_cpu.cpp through ops/wkv7/cpu.py ------------------

def _cpu_kernel_failed():
    from vision_rwkv.ops import _build

    return _build.cpu_kernels()


cpu_kernel = pytest.mark.skipif(_cpu_kernel_failed() is not None, reason=f"{_cpu_kernel_failed()}")


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@cpu_kernel
@torch.no_grad()
@pytest.mark.parametrize("T", [1, 5, 33, 100])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("N", [8, 16, 32, 64, 128])
def test_cpu_kernel_is_within_the_fp32_noise_floor_of_the_reference(T, with_state, N):
    """Against the fp64 reference: at most 4x the error of the fp32 reference itself, in outputs and state.
    N 8 takes the kernel's general loop; 16 to 128 its forms with the head size fixed at compile time."""
    xs, s0 = make_inputs(2, T, 3, N, seed=20 + T, with_state=with_state)
    truth_y, truth_s = wkv7_reference(*xs, s0)
    xs32 = [x.float() for x in xs]
    s32 = None if s0 is None else s0.float()
    ref_y, ref_s = wkv7_reference(*xs32, s32)
    y, s = wkv7(*xs32, state=s32, impl="cpu")
    assert y.dtype == s.dtype == torch.float32 and y.shape == xs[0].shape and s.shape == (2, 3, N, N)
    assert _rel(y, truth_y) <= 4 * max(_rel(ref_y, truth_y), 1e-7)
    assert _rel(s, truth_s) <= 4 * max(_rel(ref_s, truth_s), 1e-7)
    if s32 is not None:
        assert torch.equal(s32, s0.float())  # the caller's state is not written


@cpu_kernel
def test_auto_takes_the_cpu_kernel_for_fp32_inference_and_the_chunked_form_for_gradients_and_fp64():
    from vision_rwkv.ops.wkv7 import cpu_unavailable_reason

    xs, s0 = make_inputs(1, 12, 2, 8, dtype=torch.float32, seed=5)
    with torch.no_grad():
        assert cpu_unavailable_reason(*xs, s0) is None
        torch.testing.assert_close(wkv7(*xs, state=s0)[0], wkv7(*xs, state=s0, impl="cpu")[0], rtol=0, atol=0)
        assert "fp32" in cpu_unavailable_reason(*(x.double() for x in xs))
    xs[0].requires_grad_(True)
    assert cpu_unavailable_reason(*xs, s0) == "gradients are needed, and the CPU kernel is forward only"
    y, _ = wkv7(*xs, state=s0)  # the chunked form, differentiable
    y.sum().backward()
    assert xs[0].grad is not None
    with pytest.raises(VisionRWKVError, match="impl 'cpu' was asked for but cannot run: gradients are needed"):
        wkv7(*xs, state=s0, impl="cpu")


def test_a_failed_cpu_build_leaves_auto_on_the_chunked_form_and_explicit_cpu_says_why(monkeypatch):
    import warnings

    from vision_rwkv.ops import _build

    monkeypatch.setattr(_build, "_cpu_built", ["the CPU kernel failed to build: cc1plus: out of memory"])
    xs, s0 = make_inputs(1, 7, 2, 8, dtype=torch.float32, seed=6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU inputs: no news
        y, _ = wkv7(*xs, state=s0)
    torch.testing.assert_close(y, wkv7_chunked(*xs, s0)[0])
    with pytest.raises(VisionRWKVError, match="cannot run: the CPU kernel failed to build: cc1plus: out of memory"):
        wkv7(*xs, state=s0, impl="cpu")


@cpu_kernel
def test_torch_compile_traces_a_model_through_the_cpu_kernel_in_one_graph():
    """The CPU ops have fake (shape-only) registrations: dynamo traces GPT mode with the kernel inside one
    graph, and the compiled model gives the eager one's logits."""
    from vision_rwkv import RWKV7, RWKV7Config

    lm = RWKV7(RWKV7Config(vocab_size=97, n_layer=2, n_embd=64, head_size=16)).eval()
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        want, _ = lm(x)
        got, _ = torch.compile(lm, backend=backend, fullgraph=True)(x)
    assert sum("vision_rwkv_cpu.wkv7_forward" in t for t in seen) == 2  # one call a layer
    assert _rel(got, want) <= 1e-6
