"""RNN mode on CUDA as one graph launch per step.

One RNN step of an RWKV-7 decoder is a long chain of small kernels (about a hundred per layer: the
mixes, the low-rank paths, the WKV update, norms, the channel mix). Launched one by one from Python, the CPU
needs far longer to issue them than the GPU needs to run them, so a step costs the same at batch 1 and
batch 256. A CUDA graph captures the chain once per batch size and replays it with a single launch.

    step = rnn_stepper(lm)              # lm.step itself on the CPU, or when graphs are switched off
    logits, state = step(tokens, state)

Contract (what decode_loop and beam_search rely on; not a public API):
- same results as lm.step (the same kernels run, in the same order);
- the returned state is the graph's own buffer: it stays valid only until the next call for the same
  batch size, so select rows from it (state[rows], which copies) before keeping it across calls;
- logits are returned as a fresh tensor;
- graphs are kept per decoder, batch size and autocast setting, and captured again when the
  decoder's weights move (a .to(), a load that replaces tensors). In-place weight updates need nothing.

VISION_RWKV_CUDA_GRAPHS=0 switches graphs off (every step then runs eagerly, as lm.step).
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch

from .rwkv7 import RWKV7
from .state import RWKVState

_steppers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_failed: set[str] = set()


def graphs_enabled() -> bool:
    return os.environ.get("VISION_RWKV_CUDA_GRAPHS", "1") != "0" and not _failed


def rnn_stepper(lm: RWKV7):
    """A callable (tokens (B,), state) -> (logits (B,V), state): graph replays on CUDA, lm.step elsewhere."""
    if lm.emb.weight.device.type != "cuda" or lm.training or torch.is_grad_enabled() or not graphs_enabled():
        return lm.step
    stepper = _steppers.get(lm)
    if stepper is None:
        stepper = _steppers[lm] = GraphedStep(lm)
    stepper.check_weights()
    return stepper


class _Graph:
    def __init__(self, graph, tokens, state, logits):
        self.graph, self.tokens, self.state, self.logits = graph, tokens, state, logits


class GraphedStep:
    def __init__(self, lm: RWKV7):
        self.lm = lm
        self.graphs: dict[tuple, _Graph] = {}
        self.weights: tuple = ()

    def check_weights(self) -> None:
        """Drop the graphs if any weight tensor was replaced: they read weights by address."""
        now = tuple((p.data_ptr(), p.dtype) for p in self.lm.parameters())
        if now != self.weights:
            self.graphs.clear()
            self.weights = now

    def __call__(self, tokens: torch.Tensor, state: RWKVState | None):
        # capture and replay on the model's GPU, whichever is current (a torchrun process on cuda:1
        # that never called set_device still has cuda:0 current)
        with torch.cuda.device(self.lm.emb.weight.device):
            return self._call(tokens, state)

    def _call(self, tokens: torch.Tensor, state: RWKVState | None):
        B = tokens.shape[0]
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (B, *autocast)
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self.graphs[key] = self._capture(B, *autocast)
            except RuntimeError as e:  # e.g. out of memory while capturing: carry on eagerly
                _failed.add(str(e))
                warnings.warn(f"vision_rwkv: CUDA graph capture failed, RNN mode runs eagerly: "
                              f"{str(e).splitlines()[0]}", stacklevel=3)
                return self.lm.step(tokens, state)
        state = self.lm._state_for(state, B)  # what lm.step does: a fresh state for None, else the checks
        g.tokens.copy_(tokens)
        if state is not g.state:
            g.state.att_shift.copy_(state.att_shift)
            g.state.wkv.copy_(state.wkv)
            g.state.ffn_shift.copy_(state.ffn_shift)
        g.graph.replay()
        return g.logits.clone(), g.state

    def _capture(self, B: int, autocast: bool, dtype: torch.dtype) -> _Graph:
        lm = self.lm
        device = lm.emb.weight.device
        tokens = torch.zeros(B, dtype=torch.long, device=device)
        state = lm.init_state(B)

        def step():
            # autocast's weight-cast cache would hand the graph tensors that die with the context
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
                logits, new = lm._step_unchecked(tokens, state)
            state.att_shift.copy_(new.att_shift)
            state.wkv.copy_(new.wkv)
            state.ffn_shift.copy_(new.ffn_shift)
            return logits

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS workspaces, allocator pools
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a DataLoader's pin-memory thread) may keep calling CUDA while
        # this thread captures; the default "global" mode makes their calls fail mid-capture.
        # stream=side: the warmed-up stream of the model's GPU (torch's shared default capture stream
        # belongs to whichever GPU was current when it was first made)
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            logits = step()
        return _Graph(graph, tokens, state, logits)
