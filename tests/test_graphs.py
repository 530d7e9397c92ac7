"""RNN mode through CUDA graphs (vision_rwkv.lm.graphs) against eager lm.step, on a GPU.

A replay runs the kernels captured from the eager step, in the same order on the same data, so fp32
results match the eager ones to rounding noise (1e-5 relative leaves room for cuBLAS picking another
algorithm under capture); decoded tokens must be identical.
"""

import warnings

import pytest
import torch
from conftest import randomize_, tiny_config

from vision_rwkv import RWKV7, SamplingConfig
from vision_rwkv.lm.generate import decode_loop
from vision_rwkv.lm.graphs import GraphedStep, rnn_stepper

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


@pytest.fixture
def lm():
    torch.manual_seed(0)
    return randomize_(RWKV7(tiny_config(vocab_size=211, wkv_impl="chunked"))).cuda().eval()


def close(a, b, rtol):
    assert (a - b).abs().max() <= rtol * b.abs().max(), float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
@pytest.mark.parametrize("autocast", [False, True])
def test_graph_steps_equal_eager_steps(lm, autocast):
    g = torch.Generator(device="cuda").manual_seed(1)
    B = 5
    tokens = torch.randint(0, 211, (B, 6), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        _, state = lm(tokens[:, :2])
        eager, graphed = state.clone(), state.clone()
        step = rnn_stepper(lm)
        assert isinstance(step, GraphedStep)
        for t in range(2, 6):
            le, eager = lm.step(tokens[:, t], eager)
            lg, graphed = step(tokens[:, t], graphed)
            rtol = 2e-2 if autocast else 1e-5
            close(lg.float(), le.float(), rtol)
            for name in ("att_shift", "wkv", "ffn_shift"):
                close(getattr(graphed, name), getattr(eager, name), rtol)


@torch.no_grad()
def test_in_place_weight_updates_are_seen_and_replaced_weights_recaptured(lm):
    tokens = torch.tensor([3, 7], device="cuda")
    state = lm.init_state(2)
    rnn_stepper(lm)(tokens, state.clone())
    for p in lm.parameters():  # what an optimizer step does: same tensors, new values
        p.mul_(0.9)
    close(rnn_stepper(lm)(tokens, state.clone())[0], lm.step(tokens, state.clone())[0], 1e-5)
    lm.head.weight = torch.nn.Parameter(lm.head.weight * 2)  # a new tensor: the old graph must go
    close(rnn_stepper(lm)(tokens, state.clone())[0], lm.step(tokens, state.clone())[0], 1e-5)


@torch.no_grad()
def test_graphed_decoding_equals_eager_decoding_as_rows_finish(lm, monkeypatch):
    """Rows end at different steps, so the graphed batch shrinks through power-of-two sizes."""
    B = 13
    g = torch.Generator(device="cuda").manual_seed(2)
    _, state = lm(torch.randint(0, 211, (B, 4), device="cuda", generator=g))
    logits, _ = lm(torch.randint(0, 211, (B, 4), device="cuda", generator=g), last_only=True)
    cfg = SamplingConfig(max_new_tokens=24)
    free = decode_loop(lm, logits, state.clone(), cfg, stop_ids=[])
    # stop tokens that end rows at several different steps
    stops = sorted({row[k] for k, row in zip((1, 3, 6, 9, 12, 15), free)})
    runs = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("VISION_RWKV_CUDA_GRAPHS", graphs)
        scores = []
        runs[graphs] = decode_loop(lm, logits, state.clone(), cfg, stop_ids=stops, scores=scores), scores
    (ids_g, sc_g), (ids_e, sc_e) = runs["1"], runs["0"]
    assert ids_g == ids_e
    assert len({len(r) for r in ids_e}) >= 4  # rows really did end at different steps
    assert sc_g == pytest.approx(sc_e, rel=1e-5, abs=1e-5)


@torch.no_grad()
def test_capture_while_another_thread_pins_memory(lm):
    """caption.py's DataLoader pins batches in a thread of its own while decoding captures graphs: the
    capture must not make that thread's CUDA calls fail (it did with the default "global" capture mode)."""
    import threading

    stop, errors = threading.Event(), []

    def pin():
        try:
            while not stop.is_set():
                torch.empty(1 << 16).pin_memory()
        except Exception as e:  # what the pin-memory thread would have died of
            errors.append(e)

    thread = threading.Thread(target=pin)
    thread.start()
    try:
        for B in range(1, 17):  # a fresh capture per batch size
            tokens = torch.randint(0, 211, (B,), device="cuda")
            state = lm.init_state(B)
            close(rnn_stepper(lm)(tokens, state.clone())[0], lm.step(tokens, state.clone())[0], 1e-5)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]


