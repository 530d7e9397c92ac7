"""The server in several processes: the model in one, HTTP in others (ServeConfig.http_processes > 0).

In one process the batching worker thread shares the GIL with the event loop and the intake threads, and each
of its torch calls gives the GIL up and must win it back. On an H200 under 128 clients a join and a step took
about twice as long as alone (BENCHMARKS.md, the server's third round), and the HTTP side alone answered
at most about 1,300 requests/s. Split up, the model process runs the worker and one thread that reads
requests; each HTTP process parses, decodes and preprocesses uploads and writes their pixels to its pipe.

    model process     Captioner + BatchScheduler, as in one process; a reader thread over every HTTP
                      process's pipe; each request's answer is sent as its future completes
    HTTP process i    uvicorn on the shared listening socket, serving build_app over an EngineClient
    supervisor        the command's own process (ProcessServer): starts the model process and waits until
                      it is loaded and warmed up, binds the socket, starts the HTTP processes; on SIGTERM or
                      Ctrl-C it stops them (each finishes its requests in flight), and the model process
                      then drains its queue and exits

The children run in a process group of their own, so a terminal's Ctrl-C reaches the supervisor alone and
each child is stopped once, in order; a child whose supervisor has gone stops too.

Messages on a pipe (pickled tuples; pixels travel as raw bytes, not as shared tensors):
    HTTP -> model    ("caption", id, SamplingConfig, (shape, dtype name, bytes))  |  ("close",)
    model -> HTTP    ("done", id, Captioned, queued images)  |  ("error", id, kind, message, queued images)
The supervisor has a pipe of its own to the model process, for the worker's counters (load tests) and for
the pipe of an HTTP process it starts in place of one that died:
    supervisor -> model  ("stats", id)        model -> supervisor  ("stats", id, WorkerStats, queued images)
    supervisor -> model  ("link", Connection)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from functools import partial
from multiprocessing.connection import Connection, wait

import torch

from ..config import SamplingConfig, ServeConfig
from ..errors import VisionRWKVError, one_line
from .app import ModelCard, build_app
from .continuous import warm_up
from .scheduler import BatchScheduler, QueueFull, SchedulerClosed, WorkerStats

PARENT_CHECK_S = 0.5  # how often a child looks whether its supervisor is still there
# An HTTP process that dies is replaced, but not more than MAX_RESTARTS times in RESTART_WINDOW_S (a crash
# loop stops the server instead).
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
log = logging.getLogger(__name__)


class ModelProcessError(RuntimeError):
    """The model process failed a request (a bug or an out-of-memory there; its log has the details)."""


# ---- the model process -----------------------------------------------------------------------------------


def model_process(load, cfg: ServeConfig, name: str, links: list[Connection], report: Connection) -> None:
    """Load the captioner (load() -> Captioner), warm it up on CUDA, report ("ready", ModelCard) or
    ("failed", one line), then caption what the links send until every one has closed, and drain. It needs
    no watch on the supervisor: if that goes, the HTTP processes stop and their pipes close."""
    os.setpgrp()  # a process group of its own: a terminal's Ctrl-C reaches the supervisor alone
    try:
        captioner = load()
        if captioner.device.type == "cuda":
            warm_up(captioner, cfg.max_batch)
        scheduler = BatchScheduler.from_config(captioner, cfg)
        report.send(("ready", ModelCard.of(captioner, name)))
    except Exception as e:  # a bad checkpoint or device: the supervisor prints the line and exits
        report.send(("failed", one_line(e)))
        sys.exit(1)
    finally:
        report.close()
    scheduler.start()
    serve_links(scheduler, links)
    scheduler.close()


def serve_links(scheduler, links: list[Connection]) -> None:
    """Read requests from every link and submit them; answer each when its future completes (from the thread
    that completes it: the worker's, so no thread sits between the two). Returns once every link has closed."""
    locks = {id(conn): threading.Lock() for conn in links}
    open_links = list(links)
    while open_links:
        for conn in wait(open_links):
            try:
                message = conn.recv()
            except (EOFError, OSError):  # that HTTP process has gone
                message = ("close",)
            if message[0] == "close":
                open_links.remove(conn)
                with locks[id(conn)]:
                    conn.close()
                continue
            if message[0] == "stats":
                with locks[id(conn)]:
                    try:
                        conn.send(("stats", message[1], dataclasses.replace(scheduler.stats),
                                   scheduler.queued_images))
                    except (OSError, ValueError):  # the supervisor closed its end meanwhile; the EOF follows
                        pass
                continue
            if message[0] == "link":  # the pipe of an HTTP process started in place of one that died
                locks[id(message[1])] = threading.Lock()
                open_links.append(message[1])
                continue
            _, request, sampling, (shape, dtype, payload) = message
            answer = partial(_answer, conn, locks[id(conn)], request, scheduler)
            try:
                images = torch.frombuffer(bytearray(payload), dtype=getattr(torch, dtype)).view(shape)
                future = scheduler.submit(images, sampling)
            except Exception as e:  # a full queue, bad settings: answered at once
                failed = Future()
                failed.set_exception(e)
                answer(failed)
            else:
                future.add_done_callback(answer)


def _answer(conn: Connection, lock: threading.Lock, request: int, scheduler, future: Future) -> None:
    try:
        message = ("done", request, future.result(), scheduler.queued_images)
    except BaseException as e:
        message = ("error", request, _kind(e), one_line(e) or type(e).__name__, scheduler.queued_images)
    with lock:
        if conn.closed:
            return
        try:
            conn.send(message)
        except (OSError, ValueError):  # the HTTP process went away meanwhile: nobody is waiting
            pass


def _kind(error: BaseException) -> str:
    if isinstance(error, QueueFull):
        return "full"
    if isinstance(error, SchedulerClosed):
        return "closed"
    if isinstance(error, VisionRWKVError):
        return "invalid"
    return type(error).__name__


def _error(kind: str, message: str) -> Exception:
    if kind == "full":
        return QueueFull(message)
    if kind == "closed":
        return SchedulerClosed(message)
    if kind == "invalid":
        return VisionRWKVError(message)
    return ModelProcessError(f"{kind}: {message}")


# ---- an HTTP process -------------------------------------------------------------------------------------


class EngineClient:
    """The scheduler as an HTTP process sees it: submit() sends the request down the pipe and returns a Future
    that the reader thread completes with the model process's answer. Same interface as BatchScheduler."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._queued = 0
        self._stopped: str | None = None  # why it takes no more requests
        self._reader = threading.Thread(target=self._read, name="vision-rwkv-engine-client", daemon=True)

    def start(self) -> EngineClient:
        self._reader.start()
        return self

    @property
    def alive(self) -> bool:
        return self._stopped is None

    @property
    def queued_images(self) -> int:
        """The model process's queue, as of its last answer to this process."""
        return self._queued

    def submit(self, images: torch.Tensor, sampling: SamplingConfig) -> Future:
        sampling.validate()
        if self._stopped is not None:
            raise SchedulerClosed(self._stopped)
        future, request = Future(), next(self._ids)
        raw = images.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bf16 too
        payload = (tuple(images.shape), str(images.dtype).removeprefix("torch."), raw)
        self._pending[request] = future
        try:
            with self._send_lock:
                self._conn.send(("caption", request, sampling, payload))
        except (OSError, ValueError):
            self._pending.pop(request, None)
            self._stop("the model process has stopped; the server cannot caption")
            raise SchedulerClosed(self._stopped) from None
        return future

    def close(self, timeout: float | None = 60) -> None:
        """Tell the model process this HTTP process is done (its requests have been answered by then), wait
        for it to close the pipe, and fail whatever is somehow still pending."""
        try:
            with self._send_lock:
                self._conn.send(("close",))
        except (OSError, ValueError):
            pass
        if self._reader.is_alive():
            self._reader.join(timeout)
        self._stop("the server is shutting down; try again later")
        self._conn.close()

    def _read(self) -> None:
        while True:
            try:
                kind, request, *rest = self._conn.recv()
            except (EOFError, OSError):
                break
            self._queued = rest[-1]
            future = self._pending.pop(request, None)
            if future is None:
                continue
            try:
                if kind == "done":
                    future.set_result(rest[0])
                else:
                    future.set_exception(_error(rest[0], rest[1]))
            except InvalidStateError:  # its client went away and the request was cancelled
                pass
        self._stop("the model process has stopped; the server cannot caption")

    def _stop(self, why: str) -> None:
        if self._stopped is None:
            self._stopped = why
        while True:
            try:
                _, future = self._pending.popitem()
            except KeyError:  # empty (the reader thread may pop too)
                break
            if not future.done():
                try:
                    future.set_exception(SchedulerClosed(self._stopped))
                except InvalidStateError:
                    pass


def http_process(card: ModelCard, cfg: ServeConfig, conn: Connection, sock: socket.socket, supervisor: int,
                 started: Connection) -> None:
    """uvicorn serving build_app over an EngineClient on the shared socket; sends "serving" on started once it
    accepts requests. SIGTERM: finish the requests in flight, close the client, exit."""
    import uvicorn

    os.setpgrp()  # a process group of its own: a terminal's Ctrl-C reaches the supervisor alone
    _when_gone(supervisor, lambda: os.kill(os.getpid(), signal.SIGTERM))
    app = build_app(card, EngineClient(conn), cfg)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60))

    def report_when_serving():
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        started.send("serving" if server.started else "stopped")
        started.close()

    threading.Thread(target=report_when_serving, daemon=True).start()
    server.run(sockets=[sock])


