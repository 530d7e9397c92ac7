"""The device-side decoding loops (lm/generate.py, lm/beam.py) against the loops they replaced
(tests/decode_reference.py): the same tokens, the same hypothesis lists in the same order, the same scores
within fp32 rounding, through every kind of step decoding meets (the CPU's fused EngineStepper, eager
lm.step, and a stand-in for the CUDA graphs' bucketed stepper), with the host reading its few values at
once or LAG steps late as on CUDA.

Sampled draws equal the reference's while the batch shrinks at the same steps (on the CPU, where values
are read at once). Read late, as on CUDA, rows leave the batch a few steps later, so the exponential noise
a step draws for the whole batch has another shape and the draws differ; there the test holds the draws to
being reproducible, and equal to the reference's as long as no row has ended.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_reference, when run from elsewhere
import decode_reference as ref  # noqa: E402

import vision_rwkv.caption.generate as caption_generate  # noqa: E402
from vision_rwkv import RWKV7, SamplingConfig, VisionRWKVError  # noqa: E402
from vision_rwkv.lm import beam as beam_module  # noqa: E402
from vision_rwkv.lm import generate as generate_module  # noqa: E402
from vision_rwkv.lm import readback  # noqa: E402
from vision_rwkv.lm.beam import beam_search  # noqa: E402
from vision_rwkv.lm.generate import decode_loop  # noqa: E402

LAG = 2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class BucketedStep:
    """graphs.GraphedStep's contract on any device: a state buffer of its own per batch size, updated in
    place and returned (the next call for that size overwrites it), bucketed=True so the decode keeps
    power-of-two batches once it shrinks. The step is lm.step's operations. Counts the calls whose state
    had to be copied in (a state that is not the buffer it returned)."""

    bucketed = True

    def __init__(self, lm):
        self.lm, self.states, self.sizes, self.copies = lm, {}, [], 0

    def __call__(self, tokens, state):
        B = tokens.shape[0]
        self.sizes.append(B)
        own = self.states.get(B)
        if own is None:
            own = self.states[B] = self.lm.init_state(B)
        if state is not own:
            self.copies += 1
            for name in ("att_shift", "wkv", "ffn_shift"):
                getattr(own, name).copy_(getattr(state, name))
        logits, new = self.lm.step_unchecked(tokens, own)
        for name in ("att_shift", "wkv", "ffn_shift"):
            getattr(own, name).copy_(getattr(new, name))
        return logits, own


STEPPERS = {  # name -> what rnn_stepper(lm) returns; None: the real one (EngineStepper on the CPU)
    "engine": None,
    "eager": lambda lm: lm.step,
    "bucketed": BucketedStep,
}
# (stepper, lag): the CPU's own path, eager steps read late, the graphs' contract read at once and late
PATHS = [("engine", 0), ("eager", LAG), ("bucketed", 0), ("bucketed", LAG)]


@pytest.fixture
def path(request, monkeypatch):
    """Put both the new loops and the reference on the given stepper, and read back with the given lag."""
    name, lag = request.param
    make = STEPPERS[name]
    if make is not None:
        for module in (generate_module, beam_module, ref):
            monkeypatch.setattr(module, "rnn_stepper", make)
    monkeypatch.setattr(readback, "CPU_LAG_STEPS", lag)
    return name, lag


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return randomize_(RWKV7(tiny_config()).eval(), seed=5)


def prefix(lm, B, seed=0):
    """The logits and state after a random 5-token prompt per row."""
    g = torch.Generator().manual_seed(seed)
    device = lm.emb.weight.device
    with torch.no_grad():
        return lm(torch.randint(0, lm.config.vocab_size, (B, 5), generator=g).to(device), last_only=True)


def staggered_stops(lm, logits, state, T):
    """Stop tokens that end the rows of a greedy decode at several different steps."""
    free = ref.decode_loop(lm, logits, state.clone(), SamplingConfig(max_new_tokens=T), stop_ids=[])
    return sorted({row[k] for k, row in zip((1, 3, 5, 8, 11, 2, 6), free)})


def assert_same_hypotheses(new, old):
    assert [[(h.ids, h.finished) for h in row] for row in new] == [[(h.ids, h.finished) for h in row] for row in old]
    for new_row, old_row in zip(new, old):
        assert [h.logprob for h in new_row] == pytest.approx([h.logprob for h in old_row], rel=1e-5, abs=1e-5)
        assert [h.score for h in new_row] == pytest.approx([h.score for h in old_row], rel=1e-5, abs=1e-5)


# ---- greedy and sampling ------------------------------------------------------------------------------------


GREEDY_CASES = {
    "stops": lambda stops: (SamplingConfig(max_new_tokens=14), stops),
    "min_new_tokens_and_bans": lambda stops: (SamplingConfig(max_new_tokens=14, min_new_tokens=4,
                                                             banned_tokens=[stops[0], 7]), stops[1:]),
    "max_new_tokens_reached": lambda stops: (SamplingConfig(max_new_tokens=9), []),
    "penalties": lambda stops: (SamplingConfig(max_new_tokens=14, frequency_penalty=0.6, presence_penalty=0.3,
                                               penalty_decay=0.9), stops),
}


@pytest.mark.parametrize("path", PATHS, indirect=True, ids=lambda p: f"{p[0]}-lag{p[1]}")
@pytest.mark.parametrize("B", [1, 3, 7])
@pytest.mark.parametrize("case", sorted(GREEDY_CASES))
def test_greedy_equals_the_reference(lm, path, B, case):
    logits, state = prefix(lm, B)
    cfg, stops = GREEDY_CASES[case](staggered_stops(lm, logits, state, 14))
    new_scores, old_scores = [], []
    new = decode_loop(lm, logits, state.clone(), cfg, stops, scores=new_scores)
    old = ref.decode_loop(lm, logits, state.clone(), cfg, stops, scores=old_scores)
    assert new == old
    assert new_scores == pytest.approx(old_scores, rel=1e-5, abs=1e-5)
    if case == "stops" and B == 7:
        assert len({len(row) for row in new}) >= 4  # rows really did end at different steps
    if case == "max_new_tokens_reached":
        assert all(len(row) == 9 for row in new)


def test_a_bucketed_decode_shrinks_through_powers_of_two(lm, monkeypatch):
    logits, state = prefix(lm, 7)
    stops = staggered_stops(lm, logits, state, 14)
    stepper = BucketedStep(lm)
    monkeypatch.setattr(generate_module, "rnn_stepper", lambda lm: stepper)
    out = decode_loop(lm, logits, state.clone(), SamplingConfig(max_new_tokens=14), stops)
    sizes = sorted(set(stepper.sizes), reverse=True)
    assert sizes[0] == 7 and len(sizes) >= 3 and all(s & (s - 1) == 0 for s in sizes[1:]), stepper.sizes
    assert max(len(row) for row in out) < 14  # every row ended: the loop stopped early


SAMPLING = dict(strategy="sample", temperature=1.3, top_p=0.95, top_k=40, max_new_tokens=14)


@pytest.mark.parametrize("path", [p for p in PATHS if p[1] == 0], indirect=True, ids=lambda p: p[0])
@pytest.mark.parametrize("penalties", [False, True])
def test_seeded_sampling_read_at_once_draws_what_the_reference_draws(lm, path, penalties):
    logits, state = prefix(lm, 7)
    stops = staggered_stops(lm, logits, state, 14)
    extra = dict(presence_penalty=0.4, frequency_penalty=0.2) if penalties else {}
    cfg = SamplingConfig(**SAMPLING, **extra, seed=3)
    new_scores, old_scores = [], []
    new = decode_loop(lm, logits, state.clone(), cfg, stops, scores=new_scores)
    old = ref.decode_loop(lm, logits, state.clone(), cfg, stops, scores=old_scores)
    assert new == old
    assert new_scores == pytest.approx(old_scores, rel=1e-5, abs=1e-5)
    assert len({len(row) for row in new}) >= 2


@pytest.mark.parametrize("path", [("bucketed", LAG), ("eager", LAG)], indirect=True, ids=lambda p: p[0])
def test_seeded_sampling_read_late_is_reproducible_and_as_before_while_no_row_ends(lm, path):
    logits, state = prefix(lm, 7)
    stops = staggered_stops(lm, logits, state, 14)
    cfg = SamplingConfig(**SAMPLING, seed=3)
    runs = [decode_loop(lm, logits, state.clone(), cfg, stops) for _ in range(2)]
    assert runs[0] == runs[1]
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    cfg = SamplingConfig(**SAMPLING)
    new = decode_loop(lm, logits, state.clone(), cfg, [], g1)
    assert new == ref.decode_loop(lm, logits, state.clone(), cfg, [], g2)


# ---- beam search -----------------------------------------------------------------------------------------


def beam_cases(nb, stops):
    """(config, stop ids) for one beam width: many stop tokens and one (images end at different steps, some
    are cut at max_new_tokens), no length normalisation, a length penalty between, more hypotheses returned
    than beams, min_new_tokens with bans, no stop token at all."""
    beam = dict(strategy="beam", num_beams=nb, max_new_tokens=12)
    return [
        (SamplingConfig(**beam, length_penalty=1.0), stops),
        (SamplingConfig(**beam, length_penalty=1.0, num_return_sequences=nb), stops[2:3]),
        (SamplingConfig(**beam, length_penalty=0.0, num_return_sequences=nb), stops),
        (SamplingConfig(**beam, length_penalty=0.7, num_return_sequences=nb + 2), stops),
        (SamplingConfig(**beam, min_new_tokens=3, banned_tokens=[stops[0], 7], num_return_sequences=2), stops[1:]),
        (SamplingConfig(strategy="beam", num_beams=nb, max_new_tokens=5, num_return_sequences=nb), []),
    ]


@pytest.mark.parametrize("path", PATHS, indirect=True, ids=lambda p: f"{p[0]}-lag{p[1]}")
@pytest.mark.parametrize("B", [1, 3, 7])
@pytest.mark.parametrize("nb", [1, 2, 3, 4])
def test_beam_search_equals_the_reference(lm, path, B, nb):
    logits, state = prefix(lm, B, seed=1)
    stops = staggered_stops(lm, logits, state, 12)
    for cfg, stop in beam_cases(nb, stops):
        new = beam_search(lm, logits, state.clone(), cfg, stop)
        old = ref.beam_search(lm, logits, state.clone(), cfg, stop)
        assert_same_hypotheses(new, old)
        assert all(len(row) == min(cfg.num_return_sequences, len(row)) > 0 for row in new)


def test_the_beam_cases_cover_what_they_claim(lm):
    """On this model the cases above hold hypotheses ended by a stop token and hypotheses cut at
    max_new_tokens, side by side in one image's list, and more hypotheses than beams where asked."""
    logits, state = prefix(lm, 7, seed=1)
    stops = staggered_stops(lm, logits, state, 12)
    rows = [row for cfg, stop in beam_cases(3, stops) for row in beam_search(lm, logits, state.clone(), cfg, stop)]
    assert any(len({h.finished for h in row}) == 2 for row in rows)
    assert max(len(row) for row in rows) == 5


