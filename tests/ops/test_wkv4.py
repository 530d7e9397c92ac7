"""The WKV-4 reference against the plain unscaled recurrence, state carry-over, and the door's errors (CPU)."""

import pytest
import torch

from vision_rwkv.errors import VisionRWKVError
from vision_rwkv.ops.wkv4 import fresh_state, wkv4, wkv4_reference


def make_inputs(B, T, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(C, generator=g, dtype=torch.float64))
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (w, u, k, v)]


def naive(w, u, k, v):
    """The recurrence exactly as written, no running maximum: a and b unscaled (fine in float64 for |k| ~ 1)."""
    B, T, C = k.shape
    a = torch.zeros(B, C, dtype=torch.float64)
    b = torch.zeros(B, C, dtype=torch.float64)
    ys = []
    for t in range(T):
        bonus = torch.exp(u + k[:, t])
        ys.append((a + bonus * v[:, t]) / (b + bonus))
        a = torch.exp(w) * a + torch.exp(k[:, t]) * v[:, t]
        b = torch.exp(w) * b + torch.exp(k[:, t])
    return torch.stack(ys, dim=1), a, b


@pytest.mark.parametrize("T", [1, 2, 17, 64])
def test_reference_matches_the_unscaled_recurrence(T):
    w, u, k, v = make_inputs(3, T, 5, seed=T)
    y, (num, den, mx) = wkv4_reference(w, u, k, v)
    y_naive, a, b = naive(w, u, k, v)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(num * torch.exp(mx), a, rtol=1e-12, atol=1e-12)  # the state is (a, b) scaled
    torch.testing.assert_close(den * torch.exp(mx), b, rtol=1e-12, atol=1e-12)


def test_large_keys_stay_finite_in_fp32():
    w, u, k, v = make_inputs(2, 40, 4, dtype=torch.float32, seed=1)
    y, state = wkv4_reference(w, u, k * 100, v)  # e^(100 k) overflows fp32; the scaled state does not
    assert torch.isfinite(y).all() and all(torch.isfinite(x).all() for x in state)


@pytest.mark.parametrize("split", [1, 7, 16])
def test_two_halves_with_the_state_carried_equal_one_pass(split):
    w, u, k, v = make_inputs(2, 23, 6, seed=split)
    y, s = wkv4_reference(w, u, k, v)
    y1, s1 = wkv4_reference(w, u, k[:, :split], v[:, :split])
    y2, s2 = wkv4_reference(w, u, k[:, split:], v[:, split:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=1e-12, atol=1e-12)
    for a, b in zip(s2, s):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fresh_state_is_the_empty_one():
    w, u, k, v = make_inputs(2, 9, 3, seed=2)
    y0, s0 = wkv4_reference(w, u, k, v)
    y1, s1 = wkv4_reference(w, u, k, v, fresh_state(2, 3, dtype=torch.float64))
    torch.testing.assert_close(y0, y1)
    for a, b in zip(s0, s1):
        torch.testing.assert_close(a, b)


def test_bf16_inputs_give_bf16_output_and_fp32_state():
    w, u, k, v = make_inputs(2, 5, 4, dtype=torch.float32, seed=3)
    y, state = wkv4(w, u, k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.bfloat16 and all(x.dtype == torch.float32 for x in state)


def test_the_door_rejects_bad_shapes_and_impls_in_one_line():
    w, u, k, v = make_inputs(2, 5, 4, seed=4)
    state = fresh_state(2, 4, dtype=torch.float64)
    y, _ = wkv4(w, u, k, v, state, impl="reference")
    y_auto, _ = wkv4(w, u, k, v, state)
    torch.testing.assert_close(y_auto, y)
    cases = [
        ((w, u, k[0], v), "expects k and v of shape"),
        ((w, u, k, v[:, :3]), "v has shape"),
        ((w[:3], u, k, v), r"w has shape \(3,\), expected \(4,\)"),
        ((w, u[:2], k, v), "u has shape"),
        ((w, u, k, v, state[:2]), "the state must be"),
        ((w, u, k, v, tuple(x[:1] for x in state)), "the state must be"),
    ]
    for args, message in cases:
        with pytest.raises(VisionRWKVError, match=message) as e:
            wkv4(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(VisionRWKVError, match="impl is 'fast'; expected one of auto, cuda, cpu, reference"):
        wkv4(w, u, k, v, impl="fast")


def test_cuda_on_cpu_tensors_says_why_in_one_line():
    w, u, k, v = make_inputs(1, 3, 4, seed=5)
    with pytest.raises(VisionRWKVError, match="impl 'cuda' was asked for but cannot run: inputs are on cpu") as e:
        wkv4(w, u, k, v, impl="cuda")
    assert "\n" not in str(e.value)


def test_build_failure_reason_names_the_compiler_error():
    from vision_rwkv.ops._build import first_error_line

    log = "Error building extension 'x'\nFAILED: wkv4.o\n/src/kernels/wkv4.cu(7): error: expected a \";\"\n"
    assert first_error_line(log) == '/src/kernels/wkv4.cu(7): error: expected a ";"'
