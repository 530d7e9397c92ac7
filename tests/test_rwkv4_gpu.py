"""The RWKV-4 decoder on a GPU: the CUDA WKV-4 kernel inside the model against the per-step reference
(logits, final states and every parameter's gradient), graphed RNN steps against eager ones, and bf16.

The kernel alone is tested in tests/ops/test_wkv4_cuda.py; here it is the model's GPT mode that must not
change when the kernel replaces the reference. fp32 bounds are the kernel's own (1e-5 outputs, 1e-4
gradients, relative to the largest value).
"""

import pytest
import torch
from test_rwkv4 import randomize_, rwkv4_config

from vision_rwkv import RWKV4, SamplingConfig
from vision_rwkv.lm.generate import decode_loop
from vision_rwkv.lm.graphs import GraphedStep, rnn_stepper

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


def close(a, b, rtol, what=""):
    gap = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert gap <= rtol, (what, gap)


def make(impl, seed=3):
    return randomize_(RWKV4(rwkv4_config(wkv_impl=impl)), seed=seed).cuda()


def test_the_kernel_in_the_model_equals_the_reference(tmp_path):
    tokens = torch.randint(0, 61, (3, 70), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for impl in ("reference", "cuda"):
        lm = make(impl).train()
        state = lm.init_state(3)
        state.num.normal_(generator=torch.Generator("cuda").manual_seed(1))
        state.den.uniform_(0.5, 1.5, generator=torch.Generator("cuda").manual_seed(2))
        state.max.normal_(generator=torch.Generator("cuda").manual_seed(3))
        for t in state.tensors():
            t.requires_grad_(True)
        logits, final = lm(tokens, state)
        (logits.square().mean() + sum(t.square().mean() for t in final.tensors()[1:4])).backward()
        results[impl] = logits.detach(), final.detach(), {n: p.grad for n, p in lm.named_parameters()}, \
            [t.grad for t in state.tensors()]
    (lr, sr, gr, sgr), (lc, sc, gc, sgc) = results["reference"], results["cuda"]
    close(lc, lr, 1e-5, "logits")
    for name, a, b in zip(sr.names(), sc.tensors(), sr.tensors()):
        close(a, b, 1e-5, name)
    for name in gr:
        close(gc[name], gr[name], 1e-4, name)
    for name, a, b in zip(sr.names(), sgc, sgr):
        close(a, b, 1e-4, f"d state.{name}")


@torch.no_grad()
@pytest.mark.parametrize("autocast", [False, True])
def test_graph_steps_equal_eager_steps(autocast):
    lm = make("auto").eval()
    tokens = torch.randint(0, 61, (5, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        _, state = lm(tokens[:, :3])
        eager, graphed = state.clone(), state.clone()
        step = rnn_stepper(lm)
        assert isinstance(step, GraphedStep)
        for t in range(3, 8):
            le, eager = lm.step(tokens[:, t], eager)
            lg, graphed = step(tokens[:, t], graphed)
            rtol = 2e-2 if autocast else 1e-5
            close(lg.float(), le.float(), rtol, "logits")
            for name, a, b in zip(eager.names(), graphed.tensors(), eager.tensors()):
                close(a, b, rtol, name)


@torch.no_grad()
def test_graphed_decoding_gives_eager_tokens_and_bf16_stays_near_fp32(monkeypatch):
    lm = make("auto").eval()
    prompt = torch.randint(0, 61, (4, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    logits, state = lm(prompt, last_only=True)
    cfg = SamplingConfig(max_new_tokens=12)
    graphed = decode_loop(lm, logits, state.clone(), cfg, stop_ids=[0])
    monkeypatch.setenv("VISION_RWKV_CUDA_GRAPHS", "0")
    eager = decode_loop(lm, logits, state.clone(), cfg, stop_ids=[0])
    assert graphed == eager
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low, _ = lm(prompt)
    close(low.float(), lm(prompt)[0], 3e-2, "bf16 logits")
