"""The decoder on CUDA as one graph launch per RNN step, and per image-prefix prefill.

One RNN step of an RWKV-7 decoder is a long chain of small kernels (about a hundred per layer: the
mixes, the low-rank paths, the WKV update, norms, the channel mix). Launched one by one from Python, the CPU
needs far longer to issue them than the GPU needs to run them, so a step costs the same at batch 1 and
batch 256. A CUDA graph captures the chain once per batch size and replays it with a single launch.
The GPT-mode prefill of an image prefix is the same chain over the prefix's positions, and equally
launch-bound at small batches; it is captured per (batch size, prefix length) up to
MAX_PREFILL_TOKENS tokens.

    step = rnn_stepper(lm)              # the C++ step on the CPU; lm.step when graphs are switched off
    logits, state = step(tokens, state)
    logits, state = prefill_runner(lm)(inputs_embeds, state)   # = lm(inputs_embeds=..., state=..., last_only=True)
    tokens, pooled = encoder_runner(encoder)(images)           # = encoder(images), small batches only

The step a graph captures is the fused one (engine.StepEngine: about eleven launches a layer instead of
about eighty) unless VISION_RWKV_FUSED_STEP=0, which captures lm.step's plain PyTorch operations instead.
The prefill likewise runs the same family of fused operations in GPT mode (StepEngine.prefill), or lm(...)
itself with VISION_RWKV_FUSED_STEP=0.
The fused step is RWKV-7's; an RWKV-4 decoder's graphs capture lm.step's operations (lm/decoder.py is
the interface both follow). On the CPU both have a step of C++ kernels (engine.EngineStepper; RWKV-4's
is engine4.Step4Engine), and RWKV-7 a prefill through the same packed weights.

Contract (what caption_features, decode_loop and beam_search rely on; not a public API):
- the prefill and the step give lm(...)'s and lm.step's results: exactly with plain operations, and
  within the bounds tests/ops/test_rwkv7_step.py measures with the fused ones;
- the state a step returns is the graph's own buffer: it stays valid only until the next call for the
  same batch size, so select rows from it (state[rows], which copies) before keeping it across calls;
  the prefill returns its own copy;
- logits are returned as a fresh tensor;
- graphs are kept per decoder, shape and autocast setting, and captured again when the decoder's
  weights move (a .to(), a load that replaces tensors). In-place weight updates need nothing (the fused
  step packs its weights again, into the same buffers).

VISION_RWKV_CUDA_GRAPHS=0 switches graphs off (everything then runs eagerly, as lm.step).
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch

from ..ops._build import CPU_KERNELS_OFF
from ..ops.rwkv7 import cpu_step, unavailable_reason
from . import engine4
from .decoder import Decoder
from .engine import EngineStepper, StepEngine, compute_dtype, weights_fingerprint
from .rwkv4 import RWKV4
from .rwkv7 import RWKV7
from .state import DecoderState

# batch x prefix length above this prefills eagerly: on an H100 (bench/prefill.py, 196-position prefix,
# L12-D768) a graph made the prefill 3.5x faster at batch 1 and 2.2x at 8, and nothing at 32 or 64,
# where the GPU work already exceeds the launch overhead; a graph also keeps its activations' memory
MAX_PREFILL_TOKENS = 4096

_steppers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_prefills: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_encoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# images per call up to which the image encoder replays a graph: at batch 1 on an H200 the eager ViT-B-16
# took 13 ms (bench/caption_throughput.py, 2026-12-04), the host issuing kernels; from a few dozen images on
# the GPU work dominates, and every batch size kept would hold a graph's activations
MAX_ENCODER_GRAPH_BATCH = 16
_cpu_steppers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_failed: set[str] = set()
_warned: set[str] = set()


def fused_step_enabled() -> bool:
    return os.environ.get("VISION_RWKV_FUSED_STEP", "1") != "0"


def graphs_enabled() -> bool:
    return os.environ.get("VISION_RWKV_CUDA_GRAPHS", "1") != "0" and not _failed


def _graphable(lm: Decoder) -> bool:
    return lm.emb.weight.device.type == "cuda" and not lm.training and not torch.is_grad_enabled() \
        and graphs_enabled()


def rnn_stepper(lm: Decoder):
    """A callable (tokens (B,), state) -> (logits (B,V), state): graph replays on CUDA, the fused step
    without graphs on the CPU (engine.EngineStepper), lm.step when training or switched off."""
    if not _graphable(lm):
        stepper = _cpu_stepper(lm)
        return lm.step if stepper is None else stepper
    stepper = _steppers.get(lm)
    if stepper is None:
        stepper = _steppers[lm] = GraphedStep(lm)
    stepper.check_weights()
    return stepper


def _cpu_stepper(lm: Decoder) -> EngineStepper | None:
    """The engine that runs a decoder's inference on the CPU, or None when lm's plain operations should:
    training, autograd on, or VISION_RWKV_FUSED_STEP=0. RWKV-7: the fused step, and the prefill through the
    same packed weights. RWKV-4: the C++ step (engine4), where its kernels can run (else None, said once)."""
    if not (isinstance(lm, (RWKV7, RWKV4)) and lm.emb.weight.device.type == "cpu" and fused_step_enabled()
            and not lm.training and not torch.is_grad_enabled()):
        return None
    if isinstance(lm, RWKV4):
        reason = engine4.unavailable_reason(lm)
        if reason is not None:  # a failed build says so once; fp16, and the kernels switched off, quietly
            if reason == cpu_step.build() and reason != CPU_KERNELS_OFF and reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"vision_rwkv: the RWKV-4 step runs lm.step on the CPU: {reason}", stacklevel=3)
            return None
    stepper = _cpu_steppers.get(lm)
    if stepper is None:
        stepper = _cpu_steppers[lm] = EngineStepper(lm, engine4.Step4Engine if isinstance(lm, RWKV4) else None)
    return stepper


def prefill_runner(lm: Decoder):
    """A callable (inputs_embeds (B,T,C), initial state or None) -> (last-position logits (B,V), state), as
    lm(inputs_embeds=x, state=state, last_only=True): graph replays on CUDA for up to MAX_PREFILL_TOKENS
    tokens; the engine's prefill on the CPU (engine.EngineStepper.prefill)."""
    if not _graphable(lm):
        stepper = _cpu_stepper(lm) if isinstance(lm, RWKV7) else None  # RWKV-4's engine is the step's alone
        if stepper is not None:
            return stepper.prefill
        return lambda x, state=None: lm(inputs_embeds=x, state=state, last_only=True)
    runner = _prefills.get(lm)
    if runner is None:
        runner = _prefills[lm] = GraphedPrefill(lm)
    runner.check_weights()
    return runner


