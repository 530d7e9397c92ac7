"""Batching for the server: one worker thread owns the model and captions queued requests together.

Requests wait in a bounded queue. Greedy and sampling requests (greedy is the page's and the API's
default) are batched continuously, at the step level: their images are encoded and prefilled between two
steps, their rows join the running decode at the next step, each choosing its tokens with its own settings
and generator, and each row leaves as soon as it ends (vision_rwkv.serve.continuous). On CUDA a join's
encode and prefill run on a stream of their own while the running rows step (overlap_joins, the default):
the worker launches one join at a time, as soon as images are queued and no join is in flight, and the
new rows take their slots at the first step after it ends; images arriving meanwhile wait for the next
join, so joins grow with the load. Otherwise every row waits for a join, so joins come in groups: once the
queued images are a quarter of the rows decoding, or the oldest has waited max_wait_ms. Beam search (and
every request, with continuous=False) is batched per request: when nothing is decoding, the worker waits up
to max_wait_ms for more to arrive (until max_batch images are waiting), and requests with the same settings
share one encode + prefill + decode that runs to its end; while rows are decoding, such a request runs
between two steps.

Results are batch-invariant: rows never mix in the model, greedy and beam search depend on a row's own
logits only, and a seeded sampling row draws from a generator of its own, seeded from its request's seed
(in the running decode; per request, a seeded request runs alone on one generator), so a request gets the
same captions whoever else decodes beside it. Unseeded sampling is not reproducible anyway.

Only the worker thread touches the model: the RNN steppers keep one state buffer per batch size and are
not thread-safe.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..config import SamplingConfig, Strategy
from ..errors import VisionRWKVError
from .continuous import RunningBatch, joins_running_batch, worker_stream

JOIN_FRACTION = 4  # while rows decode, new images join once they are a quarter of them (or waited max_wait)


class QueueFull(VisionRWKVError):
    """The queue holds max_queue images already: try again later (the server answers 503)."""


class SchedulerClosed(VisionRWKVError):
    """The scheduler is shutting down and takes no new requests (the server answers 503)."""


@dataclass
class Captioned:
    """One request's outcome: per image, its (caption, score) pairs best first, and where the time went."""

    captions: list[list[tuple[str, float]]]
    queue_ms: float  # from submit() to the start of its batch
    compute_ms: float  # encode + prefill + decode of its batch; continuous: from joining to its last row's end
    batch_images: int  # images in that batch (its own included); continuous: rows decoding at its last step


@dataclass
class WorkerStats:
    """What the worker thread did since it started, for load tests and profiling: seconds spent waiting for
    requests (nothing decoding), joining rows (encode + prefill), stepping the running decode, and captioning
    whole requests (beam search); with counts. Only the worker writes it; readers take a snapshot (copy)."""

    waiting_s: float = 0.0
    joining_s: float = 0.0
    stepping_s: float = 0.0
    captioning_s: float = 0.0
    joins: int = 0
    joined_images: int = 0
    steps: int = 0
    overlapped_steps: int = 0  # steps taken while a join was in flight on its own stream
    # parts of the above, where the host's time goes: launching joins and placing their rows (joining_s), the
    # step's one read of its tokens (waiting for the device) and answering the finished requests (stepping_s)
    launching_s: float = 0.0
    placing_s: float = 0.0
    reading_s: float = 0.0
    answering_s: float = 0.0
    row_steps: int = 0  # live rows summed over steps: row_steps / steps is the mean decoding batch

    def since(self, earlier: WorkerStats) -> WorkerStats:
        return WorkerStats(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(earlier))))


@dataclass
class _Job:
    images: torch.Tensor  # (n,3,H,W), preprocessed, or uint8 pixels (Captioner.model_input)
    sampling: SamplingConfig
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    joined_at: float = 0.0  # when its rows joined the running decode (continuous batching)

    @property
    def size(self) -> int:
        return self.images.shape[0]