class UniformStep:
    """A stand-in decoder whose every step puts equal logits on tokens 0..3 (0 stops): every candidate
    ties, and with length_penalty 1 hypotheses of lengths 1 and 2 tie too (2c / 2 = c exactly)."""

    bucketed = False

    def __init__(self, V):
        self.logits = torch.full((V,), -1e4)
        self.logits[:4] = 0.0

    def __call__(self, tokens, state):
        return self.logits.to(tokens.device).expand(tokens.shape[0], -1).clone(), state


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
@pytest.mark.parametrize("lag", [0, LAG])
@pytest.mark.parametrize("nb, length_penalty", [(2, 1.0), (3, 0.0), (3, 1.0), (4, 0.0), (4, 1.0)])
def test_beam_search_breaks_ties_as_the_reference(lm, monkeypatch, device, lag, nb, length_penalty):
    """Equal scores keep the order in which hypotheses were filed (sorted() is stable), and the candidates
    of a step come in topk's order: both the same as the reference, which the output's order shows."""
    for module in (beam_module, ref):
        monkeypatch.setattr(module, "rnn_stepper", lambda lm: UniformStep(lm.config.vocab_size))
    monkeypatch.setattr(readback, "CPU_LAG_STEPS", lag)
    B, V = 3, lm.config.vocab_size
    logits = UniformStep(V)(torch.zeros(B, dtype=torch.long, device=device), None)[0]
    state = lm.init_state(B).to(device)
    cfg = SamplingConfig(strategy="beam", num_beams=nb, max_new_tokens=4, length_penalty=length_penalty,
                         num_return_sequences=nb)
    new = beam_search(lm, logits, state.clone(), cfg, [0])
    old = ref.beam_search(lm, logits, state.clone(), cfg, [0])
    assert_same_hypotheses(new, old)
    # there were ties to break: by design on the CPU; CUDA's topk orders equal candidates its own way, and
    # with 4 beams and no length penalty both loops filed hypotheses of distinct scores there (H200, 2026-12-03)
    if device == "cpu" or (nb, length_penalty) != (4, 0.0):
        assert any(len({h.score for h in row}) < len(row) for row in new)