def encoder_runner(encoder: torch.nn.Module):
    """A callable images (B,3,H,W) -> encoder(images): graph replays on CUDA for up to MAX_ENCODER_GRAPH_BATCH
    images (a frozen encoder in eval mode, no autograd), the encoder itself otherwise."""
    p = next(encoder.parameters(), None)
    if p is None or p.device.type != "cuda" or encoder.training or torch.is_grad_enabled() or not graphs_enabled():
        return encoder
    runner = _encoders.get(encoder)
    if runner is None:
        runner = _encoders[encoder] = GraphedEncoder(encoder)
    runner.check_weights()
    return runner


class _Graph:
    def __init__(self, graph, inputs, outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


def _free_cublas_workspaces() -> None:
    """Drop cuBLAS's per-stream workspaces (the next product on a stream makes a new one)."""
    torch._C._cuda_clearCublasWorkspaces()


class _Graphs:
    """Captured graphs of one decoder, by key; the capture itself (warm-up, stream, autocast)."""

    def __init__(self, lm: Decoder):
        self.lm = lm
        self.graphs: dict[tuple, _Graph] = {}
        self.weights: tuple = ()

    def check_weights(self, version: tuple | None = None) -> tuple:
        """Drop the graphs if any weight tensor was moved or replaced: they read weights by address.
        version: engine.weights_fingerprint(self.lm), if the caller has just taken it. -> that fingerprint."""
        version = weights_fingerprint(self.lm) if version is None else version
        if version[0] != self.weights:
            self.graphs.clear()
            self.weights = version[0]
            self.weights_moved()
        return version

    def weights_moved(self) -> None:
        pass

    def _get(self, key: tuple, make_inputs, run) -> _Graph | None:
        """The graph for key, captured on first use from run(*inputs); None if capturing failed."""
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self.graphs[key] = self._capture(make_inputs(), run)
            except RuntimeError as e:  # e.g. out of memory while capturing: carry on eagerly
                _failed.add(str(e))
                warnings.warn(f"vision_rwkv: CUDA graph capture failed, the decoder runs eagerly: "
                              f"{str(e).splitlines()[0]}", stacklevel=4)
                return None
        return g

    def _device(self) -> torch.device:
        return self.lm.emb.weight.device

    def _capture(self, inputs: tuple, run) -> _Graph:
        device = self._device()
        autocast, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

        def body():
            # autocast's weight-cast cache would hand the graph tensors that die with the context
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
                return run(*inputs)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS workspaces, allocator pools, kernels
            for _ in range(2):
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # cuBLAS keeps a workspace per stream, made at first use, and anyone may free them all
        # (torch.compile's CUDA graphs do before each capture). One made by the warm-up lies in the shared
        # pool: once freed, its memory goes to other tensors, or back to the driver, while this graph's
        # products still write there (silent corruption, or an illegal address: seen on an H200 after a
        # compiled GPT-2 ran in the same process). Freed now, the capture makes its own inside the graph's
        # private pool, which nothing else allocates from; freed again after, so eager work on this stream
        # never shares it with the graph.
        _free_cublas_workspaces()
        # thread_local: other threads (a DataLoader's pin-memory thread) may keep calling CUDA while
        # this thread captures; the default "global" mode makes their calls fail mid-capture.
        # stream=side: the warmed-up stream of the model's GPU (torch's shared default capture stream
        # belongs to whichever GPU was current when it was first made)
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            outputs = body()
        _free_cublas_workspaces()
        return _Graph(graph, inputs, outputs)

    @staticmethod
    def _autocast_key() -> tuple:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class GraphedStep(_Graphs):
    bucketed = True  # decode_loop keeps power-of-two batches, so a few graphs serve a whole decode

    def __init__(self, lm: Decoder):
        super().__init__(lm)
        self.engines: dict[torch.dtype, StepEngine] = {}  # by compute dtype

    def weights_moved(self) -> None:
        self.engines.clear()

    def check_weights(self, version: tuple | None = None) -> tuple:
        version = super().check_weights(version)
        for engine in self.engines.values():
            engine.sync(version)  # values changed in place: packed again into the buffers the graphs read
        return version

    def _engine(self) -> StepEngine | None:
        """The fused step for the current compute dtype, or None (graphs then capture lm.step's operations)."""
        if not fused_step_enabled() or not isinstance(self.lm, RWKV7):
            return None  # the fused step is RWKV-7's; other generations capture lm.step's operations
        cfg = self.lm.config
        reason = unavailable_reason(self.lm.emb.weight.device, cfg.head_size, cfg.n_embd)
        if reason is not None:
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"vision_rwkv: the fused RNN step cannot run ({reason}); decoding captures "
                              f"lm.step's plain operations", stacklevel=4)
            return None
        dtype = compute_dtype(self.lm)
        if dtype not in self.engines:
            self.engines[dtype] = StepEngine(self.lm, dtype)
        return self.engines[dtype]

    def __call__(self, tokens: torch.Tensor, state: DecoderState | None):
        # capture and replay on the model's GPU, whichever is current (a torchrun process on cuda:1
        # that never called set_device still has cuda:0 current)
        with torch.cuda.device(self.lm.emb.weight.device):
            return self._call(tokens, state)

    def _call(self, tokens: torch.Tensor, state: DecoderState | None):
        lm, B = self.lm, tokens.shape[0]

        def make_inputs():
            return torch.zeros(B, dtype=torch.long, device=lm.emb.weight.device), lm.init_state(B)

        engine = self._engine()

        def run(tok, st):
            if engine is not None:
                return engine.step(tok, st)  # updates st in place
            logits, new = lm.step_unchecked(tok, st)
            st.copy_(new)
            return logits

        g = self._get((B, engine is not None, *self._autocast_key()), make_inputs, run)
        if g is None:
            return lm.step(tokens, state)
        g_tokens, g_state = g.inputs
        state = lm.state_for(state, B)  # what lm.step does: a fresh state for None, else the checks
        g_tokens.copy_(tokens)
        if state is not g_state:
            g_state.copy_(state)
        g.graph.replay()
        return g.outputs.clone(), g_state