def _when_gone(supervisor: int, stop) -> None:
    """Call stop() from a watch thread once the supervisor process has gone."""

    def watch():
        while os.getppid() == supervisor:
            time.sleep(PARENT_CHECK_S)
        stop()

    threading.Thread(target=watch, name="vision-rwkv-supervisor-watch", daemon=True).start()


# ---- the supervisor --------------------------------------------------------------------------------------


class ProcessServer:
    """The model in one process, HTTP in cfg.http_processes others, all on cfg.host:cfg.port.

        server = ProcessServer(partial(Captioner.load, checkpoint), cfg, name="demo").start()
        server.port            # the bound port (cfg.port, or the one the system chose for port=0)
        server.wait()          # until stop(); replaces an HTTP process that dies, and stops everything if
                               # the model process dies (or HTTP processes keep dying)
        server.stop()          # from a signal handler or another thread

    load is called in the model process, so it must be picklable (a module-level function or a partial)."""

    def __init__(self, load, cfg: ServeConfig, name: str = "demo"):
        if cfg.validate().http_processes < 1:
            raise VisionRWKVError(f"http_processes is {cfg.http_processes}; ProcessServer needs at least 1")
        self.load, self.cfg, self.name = load, cfg, name
        self.model: multiprocessing.Process | None = None
        self.http: list[multiprocessing.Process] = []
        self.port: int | None = None
        self.card: ModelCard | None = None
        self._control: Connection | None = None  # to the model process: the worker's counters, new links
        self._control_lock = threading.Lock()
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
        self._sock: socket.socket | None = None  # kept for the HTTP processes started later
        self._restarts: list[float] = []
        self.restarts = 0  # HTTP processes started in place of ones that died
        self._stop_requested = threading.Event()
        self._stopping = threading.Event()
        self.failure: str | None = None  # why it stopped on its own, if it did

    def start(self, timeout: float | None = None) -> ProcessServer:
        """Returns once the model is loaded (and warmed up on CUDA) and every HTTP process accepts requests;
        VisionRWKVError in one line if the model cannot load or a process dies first."""
        ctx, cfg = self._ctx, self.cfg
        links = [ctx.Pipe() for _ in range(cfg.http_processes)]
        self._control, control = ctx.Pipe()
        report_r, report_w = ctx.Pipe(duplex=False)
        self.model = ctx.Process(target=model_process, name="vision-rwkv-model",
                                 args=(self.load, cfg, self.name, [b for _, b in links] + [control], report_w))
        self.model.start()
        report_w.close()
        control.close()
        for _, b in links:
            b.close()
        kind, value = self._receive(report_r, self.model, "loading the model", timeout)
        if kind != "ready":
            self.model.join(10)
            raise VisionRWKVError(value)
        self.card = value
        try:
            family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET  # "::" as uvicorn takes it
            sock = socket.create_server((cfg.host, cfg.port), family=family, backlog=4096)
        except OSError as e:
            self.stop()
            raise VisionRWKVError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
        self._sock, self.port = sock, sock.getsockname()[1]
        waits = [self._start_http(i, a) for i, (a, _) in enumerate(links)]
        for started, process in waits:
            if self._receive(started, process, "starting HTTP", timeout) != "serving":
                self.stop()
                raise VisionRWKVError(f"{process.name} did not start serving")
        return self

    def _start_http(self, i: int, link: Connection) -> tuple[Connection, multiprocessing.Process]:
        """Start HTTP process i on link (closed here) -> (the pipe it says "serving" on, the process)."""
        started_r, started_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=http_process, name=f"vision-rwkv-http-{i}",
                                    args=(self.card, self.cfg, link, self._sock, os.getpid(), started_w))
        process.start()
        started_w.close()
        link.close()
        if i < len(self.http):
            self.http[i] = process
        else:
            self.http.append(process)
        return started_r, process

    def _replace_http(self, i: int) -> bool:
        """Start another HTTP process in place of process i, which died; False if it cannot (too many
        restarts lately, or the new one died too)."""
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        dead = self.http[i]
        if len(self._restarts) >= MAX_RESTARTS:
            self.failure = (f"{dead.name} stopped (exit code {dead.exitcode}) after {len(self._restarts)} "
                            f"replacement(s) within {RESTART_WINDOW_S:g} s, the most allowed: a crash loop")
            return False
        self._restarts.append(now)
        log.warning("%s stopped (exit code %s); starting another", dead.name, dead.exitcode)
        a, b = self._ctx.Pipe()
        with self._control_lock:
            self._control.send(("link", b))
        b.close()
        try:
            if self._receive(*self._start_http(i, a), "starting HTTP", 120) == "serving":
                self.restarts += 1
                return True
        except VisionRWKVError as e:
            if not self._stop_requested.is_set():  # a stop asked for meanwhile is no failure
                self.failure = str(e)
            return False
        self.failure = f"{self.http[i].name} did not start serving"
        return False

    def _receive(self, conn: Connection, process, doing: str, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not conn.poll(0.1):
            if self._stop_requested.is_set():  # SIGTERM or Ctrl-C while starting
                self.stop()
                raise VisionRWKVError(f"stopped while {doing}, before the server served")
            if not process.is_alive():
                self.stop()
                raise VisionRWKVError(f"{process.name} stopped while {doing} (exit code {process.exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise VisionRWKVError(f"{process.name} took over {timeout:g} s {doing}")
        try:
            return conn.recv()
        except EOFError:
            process.join(10)
            self.stop()
            raise VisionRWKVError(f"{process.name} stopped while {doing} (exit code {process.exitcode})") from None
        finally:
            conn.close()

    def wait(self) -> int:
        """Block until the server has stopped: after request_stop() (a signal handler's way) or stop() from
        another thread, or when the model process dies or HTTP processes keep dying (then everything is
        stopped). An HTTP process that dies is replaced. Returns 0 after a clean stop, 1 after a failure
        (self.failure says what)."""
        while not self._stopping.is_set():
            if self._stop_requested.is_set():
                self.stop()
                break
            wait([p.sentinel for p in [self.model, *self.http]], timeout=0.2)
            if self._stopping.is_set():
                break
            if not self.model.is_alive():
                self.failure = f"{self.model.name} stopped (exit code {self.model.exitcode})"
            for i, process in enumerate(self.http):
                if self.failure is None and not process.is_alive():
                    self._replace_http(i)
            if self.failure is not None:
                self.stop()
        for p in [self.model, *self.http]:
            p.join()
        return 1 if self.failure else 0

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the model process's worker counters (BatchScheduler.stats), asked for over the
        supervisor's own pipe; VisionRWKVError if the model process does not answer within 10 s."""
        with self._control_lock:
            if self._control is None or self._control.closed:
                raise VisionRWKVError("the model process is not running")
            self._control.send(("stats", 0))
            if not self._control.poll(10):
                raise VisionRWKVError("the model process did not report its counters within 10 s")
            return self._control.recv()[2]

    def request_stop(self, *_) -> None:
        """Ask wait() to stop the server (safe in a signal handler: it only sets a flag)."""
        self._stop_requested.set()

    def stop(self, timeout: float = 90) -> None:
        """SIGTERM to each HTTP process (it finishes its requests in flight), then wait for the model process
        (it drains its queue once every pipe has closed). Whatever outlives timeout is killed."""
        self._stopping.set()
        with self._control_lock:  # the model process ends once this pipe and the HTTP processes' have closed
            if self._control is not None:
                self._control.close()
        if self._sock is not None:
            self._sock.close()
        for p in self.http:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in [*self.http, self.model]:
            if p is None:
                continue
            p.join(max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                p.kill()
                p.join()
