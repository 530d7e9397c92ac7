"""Step-level continuous batching for greedy and sampling requests: rows join the running decode at the next
step and leave as soon as they end.

With RNN states there is no cache to page: a row is its state, kept in a slot of a state buffer whose
capacity is a power of two. New images are encoded and prefilled on their own, then their states and logits
are written into free slots (the capacity doubling first when none is free); a finished row just frees its
slot. The stepper runs on the whole capacity, so on CUDA one bucketed graph serves it with no padding and
the state stays the graph's own buffer between steps: a steady batch copies no state. Free slots step on
token 0 and their results are ignored. Only when the live rows fit in a quarter of the capacity is the buffer
compacted, with one gather, to twice their bucket; when no row is left, the buffers go.

On CUDA a join runs as graph replays only: its images go through the encoder and the prefill in chunks of
join_chunk() images, the size both graphs take, and what is left is padded to a power of two (a few graphs
serve every join; warm_up captures them). An eager encode or prefill launches hundreds of kernels, each from a
torch call that gives up the GIL and must win it back from the HTTP side's threads. On an H200 under load
(bench/serve_load.py's worker figures, 2026-12-04) a join of 64 images took about 105 ms eagerly and 77 to 93
ms in chunks of graphs, against 33 to 38 ms for the chunks alone (bench/serve_worker.py).

On CUDA, joins also overlap the decode (overlap=True, the server's default): launch() queues a join's encode
and prefill on a low-priority stream of its own and returns, the worker goes on stepping the running rows on
its higher-priority stream, and place_next() writes the new rows into their slots at the first step after
the join has finished (the worker's stream waits for the join's event on the device; the host never blocks
on it). Under load a join of about 30 images took 29 ms of the worker's time, 72% of it, while every
decoding row waited (an H200, bench/serve_load.py, 2026-12-04); overlapped, the decode goes on meanwhile,
though each step beside a join takes 1.9 to 2.6 times as long (BENCHMARKS.md, joins overlapping the
decode).

Every row chooses its next token from its own logits with its own settings: plain greedy rows together by one
argmax over all slots on the device; any other row (sampling, bans, penalties, min_new_tokens) through a
TokenChooser of its own, with its own generator. A seeded request's rows take their generators from its
seed (row k of image i, of n sequences an image: seed + i * n + k), so its captions do not depend on what
else decodes beside it. Scores are the log-probabilities of the chosen tokens under the model's own
distribution, summed in fp64, the stop token's included, as decode_loop reports them; the tokens and scores
of a step come back to the host in one read, and only the live rows are then looked at in Python; on CUDA the
step on those tokens is launched before that read (pipelined, see step()), so the device runs it while the
host books them. Beam search
ranks hypotheses across a row's beams and runs whole, between two steps. Only the worker thread calls this.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..config import SamplingConfig, Strategy
from ..lm.graphs import MAX_ENCODER_GRAPH_BATCH, MAX_PREFILL_TOKENS, graphs_enabled, rnn_stepper
from ..lm.readback import HostCopy, to_device
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


def _bucket(n: int) -> int:
    """The smallest power of two that holds n rows."""
    return 1 << max(n - 1, 0).bit_length()


def pads_joins(captioner) -> bool:
    """Whether a join runs in graph-sized chunks, padded (with CUDA graphs: a graph per size)."""
    return captioner.device.type == "cuda" and graphs_enabled()


def join_chunk(captioner) -> int:
    """Images a padded join encodes and prefills at once: the largest power of two that both the encoder's and
    the prefill's graphs take (lm.graphs: MAX_ENCODER_GRAPH_BATCH images, MAX_PREFILL_TOKENS prefix tokens)."""
    model = captioner.model
    most = min(MAX_ENCODER_GRAPH_BATCH, MAX_PREFILL_TOKENS // (model.prefix_len + len(model.prompt_ids)))
    return 1 << (max(most, 1).bit_length() - 1)


def _padded(n: int, chunk: int) -> int:
    """The images a padded join of n runs: whole chunks, then what is left padded to a power of two (so every
    piece prefill_images runs is a power of two up to the chunk: 22 images with chunks of 16 run 16 + 8)."""
    whole = n // chunk * chunk
    return whole + (_bucket(n - whole) if n > whole else 0)


@torch.no_grad()
def warm_up(captioner, max_rows: int) -> None:
    """Run, untimed, every shape a RunningBatch of up to max_rows rows uses: the encoder and prefill at each
    number of images they take at once (where joins are padded, each power of two up to join_chunk() or
    max_rows' bucket, the smaller; 1..max_rows otherwise), and the step at each power-of-two capacity up to
    max_rows' bucket, under the autocast it runs with. On CUDA this captures their graphs and grows the
    allocator's pools before the first request rather than during it. Call it before serving: it uses the
    decoder's stepper, which only the worker thread may touch once requests flow."""
    model, device = captioner.model, captioner.device
    size = model.encoder.image_size
    context = torch.autocast(device.type, dtype=torch.bfloat16, enabled=captioner.bf16)
    joins = [1 << k for k in range(_bucket(min(max_rows, join_chunk(captioner))).bit_length())] \
        if pads_joins(captioner) else range(1, max_rows + 1)
    with context:
        for n in joins:
            model.prefill_images(torch.zeros(n, 3, *size, device=device))
        step, capacity = rnn_stepper(model.decoder), 1
        while capacity <= _bucket(max_rows):
            logits, _ = step(torch.zeros(capacity, dtype=torch.long, device=device),
                             model.decoder.init_state(capacity))
            torch.log_softmax(logits.float(), dim=-1).argmax(dim=-1).tolist()
            capacity *= 2


_join_streams: dict[torch.device, torch.cuda.Stream] = {}
_worker_streams: dict[torch.device, torch.cuda.Stream] = {}


def _can_overlap(device: torch.device) -> bool:
    return device.type == "cuda"


def join_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream overlapped joins run on: the lowest priority, so the decode's kernels go first."""
    if device not in _join_streams:
        _join_streams[device] = torch.cuda.Stream(device, priority=0)
    return _join_streams[device]


def worker_stream(device: torch.device):
    """A context running the batching worker's own work on a stream of higher priority than the joins'
    (CUDA; elsewhere it does nothing). The worker enters it once, for its whole life."""
    if device.type != "cuda":
        return nullcontext()
    if device not in _worker_streams:
        _worker_streams[device] = torch.cuda.Stream(device, priority=-1)
    return torch.cuda.stream(_worker_streams[device])


def _pixels(jobs, pinned: bool) -> torch.Tensor:
    """The jobs' images in one tensor; pinned: in page-locked memory, so that the copy to the device is queued
    and returns (from pageable memory the host copies through a staging buffer and waits). On one H200 host a
    launch of 16 float32 images from pageable memory took 15 ms of a 21 ms join (bench/serve_worker.py,
    2026-12-04); the copy is the likely cause, not measured apart."""
    images = [job.images for job in jobs]
    if not pinned:
        return torch.cat(images)
    out = torch.empty((sum(i.shape[0] for i in images), *images[0].shape[1:]), dtype=images[0].dtype,
                      pin_memory=True)
    return torch.cat(images, out=out)


@dataclass
class _Join:
    """A join launched and not yet placed: its jobs, and the logits (n,V) fp32 and states of their images
    (one row per image), ready once `done` has fired (None: computed already)."""

    jobs: list
    logits: torch.Tensor
    state: DecoderState
    done: torch.cuda.Event | None

    def ready(self) -> bool:
        return self.done is None or self.done.query()


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
    order: int = 0  # when it joined, among all rows: rows ending at the same step are answered in this order


class RunningBatch:
    """The rows decoding now, each in a slot of capacity-sized buffers: the state (C rows), the logits (C,V)
    their next tokens come from, and which row each slot holds (None: free).

    overlap: joins run on a stream of their own (CUDA only; elsewhere launch() computes the join at once).
    Either way place_next() then writes its rows into free slots: admit() does both at once."""

    def __init__(self, captioner, overlap: bool = False, pipelined: bool | None = None):
        """pipelined: launch each step before reading back the tokens it steps on (see step(); None: on CUDA,
        where the device then runs the step while the host reads and books the tokens)."""
        self.captioner = captioner
        self.overlaps = overlap and _can_overlap(captioner.device)
        self.pipelined = captioner.device.type == "cuda" if pipelined is None else pipelined
        self._joins: deque[_Join] = deque()  # launched, not placed yet; in launch order
        self._fence = False  # the next join must wait for the worker's stream (see detach())
        self.read_s = 0.0  # seconds step() spent reading its tokens back (waiting for the device)
        self.slots: list[_Row | None] = []  # (C,)
        self.state: DecoderState | None = None  # C rows; between steps, the stepper's own buffer
        self.logits: torch.Tensor | None = None  # (C,V) fp32
        self.started: dict[int, float] = {}  # id(job) -> when it joined
        self._results: dict[int, list] = {}
        self._live: list[int] = []  # the occupied slots, ascending
        self._chosen: list[int] = []  # the occupied slots whose row has a TokenChooser of its own
        self._free_mask: torch.Tensor | None = None  # (C,) bool on the device: which slots step on token 0
        self._order = itertools.count()
        self._stepper = None  # the decoder's rnn_stepper, taken (its weights checked) at each join

    def __len__(self) -> int:
        return len(self._live)

    @property
    def capacity(self) -> int:
        return len(self.slots)

    @property
    def _free(self) -> list[int]:
        """The free slots, ascending: new rows fill the lowest first."""
        return [s for s, row in enumerate(self.slots) if row is None]

    def jobs(self) -> list:
        """Every job with a row decoding or a join launched, once each."""
        jobs = {id(row.job): row.job for row in self.rows}
        jobs.update((id(job), job) for join in self._joins for job in join.jobs)
        return list(jobs.values())

    @property
    def rows(self) -> list[_Row]:
        """The live rows, in slot order."""
        return [self.slots[s] for s in self._live]

    def _context(self):
        c = self.captioner
        return torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=c.bf16)

    @property
    def joining(self) -> int:
        """Joins launched and not placed yet."""
        return len(self._joins)

    @property
    def joining_images(self) -> int:
        return sum(job.size for join in self._joins for job in join.jobs)

    def admit(self, jobs) -> None:
        """Encode and prefill the jobs' images, and write their rows into free slots, now."""
        self.launch(jobs)
        while self._joins:
            self.place_next()

    @torch.no_grad()
    def launch(self, jobs) -> None:
        """Start encoding and prefilling the jobs' images: on the join stream when overlapping (queued there,
        behind any join launched before; this returns once it is launched), else now. place_next() writes
        their rows into free slots once join_ready()."""
        model, captioner = self.captioner.model, self.captioner
        stream = join_stream(captioner.device) if self.overlaps else None
        if stream is not None and self._fence:  # the graphs' buffers were in use on the worker's stream
            stream.wait_stream(torch.cuda.current_stream(captioner.device))
            self._fence = False
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            images = captioner.model_input(_pixels(jobs, pinned=stream is not None))
            n = chunk = images.shape[0]
            if pads_joins(captioner):  # graph replays only, of a few sizes (warm_up captures them all)
                chunk = join_chunk(captioner)
                images = torch.cat([images, images[-1:].expand(_padded(n, chunk) - n, *images.shape[1:])])
            with self._context():  # rows never mix: a padding row changes no other
                logits, state = model.prefill_images(images, chunk)
            logits, state = logits[:n].float(), state[:n]
            done = None
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
        self._joins.append(_Join(list(jobs), logits, state, done))

    def join_ready(self) -> bool:
        """Whether the oldest join launched has finished (and place_next() would not make the decode wait)."""
        return bool(self._joins) and self._joins[0].ready()

    def pending_jobs(self) -> list:
        """The jobs of the join place_next() places next."""
        return self._joins[0].jobs

    @torch.no_grad()
    def place_next(self) -> None:
        """Write the oldest launched join's rows into free slots (the worker's stream waiting for the join on
        the device, not the host). The join is taken off the list first: if this raises, it is gone."""
        join = self._joins.popleft()
        model = self.captioner.model
        logits, state = join.logits, join.state
        if join.done is not None:
            worker = torch.cuda.current_stream(logits.device)
            worker.wait_event(join.done)
            for t in (logits, *state.tensors()):  # made on the join stream, read on this one
                t.record_stream(worker)
        first, picks, rows = 0, [], []
        vocab, device = logits.shape[-1], logits.device
        for job in join.jobs:
            cfg, n = job.sampling, sequences(job.sampling)
            stop = tuple(sorted({model.eos_id, *cfg.stop_tokens}))
            for i in range(job.size):
                for k in range(n):
                    chooser = None
                    if not _plain_greedy(cfg):
                        generator = None if cfg.seed is None else \
                            torch.Generator(device=device).manual_seed(cfg.seed + i * n + k)
                        chooser = TokenChooser(cfg, 1, vocab, device, generator)
                    rows.append(_Row(job, i, cfg.max_new_tokens, cfg.min_new_tokens, stop, [], chooser,
                                     order=next(self._order)))
                    picks.append(first + i)
            first += job.size
        if len(picks) != first:  # some image gets several draws: repeat its row once per sequence
            index = to_device(picks, device)
            state, logits = state[index], logits[index]
        self._place(rows, state, logits)
        # as decode_loop takes it once a decode: checking the weights (a walk of every parameter) at each step
        # would cost the worker more host time than the step's graph
        self._stepper = rnn_stepper(model.decoder)
        now = time.perf_counter()
        for job in join.jobs:
            self.started[id(job)] = now
            self._results[id(job)] = [[] for _ in range(job.size)]

    def _place(self, rows: list[_Row], state: DecoderState, logits: torch.Tensor) -> None:
        """Write the new rows' states and logits into free slots, growing the buffers if too few are free."""
        if self.state is None:
            self._allocate(_bucket(len(rows)), state, logits)
        elif len(rows) > len(self._free):
            capacity = self.capacity
            while capacity < len(self._live) + len(rows):
                capacity *= 2
            self._grow(capacity)
        slots = self._free[:len(rows)]
        index = to_device(slots, logits.device)
        for mine, theirs in zip(self.state.tensors(), state.tensors()):
            mine.index_copy_(1, index, theirs)
        self.logits.index_copy_(0, index, logits)
        for slot, row in zip(slots, rows):  # only now that the copies went through (an error leaves them free)
            self.slots[slot] = row
        self._slots_changed()

    def _allocate(self, capacity: int, like: DecoderState, logits: torch.Tensor) -> None:
        self.state = self.captioner.model.decoder.init_state(capacity, device=like.device)
        self.logits = logits.new_zeros(capacity, logits.shape[-1])
        self.slots = [None] * capacity

    def _grow(self, capacity: int) -> None:
        """Larger buffers, the present slots copied to the start (one copy; rows keep their slots)."""
        old, old_logits, old_slots = self.state, self.logits, self.slots
        self._allocate(capacity, old, old_logits)
        for mine, theirs in zip(self.state.tensors(), old.tensors()):
            mine[:, :len(old_slots)] = theirs
        self.logits[:len(old_slots)] = old_logits
        self.slots[:len(old_slots)] = old_slots

    @torch.no_grad()
    def step(self) -> list:
        """Choose every row's next token; rows that end leave. -> the jobs whose every row has now ended, as
        (job, captions per image, seconds since it joined, rows in the batch at this step).

        Pipelined, the step on the chosen tokens is launched before they are read back: the device runs it
        while the host waits for the tokens alone and books them, instead of idling until the host has
        launched it. A row that ends at this token is then stepped once more, in its slot, and the result is
        never looked at (as a free slot's); when every row ends, that step is wasted. The tokens, and so the
        captions, are the same either way."""
        logits = self.logits  # (C,V) fp32
        tokens = logits.argmax(dim=-1)  # (C,): every plain greedy row's choice
        for slot in self._chosen:  # its own settings and generator, from its own logits
            row = self.slots[slot]
            held = row.stop if len(row.ids) < row.min_new_tokens else ()
            token = row.chooser.choose(logits[slot:slot + 1], held)
            row.chooser.update(token)
            tokens[slot] = token[0]
        tokens.masked_fill_(self._free_mask, 0)  # free slots step on a harmless token
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1).double()
        read = HostCopy(torch.stack([tokens.double(), logprobs]))
        stepped = self.pipelined
        if stepped:
            with self._context():
                self.logits, self.state = self._step(tokens)
        begin = time.perf_counter()
        read_tokens, read_logprobs = read.wait()[0].tolist()  # one host read a step: it waits for the device
        self.read_s += time.perf_counter() - begin
        size, finished = len(self._live), []
        for slot in self._live:
            row, token = self.slots[slot], int(read_tokens[slot])
            row.logprob += read_logprobs[slot]
            if token not in row.stop:
                row.ids.append(token)
                if len(row.ids) < row.max_new_tokens:
                    continue
            finished.append(slot)
        done = self._finish(sorted((self.slots[s] for s in finished), key=lambda r: r.order), size)
        if finished:
            tokens = self._leave(finished, tokens, stepped)
        if self._live and not stepped:
            with self._context():
                self.logits, self.state = self._step(tokens)
        return done

    def _leave(self, slots: list[int], tokens: torch.Tensor, stepped: bool) -> torch.Tensor:
        """Free the finished rows' slots; drop everything when no row is left, compact when few are.
        stepped: the step on `tokens` has run (pipelined), so the logits are its own and move with their rows.
        -> the tokens (C,) to step, moved with their rows if they were compacted."""
        for slot in slots:
            self.slots[slot] = None
        live = len(self._live) - len(slots)
        if live == 0:
            self.slots, self.state, self.logits = [], None, None
            self._live, self._chosen, self._free_mask = [], [], None
            return tokens
        if live <= self.capacity // 4:
            return self._compact(live, tokens, stepped)
        self._slots_changed()
        return tokens

    def _compact(self, live: int, tokens: torch.Tensor, stepped: bool) -> torch.Tensor:
        """Move the live rows to the first slots of buffers twice their bucket (one gather; the rest of the
        new capacity repeats a live row, stepped and ignored like any free slot)."""
        keep = [s for s, row in enumerate(self.slots) if row is not None]
        capacity = 2 * _bucket(live)
        index = to_device(keep + [keep[0]] * (capacity - live), self.logits.device)
        self.state = self.state[index]
        # stepped: the logits are the rows' next ones; else the step about to run overwrites them
        self.logits = self.logits[index] if stepped else self.logits[:capacity]
        self.slots = [self.slots[s] for s in keep] + [None] * (capacity - live)
        self._slots_changed()
        if stepped:  # the step on these tokens has run: step() does not use them again
            return tokens
        return tokens[index].masked_fill_(self._free_mask, 0)

    def _slots_changed(self) -> None:
        self._live = [s for s, row in enumerate(self.slots) if row is not None]
        self._chosen = [s for s in self._live if self.slots[s].chooser is not None]
        free = [row is None for row in self.slots]
        self._free_mask = to_device(free, self.logits.device, torch.bool)

    def detach(self) -> None:
        """Something else is about to use the decoder's graphs on the worker's stream (a beam-search request run
        whole). Their buffers must not be in use by a join on the other stream: place every launched join
        first (the scheduler does); the next join will wait for the worker's stream. The step's graphs would
        overwrite their own state buffer, which this batch may be holding: it keeps a copy of its own."""
        assert not self._joins, "place the launched joins before detaching"
        self._fence = self.overlaps
        if self.state is not None:
            self.state = self.state.clone()

    def _step(self, tokens: torch.Tensor):
        """Step every slot: the capacity is a power of two, so a bucketed stepper (graphs) runs it as it is,
        and the state it returns, its own buffer, is passed back to it at the next step without a copy.
        The stepper is the one the last join took: weights changed since then reach the rows joining next."""
        logits, state = self._stepper(tokens, self.state)
        return logits.float(), state

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