def test_beam_search_reorders_the_state_in_place(lm, monkeypatch):
    """After the first step every state handed to the step is the buffer the step returned, reordered in
    place: no new state per step."""
    stepper = BucketedStep(lm)
    monkeypatch.setattr(beam_module, "rnn_stepper", lambda lm: stepper)
    logits, state = prefix(lm, 3)
    beam_search(lm, logits, state, SamplingConfig(strategy="beam", num_beams=3, max_new_tokens=10), [])
    assert stepper.copies == 1 and set(stepper.sizes) == {9} and len(stepper.sizes) == 9


# ---- the demo model, through caption_features -----------------------------------------------------------------


def demo_inputs(device: str, dtype: str):
    """The shipped demo model as Captioner.load gives it, and the encoded shipped examples."""
    from PIL import Image

    from vision_rwkv import Captioner

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("shapes_test_*.png"))
    captioner = Captioner.load(device=device, dtype=dtype)
    model = captioner.model
    x = torch.stack([model.encoder.preprocess(Image.open(p).convert("RGB")) for p in examples])
    with torch.no_grad(), torch.autocast(captioner.device.type, dtype=torch.bfloat16, enabled=captioner.bf16):
        return captioner, *model.encode(x.to(captioner.device))


def reference_caption_features(monkeypatch, model, tokens, pooled, cfg):
    """caption_features as it ran before: the same prefill, the reference loops."""
    with monkeypatch.context() as m:
        for name in ("decode_loop", "beam_search"):
            m.setattr(caption_generate, name, getattr(ref, name))
        return caption_generate.caption_features(model, tokens, pooled, cfg)