_WORKSPACE_SCRIPT = """
import torch
from vision_rwkv import RWKV7, RWKV7Config
from vision_rwkv.lm.graphs import rnn_stepper
torch.manual_seed(0)
lm = RWKV7(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=768, head_size=64)).cuda().to(torch.bfloat16).eval()
B = 32
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    tokens = torch.randint(0, 65536, (B,), device="cuda")
    state = lm.init_state(B)
    step = rnn_stepper(lm)
    before = step(tokens, state.clone())[0].clone()
    torch._C._cuda_clearCublasWorkspaces()  # what torch.compile's CUDA graphs do before each capture
    torch.cuda.empty_cache()  # a freed workspace goes back to the driver...
    filler = [torch.full((n << 20,), 7, dtype=torch.uint8, device="cuda") for n in (1, 2, 4, 8, 16, 32, 64)
              for _ in range(4)]  # ...or to new tensors
    for _ in range(3):
        after = step(tokens, state.clone())[0]
    torch.cuda.synchronize()
    assert torch.equal(after, before), "the replay's logits changed"
    assert all(bool((f == 7).all()) for f in filler), "the replay wrote into other tensors"
print("ok")
"""


def test_a_graph_keeps_working_after_cublas_workspaces_are_freed():
    """torch.compile's CUDA graphs free cuBLAS's workspaces before each capture. A graph whose products use
    a workspace made outside it then writes into memory that is the driver's or other tensors' (on an H200:
    an illegal address in the next decode, after a compiled GPT-2 ran in the same process). In a process of
    its own, as an illegal address ends the CUDA context."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WORKSPACE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VISION_RWKV_CUDA_GRAPHS": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@torch.no_grad()
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_model_on_the_second_gpu_while_the_first_is_current(lm):
    """A torchrun process on cuda:1 may never call set_device: capture and replay must still happen on
    the model's GPU, also after graphs were captured on cuda:0 (torch's shared capture stream then
    belongs to cuda:0, and capturing on it failed with 'operation not permitted when stream is capturing')."""
    tokens = torch.tensor([3, 7, 11], device="cuda:0")
    rnn_stepper(lm)(tokens, lm.init_state(3))  # a first capture on cuda:0 (the fixture's model)
    torch.manual_seed(0)
    lm1 = randomize_(RWKV7(tiny_config(vocab_size=211, wkv_impl="chunked"))).to("cuda:1").eval()
    assert torch.cuda.current_device() == 0
    tokens = tokens.to("cuda:1")
    state = lm1.init_state(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and runs eagerly: that is a failure here
        for _ in range(2):  # capture, then replay
            logits, _ = rnn_stepper(lm1)(tokens, state.clone())
    close(logits, lm1.step(tokens, state.clone())[0], 1e-5)


@torch.no_grad()
@pytest.mark.parametrize("wkv_impl", ["chunked", "cuda"])
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_prefill_equals_eager_and_keeps_its_results(wkv_impl, autocast):
    """The image-prefix prefill as a graph (prefill_runner, through the fused operations): the logits and
    state of lm(inputs_embeds=x, last_only=True), for new inputs at every replay, with a returned state that
    later replays leave alone. Under bf16 autocast the bound is the fused ops' (BF16_BOUND in
    tests/ops/test_rwkv7_step.py): both sides round differently."""
    from vision_rwkv.lm import graphs

    torch.manual_seed(0)
    lm = randomize_(RWKV7(tiny_config(vocab_size=211, wkv_impl=wkv_impl))).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(4)
    rtol = 3e-2 if autocast else 1e-5
    kept = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for B in (1, 3, 3, 3):  # B=3 is captured once and replayed with new inputs
            x = torch.randn(B, 37, lm.config.n_embd, device="cuda", generator=g)
            logits, state = graphs.prefill_runner(lm)(x)
            ref_logits, ref_state = lm(inputs_embeds=x, last_only=True)
            close(logits.float(), ref_logits.float(), rtol)
            for name in ("att_shift", "wkv", "ffn_shift"):
                close(getattr(state, name), getattr(ref_state, name), rtol)
            kept.append((state, ref_state))
    assert len(graphs._prefills[lm].graphs) == 2
    for state, ref_state in kept:  # still the results of their own call
        close(state.wkv, ref_state.wkv, rtol)


@torch.no_grad()
def test_prefill_beyond_the_token_limit_runs_eagerly(lm, monkeypatch):
    from vision_rwkv.lm import graphs

    monkeypatch.setattr(graphs, "MAX_PREFILL_TOKENS", 20)
    x = torch.randn(3, 7, lm.config.n_embd, device="cuda")  # 21 tokens
    logits, _ = graphs.prefill_runner(lm)(x)
    close(logits, lm(inputs_embeds=x, last_only=True)[0], 1e-5)
    assert not graphs._prefills[lm].graphs


@torch.no_grad()
def test_the_prefill_runs_the_fused_operations_unless_switched_off(lm, monkeypatch):
    from vision_rwkv.lm import engine, graphs

    calls = []
    real = engine.StepEngine.prefill
    monkeypatch.setattr(engine.StepEngine, "prefill", lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randn(2, 5, lm.config.n_embd, device="cuda")
    graphs.prefill_runner(lm)(x)
    assert calls  # captured through the engine (the warm-up runs call it)
    monkeypatch.setenv("VISION_RWKV_FUSED_STEP", "0")
    calls.clear()
    logits, _ = graphs.prefill_runner(lm)(torch.randn(2, 6, lm.config.n_embd, device="cuda"))
    assert not calls


@torch.no_grad()
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_encoder_equals_eager_for_new_images_and_large_batches_run_eagerly(autocast, monkeypatch):
    """encoder_runner: a graph per small batch shape, replayed with new images (the same kernels on the same
    data: fp32 to rounding noise), the results its own copies; above MAX_ENCODER_GRAPH_BATCH, no graph."""
    from vision_rwkv.caption.encoder import ClipEncoder
    from vision_rwkv.config import EncoderConfig
    from vision_rwkv.lm import graphs

    torch.manual_seed(0)
    enc = ClipEncoder(EncoderConfig(model="vrwkv-ViT-tiny")).cuda().eval()
    monkeypatch.setattr(graphs, "MAX_ENCODER_GRAPH_BATCH", 3)
    g = torch.Generator(device="cuda").manual_seed(2)
    rtol = 2e-2 if autocast else 1e-5
    kept = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for B in (1, 3, 3, 4):
            images = torch.randn(B, 3, *enc.image_size, device="cuda", generator=g)
            got = graphs.encoder_runner(enc)(images)
            want = enc(images)
            for a, b in zip(got, want):
                close(a.float(), b.float(), rtol)
            kept.append((got, want))
    assert len(graphs._encoders[enc].graphs) == 2  # batches 1 and 3; 4 ran eagerly
    for got, want in kept:  # later replays left earlier results alone
        close(got[0].float(), want[0].float(), rtol)
    enc.train()
    assert graphs.encoder_runner(enc) is enc
