"""Step-level continuous batching for greedy and sampling requests: rows join the running decode at the next
step and leave as soon as they end.

With RNN states there is no cache to page: a row is its state. New images are encoded and prefilled on
their own, then their states are concatenated onto the running batch; finished rows are dropped by
indexing the state. Every row chooses its next token from its own logits with its own settings: plain
greedy rows together by one argmax; any other row (sampling, bans, penalties, min_new_tokens) through a
TokenChooser of its own, with its own generator. A seeded request's rows take their generators from its
seed (row k of image i, of n sequences an image: seed + i * n + k), so its captions do not depend on what
else decodes beside it. Scores are the log-probabilities of the chosen tokens under the model's own
distribution, summed in fp64, the stop token's included, as decode_loop reports them. Beam search ranks
hypotheses across a row's beams and runs whole, between two steps. Only the worker thread calls this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import SamplingConfig, Strategy
from ..lm.graphs import rnn_stepper
from ..lm.sampling import TokenChooser
from ..lm.state import DecoderState


def joins_running_batch(sampling: SamplingConfig) -> bool:
    """Greedy and sampling requests decode row by row; beam search does not."""
    return sampling.strategy != Strategy.beam


def _greedy(sampling: SamplingConfig) -> bool:
    return sampling.strategy == Strategy.greedy or sampling.temperature == 0


def _plain_greedy(sampling: SamplingConfig) -> bool:
    """Greedy with nothing banned, penalised or held back: one argmax over the whole batch serves it."""
    return _greedy(sampling) and not sampling.banned_tokens and not sampling.presence_penalty \
        and not sampling.frequency_penalty and not sampling.min_new_tokens


def sequences(sampling: SamplingConfig) -> int:
    """Captions an image gets: num_return_sequences draws when sampling, one when greedy."""
    return 1 if _greedy(sampling) else sampling.num_return_sequences


@dataclass
class _Row:
    job: object  # the scheduler's _Job
    index: int  # the image's place in its request
    max_new_tokens: int
    min_new_tokens: int
    stop: tuple
    ids: list
    chooser: TokenChooser | None = None  # None: plain greedy, chosen with every other such row at once
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
        now, first, picks = time.perf_counter(), 0, []
        vocab, device = logits.shape[-1], logits.device
        for job in jobs:
            cfg, n = job.sampling, sequences(job.sampling)
            self.started[id(job)] = now
            self._results[id(job)] = [[] for _ in range(job.size)]
            stop = tuple(sorted({model.eos_id, *cfg.stop_tokens}))
            for i in range(job.size):
                for k in range(n):
                    chooser = None
                    if not _plain_greedy(cfg):
                        generator = None if cfg.seed is None else \
                            torch.Generator(device=device).manual_seed(cfg.seed + i * n + k)
                        chooser = TokenChooser(cfg, 1, vocab, device, generator)
                    self.rows.append(_Row(job, i, cfg.max_new_tokens, cfg.min_new_tokens, stop, [], chooser))
                    picks.append(first + i)
            first += job.size
        if len(picks) != first:  # some image gets several draws: repeat its row once per sequence
            rows = torch.tensor(picks, device=device)
            state, logits = state[rows], logits[rows]
        self.state = state if self.state is None else DecoderState.cat([self.state, state])
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    @torch.no_grad()
    def step(self) -> list:
        """Choose every row's next token; rows that end leave. -> the jobs whose every row has now ended, as
        (job, captions per image, seconds since it joined, rows in the batch at this step)."""
        logits = self.logits.float()
        tokens = logits.argmax(dim=-1)  # (S,): every plain greedy row's choice
        for slot, row in enumerate(self.rows):
            if row.chooser is not None:  # its own settings and generator, from its own logits
                held = row.stop if len(row.ids) < row.min_new_tokens else ()
                token = row.chooser.choose(logits[slot:slot + 1], held)
                row.chooser.update(token)
                tokens[slot] = token[0]
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
            results[row.index].append((text, float(row.logprob)))
            n = sequences(row.job.sampling)
            if all(len(r) == n for r in results):
                key = id(row.job)
                results = [sorted(r, key=lambda c: -c[1]) for r in results]  # best first, as Captioner ranks
                done.append((row.job, results, time.perf_counter() - self.started.pop(key), size))
                del self._results[key]
        return done