def assert_demo_equals_the_reference(monkeypatch, captioner, tokens, pooled, cfg):
    """As Captioner runs it: under bf16 autocast when the weights are bf16."""
    with torch.autocast(captioner.device.type, dtype=torch.bfloat16, enabled=captioner.bf16):
        new = caption_generate.caption_features(captioner.model, tokens, pooled, cfg)
        old = reference_caption_features(monkeypatch, captioner.model, tokens, pooled, cfg)
    assert_same_hypotheses(new, old)
    assert all(row[0].finished and row[0].ids for row in new)  # real captions, ended by end-of-text


DEMO_CONFIGS = {"greedy": SamplingConfig(), "beam3": SamplingConfig(strategy="beam", num_beams=3),
                "beam3-nbest3": SamplingConfig(strategy="beam", num_beams=3, num_return_sequences=3)}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def cpu_demo(request):
    return demo_inputs("cpu", request.param)


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_captions_equal_the_reference(cpu_demo, monkeypatch, name):
    assert_demo_equals_the_reference(monkeypatch, *cpu_demo, DEMO_CONFIGS[name])


@pytest.fixture(scope="module")
def cpu_demo_fp32():
    return demo_inputs("cpu", "fp32")


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_captions_through_the_cpu_engine_equal_lm_steps(cpu_demo_fp32, monkeypatch, name):
    """The engine's prefill and step on the CPU (its C++ kernels, where they build) against the model's
    plain operations (VISION_RWKV_FUSED_STEP=0), in fp32: the same captions, scores within 1e-5. (With bf16
    weights the two round the products' inputs at different places, and ties flip: BENCHMARKS.md.)"""
    captioner, tokens, pooled = cpu_demo_fp32
    engine = caption_generate.caption_features(captioner.model, tokens, pooled, DEMO_CONFIGS[name])
    monkeypatch.setenv("VISION_RWKV_FUSED_STEP", "0")
    plain = caption_generate.caption_features(captioner.model, tokens, pooled, DEMO_CONFIGS[name])
    assert_same_hypotheses(engine, plain)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, names", [("fp32", sorted(DEMO_CONFIGS)), ("bf16", ["beam3", "beam3-nbest3"])])
def test_cuda_demo_captions_equal_the_reference(monkeypatch, dtype, names):
    """Graphs on. bf16 (caption.py's default on CUDA) for beam search only: its batch is the reference's at
    every step, so the very same kernels run on the same rows; a greedy batch shrinks LAG_STEPS steps later
    than the reference's, and bf16 products at another batch size may round a near-tie the other way."""
    inputs = demo_inputs("cuda", dtype)
    for name in names:
        assert_demo_equals_the_reference(monkeypatch, *inputs, DEMO_CONFIGS[name])


