"""The device-side decoding loop (lm/generate.py) against the loop it replaced (tests/decode_reference.py):
the same tokens, the same hypothesis lists, the same scores within fp32 rounding, through every kind of
step decoding meets (the CPU's fused EngineStepper, eager lm.step, and a stand-in for the CUDA graphs'
bucketed stepper), with the host reading its few values at once or LAG steps late as on CUDA.

Sampled draws equal the reference's while the batch shrinks at the same steps (on the CPU, where values
are read at once). Read late, as on CUDA, rows leave the batch a few steps later, so the exponential noise
a step draws for the whole batch has another shape and the draws differ; there the test holds the draws to
being reproducible, and equal to the reference's as long as no row has ended.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_reference, when run from elsewhere
import decode_reference as ref  # noqa: E402

import vision_rwkv.caption.generate as caption_generate  # noqa: E402
from vision_rwkv import RWKV7, SamplingConfig, VisionRWKVError  # noqa: E402
from vision_rwkv.lm import generate as generate_module  # noqa: E402
from vision_rwkv.lm import readback  # noqa: E402
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
    """Put both the new loop and the reference on the given stepper, and read back with the given lag."""
    name, lag = request.param
    make = STEPPERS[name]
    if make is not None:
        for module in (generate_module, ref):
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


# ---- the demo model, through caption_features -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_features():
    from PIL import Image

    from vision_rwkv import Captioner

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("shapes_test_*.png"))
    model = Captioner.load(device="cpu", dtype="fp32").model
    with torch.no_grad():
        x = torch.stack([model.encoder.preprocess(Image.open(p).convert("RGB")) for p in examples])
        return model, *model.encode(x)


def reference_caption_features(monkeypatch, model, tokens, pooled, cfg):
    """caption_features as it ran before: the same prefill, the reference loops."""
    with monkeypatch.context() as m:
        for name in ("decode_loop", "Hypothesis", "rank_score"):
            m.setattr(caption_generate, name, getattr(ref, name))
        return caption_generate.caption_features(model, tokens, pooled, cfg)


def test_demo_captions_equal_the_reference(demo_features, monkeypatch):
    model, tokens, pooled = demo_features
    cfg = SamplingConfig()
    new = caption_generate.caption_features(model, tokens, pooled, cfg)
    old = reference_caption_features(monkeypatch, model, tokens, pooled, cfg)
    assert_same_hypotheses(new, old)
    assert all(row[0].finished and row[0].ids for row in new)  # real captions, ended by end-of-text


# ---- bad input ------------------------------------------------------------------------------------------


def test_bad_token_ids_are_one_line(lm):
    logits, state = prefix(lm, 2)
    run = decode_loop
    cfg = SamplingConfig(max_new_tokens=4)
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
    (the batch shrinks through power-of-two sizes, LAG_STEPS late), seeded sampling."""
    from vision_rwkv.lm.graphs import GraphedStep, rnn_stepper

    lm = cuda_lm
    logits, state = prefix(lm, 13)
    assert isinstance(rnn_stepper(lm), GraphedStep)
    stops = staggered_stops(lm, logits, state, 24)
    cfg = SamplingConfig(max_new_tokens=24)
    new_scores, old_scores = [], []
    new = decode_loop(lm, logits, state.clone(), cfg, stops, scores=new_scores)
    assert new == ref.decode_loop(lm, logits, state.clone(), cfg, stops, scores=old_scores)
    assert len({len(row) for row in new}) >= 4
    assert new_scores == pytest.approx(old_scores, rel=1e-5, abs=1e-5)
    cfg = SamplingConfig(**SAMPLING, seed=5)
    assert decode_loop(lm, logits, state.clone(), cfg, stops) == decode_loop(lm, logits, state.clone(), cfg, stops)


def count_syncs(fn) -> int:
    """How many synchronizing CUDA calls fn makes, as torch's sync debug mode sees them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.gpu
@cuda
def test_cuda_decoding_of_20_tokens_waits_for_the_gpu_a_handful_of_times(cuda_lm):
    """The reference reads back at every token (so the count can fail); the new loop only at the end.
    Their lagged reads wait on events LAG_STEPS steps old, which sync debug mode does not count: those
    are counted apart, one per step at most."""
    lm, T = cuda_lm, 20
    logits, state = prefix(lm, 8)
    cfg = SamplingConfig(max_new_tokens=T, min_new_tokens=T)
    loops = decode_loop, ref.decode_loop
    new, old = ((lambda loop=loop: loop(lm, logits, state, cfg, [0])) for loop in loops)
    new(), old()  # graphs captured, kernels loaded
    torch.cuda.synchronize()
    assert count_syncs(old) >= T
    waits = []
    original = torch.cuda.Event.synchronize

    def counted(event):
        waits.append(event)
        return original(event)

    torch.cuda.Event.synchronize = counted
    try:
        assert count_syncs(new) <= 3
    finally:
        torch.cuda.Event.synchronize = original
    assert len(waits) <= T + 1