class BatchScheduler:
    """A bounded queue and the one worker thread that captions from it with a Captioner.

        scheduler = BatchScheduler(captioner, max_batch=32, max_wait_ms=5, max_queue=256).start()
        captioned = scheduler.submit(images, SamplingConfig()).result()
        scheduler.close()   # finishes everything queued, then stops the worker
    """

    def __init__(self, captioner, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                 continuous: bool = True, overlap_joins: bool = True):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise VisionRWKVError(f"max_batch={max_batch}, max_queue={max_queue}, max_wait_ms={max_wait_ms}; "
                                  "expected max_batch >= 1, max_queue >= 1 and max_wait_ms >= 0")
        self.captioner = captioner
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self._jobs: deque[_Job] = deque()
        self._queued_images = 0
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="vision-rwkv-serve-worker", daemon=True)
        self.batches_run = 0  # request-level batches (not the continuous decode's steps)
        self.worker_errors = 0  # failures the worker caught outside its guarded calls, and survived
        self.continuous = continuous  # greedy and sampling rows join and leave the running decode step by step
        self.overlap_joins = overlap_joins  # CUDA: joins run on a stream of their own while rows step
        self._running = RunningBatch(captioner, overlap_joins)
        self.stats = WorkerStats()

    @classmethod
    def from_config(cls, captioner, cfg) -> BatchScheduler:
        """The scheduler a ServeConfig describes (not started)."""
        return cls(captioner, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue, cfg.continuous, cfg.overlap_joins)

    def start(self) -> BatchScheduler:
        self._thread.start()
        return self

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def alive(self) -> bool:
        """False once the worker thread has ended (closed); True before start()."""
        return self._thread.ident is None or self._thread.is_alive()

    def submit(self, images: torch.Tensor, sampling: SamplingConfig) -> Future:
        """Queue preprocessed images (n,3,H,W) with their (validated) sampling settings; the Future gives a
        Captioned. Raises QueueFull or SchedulerClosed at once instead of queueing."""
        sampling.validate()
        job = _Job(images, sampling)
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the server is shutting down; try another instance or again later")
            if self._queued_images + job.size > self.max_queue:
                raise QueueFull(f"the queue is full ({self._queued_images} images waiting, at most "
                                f"{self.max_queue}); try again shortly")
            self._jobs.append(job)
            self._queued_images += job.size
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, caption every queued one, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker ------------------------------------------------------------------------------------

    def _run(self) -> None:
        with worker_stream(self.captioner.device):
            self._loop()

    def _loop(self) -> None:
        while True:
            jobs: list[_Job] = []
            stats, running = self.stats, self._running
            try:
                begin = time.perf_counter()
                jobs = self._take_batch(block=not running and not running.joining)
                took = time.perf_counter()
                stats.waiting_s += took - begin
                if jobs is None:
                    return
                for group in _groups(jobs):
                    if self.continuous and joins_running_batch(group[0].sampling):
                        self._launch(group)
                        stats.joins += 1
                        stats.joined_images += sum(job.size for job in group)
                        stats.joining_s += (now := time.perf_counter()) - took
                    else:
                        self._settle(wait=True)
                        running.detach()  # the whole job's decode reuses the stepper's graphs
                        self._caption(group)
                        stats.captioning_s += (now := time.perf_counter()) - took
                    took = now
                if running.joining:  # rows join once their join is done; at once if nothing else decodes
                    self._settle(wait=not running)
                stats.joining_s += (now := time.perf_counter()) - took
                took = now
                if running:
                    stats.steps += 1
                    stats.overlapped_steps += bool(running.joining)
                    stats.row_steps += len(running)
                    self._step()
                    stats.stepping_s += time.perf_counter() - took
            except Exception as e:  # a bug outside the guarded calls: these requests learn of it, the worker goes on
                self.worker_errors += 1
                self._restart(e, jobs or [])

    def _take_batch(self, block: bool) -> list[_Job] | None:
        """Blocking (nothing is decoding or joining): wait for a job, then up to max_wait for max_batch
        images; None once closing with nothing left. Not blocking (rows are decoding): nothing while a join
        is in flight; else whatever is queued now, up to the room left in the running batch, so it joins at
        the next step. Joins that do not overlap the decode wait until the queued images are at least
        1/JOIN_FRACTION of the rows decoding, or the oldest has waited max_wait: a join's encode and
        prefill take about as long for 1 image as for 16 (launch-bound graphs), and every row waits for it,
        so they come in groups."""
        running = self._running
        room = self.max_batch - len(running) - running.joining_images
        with self._cond:
            if block:
                while not self._jobs:
                    if self._closing:
                        return None
                    self._cond.wait()
                deadline = self._jobs[0].queued_at + self.max_wait_s
                while self._queued_images < self.max_batch and not self._closing:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            elif room <= 0 or not self._jobs or running.joining:  # one join in flight at a time
                return []
            elif not running.overlaps and self._queued_images < len(running) // JOIN_FRACTION \
                    and time.perf_counter() - self._jobs[0].queued_at < self.max_wait_s:
                return []  # not yet: too few to join a large batch, and the oldest can wait longer
            jobs, images = [], 0
            while self._jobs and (not jobs or images + self._jobs[0].size <= room):
                if not block and images + self._jobs[0].size > room:
                    break
                job = self._jobs.popleft()
                jobs.append(job)
                images += job.size
            self._queued_images -= images
            return jobs

    def _launch(self, jobs: list[_Job]) -> None:
        """Start the jobs' join (vision_rwkv.serve.continuous.RunningBatch.launch)."""
        jobs = _claim(jobs)
        start = time.perf_counter()
        try:
            if jobs:
                self._running.launch(jobs)
        except Exception as e:  # a bug or an out-of-memory: these requests learn of it
            _fail(jobs, e)
            return
        finally:
            self.stats.launching_s += time.perf_counter() - start
        for job in jobs:
            job.joined_at = start

    def _settle(self, wait: bool) -> None:
        """Place the launched joins that have finished (every one if wait: the decode's stream then waits for
        them on the device)."""
        running, begin = self._running, time.perf_counter()
        while running.joining and (wait or running.join_ready()):
            jobs = running.pending_jobs()
            try:
                running.place_next()
            except Exception as e:  # a bug or an out-of-memory: these requests learn of it
                _fail(jobs, e)
        self.stats.placing_s += time.perf_counter() - begin

    def _step(self) -> None:
        running, stats = self._running, self.stats
        read_before = running.read_s
        try:
            done = running.step()
        except Exception as e:  # a bug or an out-of-memory: every row decoding or joining now learns of it
            self._restart(e)
            return
        stats.reading_s += running.read_s - read_before
        begin = time.perf_counter()
        for job, captions, seconds, batch_rows in done:  # its callbacks run here (the split server's answers)
            job.future.set_result(Captioned(captions, (job.joined_at - job.queued_at) * 1000, seconds * 1000,
                                            batch_rows))
        stats.answering_s += time.perf_counter() - begin

    def _restart(self, error: Exception, jobs: list[_Job] = ()) -> None:
        """Fail these jobs and every one decoding or joining, and start again from an empty running batch."""
        _fail(list(jobs) + self._running.jobs(), error)
        self._running = RunningBatch(self.captioner, self.overlap_joins)

    def _caption(self, jobs: list[_Job]) -> None:
        jobs = _claim(jobs)
        if not jobs:
            return
        start = time.perf_counter()
        try:
            images = torch.cat([job.images for job in jobs])
            generator = _generator(jobs[0].sampling, self.captioner.device)
            captions = self.captioner.caption_images(images, jobs[0].sampling, generator)
        except Exception as e:  # a bug or an out-of-memory: every request of the batch learns of it
            _fail(jobs, e)
            return
        compute_ms = (time.perf_counter() - start) * 1000
        self.batches_run += 1
        offset = 0
        for job in jobs:
            job.future.set_result(Captioned(captions[offset:offset + job.size], (start - job.queued_at) * 1000,
                                            compute_ms, len(images)))
            offset += job.size


def _claim(jobs: list[_Job]) -> list[_Job]:
    """The jobs whose futures were not cancelled, now marked running."""
    return [job for job in jobs if job.future.set_running_or_notify_cancel()]


def _fail(jobs: list[_Job], error: Exception) -> None:
    """Answer each job with the error, but for those already answered or cancelled by their client."""
    for job in jobs:
        if job.future.done() or (not job.future.running() and not job.future.set_running_or_notify_cancel()):
            continue
        job.future.set_exception(error)


def _seeded(sampling: SamplingConfig) -> bool:
    return sampling.strategy == Strategy.sample and sampling.seed is not None


def _generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(sampling.seed) if _seeded(sampling) else None


def _groups(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs that may share a decode: the same settings, and never a seeded sampling job with another."""
    groups: dict[tuple, list[_Job]] = {}
    for i, job in enumerate(jobs):
        key = tuple(str(v) for v in dataclasses.astuple(job.sampling))
        if _seeded(job.sampling):
            key = (*key, i)  # its own generator, its own batch
        groups.setdefault(key, []).append(job)
    return list(groups.values())