# ---- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_bad_token_ids_are_one_line(lm, strategy):
    logits, state = prefix(lm, 2)
    run = beam_search if strategy == "beam" else decode_loop
    beam = dict(num_beams=2) if strategy == "beam" else {}
    cfg = SamplingConfig(strategy=strategy, max_new_tokens=4, **beam)
    with pytest.raises(VisionRWKVError, match=r"stop tokens .* holds token id 97, outside the vocabulary; "
                                              r"expected ids in \[0, 97\)"):
        run(lm, logits, state, cfg, [0, 97])
    cfg.banned_tokens = [-1]
    with pytest.raises(VisionRWKVError, match=r"sampling.banned_tokens .* holds token id -1, outside"):
        run(lm, logits, state, cfg, [0])
    cfg.banned_tokens, cfg.min_new_tokens = list(range(1, 97)), 2
    with pytest.raises(VisionRWKVError, match="ban all 97 tokens of the vocabulary; expected at least one"):
        run(lm, logits, state, cfg, [0])


# ---- on a GPU ------------------------------------------------------------------------------------------------


@pytest.fixture
def cuda_lm():
    torch.manual_seed(0)
    return randomize_(RWKV7(tiny_config(vocab_size=211, wkv_impl="chunked"))).cuda().eval()


@pytest.mark.gpu
@cuda
def test_cuda_graphed_decoding_equals_the_reference(cuda_lm):
    """The real graphed stepper (vision_rwkv.lm.graphs), fp32: greedy with rows ending at different steps
    (the batch shrinks through power-of-two sizes, LAG_STEPS late), beam search, seeded sampling."""
    from vision_rwkv.lm.graphs import GraphedStep, rnn_stepper

    lm = cuda_lm
    logits, state = prefix(lm, 13)
    with torch.no_grad():  # as decoding runs: graphs are for inference only
        assert isinstance(rnn_stepper(lm), GraphedStep)
    stops = staggered_stops(lm, logits, state, 24)
    cfg = SamplingConfig(max_new_tokens=24)
    new_scores, old_scores = [], []
    new = decode_loop(lm, logits, state.clone(), cfg, stops, scores=new_scores)
    assert new == ref.decode_loop(lm, logits, state.clone(), cfg, stops, scores=old_scores)
    assert len({len(row) for row in new}) >= 4
    assert new_scores == pytest.approx(old_scores, rel=1e-5, abs=1e-5)
    with torch.no_grad():
        sizes = {key[0] for key in rnn_stepper(lm).graphs}  # graphs captured: (batch size, ...) keys
    assert 13 in sizes and len(sizes) >= 3 and all(s & (s - 1) == 0 for s in sizes - {13}), sizes
    for nb in (1, 3, 4):
        for cfg, stop in beam_cases(nb, stops):
            assert_same_hypotheses(beam_search(lm, logits, state.clone(), cfg, stop),
                                   ref.beam_search(lm, logits, state.clone(), cfg, stop))
    cfg = SamplingConfig(**SAMPLING, seed=5)
    assert decode_loop(lm, logits, state.clone(), cfg, stops) == decode_loop(lm, logits, state.clone(), cfg, stops)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cuda_decoding_of_20_tokens_waits_for_the_gpu_a_handful_of_times(cuda_lm, strategy):
    """The reference reads back at every token (so the count can fail); the new loops only at the end.
    Their lagged reads wait on events LAG_STEPS steps old, which sync debug mode does not count: those
    are counted apart, one per step at most."""
    lm, T = cuda_lm, 20
    logits, state = prefix(lm, 8)
    if strategy == "beam":
        cfg = SamplingConfig(strategy="beam", num_beams=3, max_new_tokens=T, min_new_tokens=T)
        loops = beam_search, ref.beam_search
    else:
        cfg = SamplingConfig(max_new_tokens=T, min_new_tokens=T)
        loops = decode_loop, ref.decode_loop
    new, old = ((lambda loop=loop: loop(lm, logits, state, cfg, [0])) for loop in loops)
    new(), old()  # graphs captured, kernels loaded
    torch.cuda.synchronize()
    assert readback.count_syncs(old) >= T
    waits = []
    original = torch.cuda.Event.synchronize

    def counted(event):
        waits.append(event)
        return original(event)

    torch.cuda.Event.synchronize = counted
    try:
        assert readback.count_syncs(new) <= 3
    finally:
        torch.cuda.Event.synchronize = original
    assert len(waits) <= T + 1