class GraphedPrefill(_Graphs):
    """The prefill, captured per (shape, dtype, autocast, whether an initial state is given): a state
    projector's state is copied into the graph's own state buffer, like the embeddings. An RWKV-7 decoder's
    prefill runs the fused operations (engine.StepEngine.prefill) unless VISION_RWKV_FUSED_STEP=0, as the step
    does; above MAX_PREFILL_TOKENS it runs them eagerly, with no graph."""

    def __call__(self, x: torch.Tensor, state: DecoderState | None = None):
        lm = self.lm
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.device != lm.emb.weight.device:
            return lm(inputs_embeds=x, state=state, last_only=True)  # lm's own checks and one-line errors
        with torch.cuda.device(lm.emb.weight.device):
            lm.checked_inputs(None, x)  # the shape checks lm(...) makes, before anything is captured
            if state is not None:
                state = lm.state_for(state, x.shape[0])
            engine = self._engine()

            def run(xs, *st):
                if engine is None:
                    return lm(inputs_embeds=xs, state=st[0] if st else None, last_only=True)
                own = st[0] if st else lm.init_state(xs.shape[0])  # in place: a graph's input buffer
                return engine.prefill(xs, own), own

            if x.shape[0] * x.shape[1] > MAX_PREFILL_TOKENS:  # too big to keep a graph for: eagerly
                if engine is None:
                    return lm(inputs_embeds=x, state=state, last_only=True)
                return engine.prefill_from(x, state)

            def make_inputs():
                return (torch.zeros_like(x),) + (() if state is None else (lm.init_state(x.shape[0]),))

            key = (tuple(x.shape), x.dtype, x.device, state is not None, engine is not None, *self._autocast_key())
            g = self._get(key, make_inputs, run)
            if g is None:
                return lm(inputs_embeds=x, state=state, last_only=True)
            g.inputs[0].copy_(x)
            if state is not None:
                g.inputs[1].copy_(state)
            g.graph.replay()
            logits, state = g.outputs
            return logits.clone(), state.clone()

    def check_weights(self, version: tuple | None = None) -> tuple:
        """Its own graphs' check, and the step's, whose engine (the packed weights) the prefill shares: one
        walk of the weights for both."""
        version = super().check_weights(version)
        return self._step().check_weights(version)

    def _step(self) -> GraphedStep:
        step = _steppers.get(self.lm)
        if step is None:
            step = _steppers[self.lm] = GraphedStep(self.lm)
        return step

    def _engine(self) -> StepEngine | None:
        """The fused operations' engine, shared with the decoder's RNN step (one packing of the weights;
        prefill_runner checked the weights before handing this runner out)."""
        return self._step()._engine()


class GraphedEncoder(_Graphs):
    """The image encoder, captured per (input shape, dtype, autocast setting) up to MAX_ENCODER_GRAPH_BATCH
    images; larger batches, and inputs the encoder rejects, run it eagerly (its own one-line errors)."""

    def _device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def __call__(self, images: torch.Tensor):
        encoder, device = self.lm, self._device()
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.device != device \
                or images.shape[0] > MAX_ENCODER_GRAPH_BATCH or tuple(images.shape[1:]) != (3, *encoder.image_size):
            return encoder(images)
        with torch.cuda.device(device):
            key = (tuple(images.shape), images.dtype, *self._autocast_key())
            g = self._get(key, lambda: (torch.zeros_like(images),), encoder)
            if g is None:
                return encoder(images)
            g.inputs[0].copy_(images)
            g.graph.replay()
            return tuple(t.clone() for t in g.outputs)
