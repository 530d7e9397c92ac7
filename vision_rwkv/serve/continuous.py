"""Step-level continuous batching for plain greedy requests: rows join the running decode at the next step
and leave as soon as they end.

With RNN states there is no cache to page: a row is its state. New images are encoded and prefilled on
their own, then their states are concatenated onto the running batch; finished rows are dropped by
indexing the state. Greedy decoding reads only a row's own logits, so a row's tokens and score are the
same whatever joins or leaves around it, and equal what decode_loop gives (argmax of the fp32 logits,
the log-probabilities summed in fp64, the stop token's included). Only the worker thread calls this.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..config import SamplingConfig, Strategy
from ..lm.graphs import rnn_stepper
from ..lm.state import DecoderState


def joins_running_batch(sampling: SamplingConfig) -> bool:
    """Plain greedy (any max_new_tokens, one caption, nothing banned or penalised) decodes row by row."""
    plain = SamplingConfig(strategy=Strategy.greedy, max_new_tokens=sampling.max_new_tokens)
    return dataclasses.replace(sampling, temperature=plain.temperature, seed=None) == plain


@dataclass
class _Row:
    job: object  # the scheduler's _Job
    index: int  # the image's place in its request
    max_new_tokens: int
    stop: frozenset
    ids: list
    logprob: float = 0.0


class RunningBatch:
    """The rows decoding now: their state (S rows), the logits their next token comes from, and whose they are."""

    def __init__(self, captioner):
        self.captioner = captioner
        self.rows: list[_Row] = []
        self.state: DecoderState | None = None
        self.logits: torch.Tensor | None = None  # (S,V)
        self.started: dict[int, float] = {}  # id(job) -> when it joined
        self._results: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _context(self):
        c = self.captioner
        return torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=c.bf16)

    @torch.no_grad()
    def admit(self, jobs) -> None:
        """Encode and prefill the jobs' images, and add their rows to the batch."""
        model = self.captioner.model
        images = torch.cat([job.images for job in jobs]).to(self.captioner.device)
        with self._context():
            tokens, pooled = model.encode(images)
            logits, state = model.prefill(tokens, pooled)  # (n,V)
        now = time.perf_counter()
        for job in jobs:
            self.started[id(job)] = now
            self._results[id(job)] = [None] * job.size
            stop = frozenset([model.eos_id, *job.sampling.stop_tokens])
            self.rows += [_Row(job, i, job.sampling.max_new_tokens, stop, []) for i in range(job.size)]
        self.state = state if self.state is None else DecoderState.cat([self.state, state])
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    @torch.no_grad()
    def step(self) -> list:
        """Choose every row's next token; rows that end leave. -> the jobs whose every row has now ended, as
        (job, captions per image, seconds since it joined, rows in the batch at this step)."""
        logits = self.logits.float()
        tokens = logits.argmax(dim=-1)  # (S,)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1).double()
        size = len(self.rows)
        keep, finished = [], []
        for slot, (row, token, lp) in enumerate(zip(self.rows, tokens.tolist(), logprobs.tolist())):
            row.logprob += lp
            if token in row.stop:
                finished.append(row)
                continue
            row.ids.append(token)
            if len(row.ids) >= row.max_new_tokens:
                finished.append(row)
            else:
                keep.append((slot, row))
        done = self._finish(finished, size)
        if keep:
            slots = torch.tensor([s for s, _ in keep], device=tokens.device)
            self.rows = [r for _, r in keep]
            with self._context():
                self.logits, self.state = self._step(tokens[slots], self.state[slots])
        else:
            self.rows, self.state, self.logits = [], None, None
        return done

    def _step(self, tokens: torch.Tensor, state: DecoderState):
        step = rnn_stepper(self.captioner.model.decoder)
        n = tokens.shape[0]
        if not getattr(step, "bucketed", False):
            return step(tokens, state)
        size = 1 << (n - 1).bit_length()  # graphs exist for powers of two: pad with copies of row 0
        pad = torch.zeros(size - n, dtype=torch.long, device=tokens.device)
        rows = torch.cat([torch.arange(n, device=tokens.device), pad])
        logits, state = step(tokens[rows], state[rows])
        return logits[:n], state[torch.arange(n, device=tokens.device)]

    def _finish(self, rows: list[_Row], size: int) -> list:
        done = []
        for row in rows:
            text = self.captioner.text(row.ids)
            results = self._results[id(row.job)]
            results[row.index] = [(text, float(row.logprob))]
            if all(r is not None for r in results):
                key = id(row.job)
                done.append((row.job, results, time.perf_counter() - self.started.pop(key), size))
                del self._results[key]
        return done
