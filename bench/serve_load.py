"""A bounded load test of the captioning server on localhost: closed-loop levels (N clients posting back to
back) and open-loop rates (requests on a fixed schedule, whatever the answers).

    python bench/serve_load.py [--clients 1,8,32,128] [--seconds 10] [--device cpu] [--checkpoint DIR]
    python bench/serve_load.py --model throughput --clients 1,32,128 --rates 0.5x,2x --max-new-tokens 20 \\
        --max-batch 128 --json serve.json                     # the GPU goals, on the benchmark's model
    python bench/serve_load.py --url http://127.0.0.1:8000      # a server already running (loopback only)
    python bench/serve_load.py --model stub --clients 8,32 --client-procs 2   # the HTTP side's own capacity

Without --url the server runs in this process (uvicorn on a free loopback port, in a thread) with the demo
model, --checkpoint, or --model throughput (bench/caption_throughput.py's model: ViT-B-16, RWKV-7 L12-D768,
65,536 tokens, random weights; bf16 weights under autocast on CUDA; it rarely emits the stop token, so every
caption runs to --max-new-tokens), and the baseline is measured in the same run: the offline
Captioner.caption_images throughput at --max-batch images per call, on the same image and settings.
Before timing, the in-process server's model runs every shape the running decode will use (on CUDA: its
graphs are captured then), and every run then gets --warmup-seconds of untimed load through HTTP.

Closed loop: every client posts examples/shapes_test_3.png (multipart, greedy, --max-new-tokens) in a loop,
keep-alive, until --seconds or --max-requests have passed. Per N: requests/s, p50 and p99 latency of the
answered requests, and the 503s and other errors.
Open loop (--rates): each rate, in requests/s or as a multiple of the capacity (`0.5x`: half the best
closed-loop req/s of this run), issues requests for --seconds on a fixed schedule (evenly spaced, or
Poisson with --seed), a new keep-alive connection whenever all are busy; latency counts from the scheduled
time. Per rate: offered and answered req/s, p50/p99 of the 200s, 503s and other errors, and whether
/healthz, polled every 0.5 s from this process, kept answering.

The clients run in --client-procs processes (spawned; threads within each), so the client side does not
share the server's interpreter; with 1 they are threads of this process. Every request is bounded by
--timeout and every level by its length plus --timeout, so a run cannot hang. --json PATH writes every row,
the baseline and the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import multiprocessing
import os
import queue
import random
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "shapes_test_3.png"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--url", help="a running server on localhost; default: start one in this process")
    p.add_argument("--clients", default="1,8,32,128", help="comma-separated closed-loop concurrency levels "
                                                           "(empty: none)")
    p.add_argument("--rates", default="", help="comma-separated open-loop rates: requests/s (e.g. 50) or a "
                                               "multiple of the closed-loop capacity (e.g. 0.5x,2x)")
    p.add_argument("--arrivals", choices=["even", "poisson"], default="even", help="open-loop schedule")
    p.add_argument("--seed", type=int, default=0, help="the Poisson schedule's seed")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each level and rate runs")
    p.add_argument("--warmup-seconds", type=float, default=2.0, help="untimed load before the first level")
    p.add_argument("--max-requests", type=int, default=100_000, help="per client and level, a second bound")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="processes the clients run in (default: min(8, CPUs/2)); 1: threads of this process")
    p.add_argument("--model", choices=["checkpoint", "throughput", "stub"], default="checkpoint",
                   help="in-process server: --checkpoint (default: the demo model), bench/caption_throughput.py's "
                        "random-weight model, or stub: the HTTP side alone (every request answered at once, no "
                        "model run), the capacity of the server's intake")
    p.add_argument("--checkpoint", default=None, help="in-process server: a caption checkpoint (default: demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--intake-threads", type=int, default=4, help="in-process server: ServeConfig.intake_threads")
    p.add_argument("--no-continuous", dest="continuous", action="store_false",
                   help="batch every request whole (no rows joining the running decode)")
    p.add_argument("--no-overlap-joins", dest="overlap_joins", action="store_false",
                   help="CUDA: the decode waits for each join (ServeConfig.overlap_joins=false) instead of "
                        "joins running on a stream of their own")
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                   help="in-process server: uvicorn's HTTP parser (auto: httptools when installed)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="in-process server: uvicorn's event loop (auto: uvloop when installed)")
    p.add_argument("--http-processes", type=int, default=0,
                   help="0: the server in this process, as above; N: ServeConfig.http_processes, the model in a "
                        "process of its own behind N HTTP processes (serve.processes; uvicorn's http and loop on "
                        "auto there)")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="in-process server: sys.setswitchinterval, how long a thread may hold the GIL when "
                        "another waits (Python's default: 5 ms)")
    p.add_argument("--json", default=None, help="write the rows, baseline and settings to this file")
    args = p.parse_args(argv)
    if args.client_procs < 1:
        p.error(f"--client-procs must be at least 1, got {args.client_procs}")
    if args.model in ("throughput", "stub") and args.checkpoint:
        p.error(f"--model {args.model} builds its own model; leave out --checkpoint")
    args.levels = [int(n) for n in args.clients.split(",") if n.strip()]
    args.rate_specs = [r.strip() for r in args.rates.split(",") if r.strip()]
    for r in args.rate_specs:
        try:
            ok = float(r[:-1] if r.endswith("x") else r) > 0
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--rates: {r!r} is neither a positive requests/s nor a positive multiple like 0.5x")
    if any(r.endswith("x") for r in args.rate_specs) and not args.levels:
        p.error("--rates given as multiples of the capacity (e.g. 2x) need closed-loop --clients to measure it")
    return args


def multipart(image: bytes, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{IMAGE.name}"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(conn, body, content_type):
    """One request on a keep-alive connection -> its status, or an error's name (the connection is then
    closed, and reopens on its next use)."""
    try:
        conn.request("POST", "/v1/caption", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        return type(e).__name__


def client_loop(host, port, body, content_type, until, max_requests, timeout, out: list):
    """Post until the deadline (perf_counter); out receives (status or an error name, seconds) per request."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    for _ in range(max_requests):
        if time.perf_counter() >= until:
            break
        start = time.perf_counter()
        status = post(conn, body, content_type)
        out.append((status, time.perf_counter() - start))
    conn.close()


def _wait_until(wall: float) -> float:
    """Sleep until the wall-clock time `wall` (shared by the processes of a level) -> perf_counter then."""
    time.sleep(max(0.0, wall - time.time()))
    return time.perf_counter()


def closed_clients(task) -> tuple[list, float]:
    """One process's share of a closed-loop level: its clients as threads, from the wall-clock start for
    `seconds` -> every (status, seconds), and the wall-clock time its last request ended."""
    host, port, clients, body, content_type, start_at, seconds, max_requests, timeout = task
    outs = [[] for _ in range(clients)]
    until = _wait_until(start_at) + seconds
    threads = [threading.Thread(target=client_loop, args=(host, port, body, content_type, until, max_requests,
                                                          timeout, out)) for out in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for out in outs for r in out], time.time()


def open_clients(task) -> tuple[list, float]:
    """One process's share of an open-loop rate: each request at its scheduled offset from the wall-clock
    start, on an idle keep-alive connection or a new one (a thread each), whatever the others' answers.
    -> every (status, seconds from its scheduled time), and the wall-clock time the last one ended."""
    host, port, offsets, body, content_type, start_at, timeout = task
    out, lock, idle = [], threading.Lock(), queue.Queue()  # idle: threads' inboxes, ready for a request
    threads = []

    def worker(inbox):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        while (due := inbox.get()) is not None:
            status = post(conn, body, content_type)
            with lock:
                out.append((status, time.perf_counter() - due))
            idle.put(inbox)
        conn.close()

    zero = _wait_until(start_at)
    for offset in offsets:
        due = zero + offset
        time.sleep(max(0.0, due - time.perf_counter()))
        try:
            inbox = idle.get_nowait()
        except queue.Empty:
            inbox = queue.SimpleQueue()
            threads.append(threading.Thread(target=worker, args=(inbox,), daemon=True))
            threads[-1].start()
        inbox.put(due)
    deadline = time.perf_counter() + timeout + 5
    for _ in threads:  # every thread comes back idle once its last request is answered (or timed out)
        try:
            idle.get(timeout=max(0.0, deadline - time.perf_counter())).put(None)
        except queue.Empty:
            break
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    with lock:
        return list(out), time.time()


class Clients:
    """Runs each level's clients over `procs` spawned processes (kept for the whole run), or in this process."""

    def __init__(self, procs: int):
        self.procs = procs
        self.pool = None
        if procs > 1:
            sys.path.insert(0, str(Path(__file__).resolve().parent))  # the children import this file as serve_load
            self.pool = multiprocessing.get_context("spawn").Pool(procs)

    def run(self, fn, tasks: list, bound: float) -> tuple[list, float]:
        """fn over the tasks (one a process), bounded by `bound` seconds -> all results, the last end time."""
        if self.pool is None:
            results = [fn(task) for task in tasks]
        else:
            results = self.pool.map_async(fn, tasks, chunksize=1).get(timeout=bound)
        return [r for done, _ in results for r in done], max(end for _, end in results)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _shares(n: int, parts: int) -> list[int]:
    return [s for s in (n // parts + (i < n % parts) for i in range(parts)) if s]


def _summary(done: list) -> dict:
    ok = [s for status, s in done if status == 200]
    return {"requests": len(done), "ok": len(ok), "p50_ms": percentile(ok, 50) * 1000,
            "p99_ms": percentile(ok, 99) * 1000, "busy_503": sum(status == 503 for status, _ in done),
            "errors": sum(status not in (200, 503) for status, _ in done)}


def run_level(clients_runner, host, port, clients, args, body, content_type, seconds=None) -> dict:
    seconds = args.seconds if seconds is None else seconds
    start_at = time.time() + 0.2  # every process starts its clients then
    tasks = [(host, port, n, body, content_type, start_at, seconds, args.max_requests, args.timeout)
             for n in _shares(clients, clients_runner.procs)]
    done, end = clients_runner.run(closed_clients, tasks, seconds + args.timeout + 30)
    elapsed = end - start_at
    row = {"clients": clients, **_summary(done), "seconds": elapsed}
    row["rps"] = row["ok"] / elapsed
    return row


def schedule(rate: float, seconds: float, arrivals: str, seed: int) -> list[float]:
    """Offsets in seconds of the requests a rate issues in `seconds`: evenly spaced, or Poisson arrivals."""
    if arrivals == "even":
        return [k / rate for k in range(math.ceil(rate * seconds - 1e-9))]
    rng, t, out = random.Random(seed), 0.0, []
    while (t := t + rng.expovariate(rate)) < seconds:
        out.append(t)
    return out


class HealthPoller:
    """GET /healthz every 0.5 s from this process while a rate runs: how many answered 200, in how long."""

    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self.ok, self.failed, self.worst = 0, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                conn.request("GET", "/healthz")
                good = conn.getresponse().status == 200
                conn.close()
            except (OSError, http.client.HTTPException):
                good = False
            self.worst = max(self.worst, time.perf_counter() - start)
            self.ok, self.failed = self.ok + good, self.failed + (not good)
            self._stop.wait(max(0.0, 0.5 - (time.perf_counter() - start)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(self.timeout + 1)


def run_rate(clients_runner, host, port, spec, rate, args, body, content_type) -> dict:
    offsets = schedule(rate, args.seconds, args.arrivals, args.seed)
    procs = max(1, min(clients_runner.procs, len(offsets)))
    start_at = time.time() + 0.2
    tasks = [(host, port, offsets[i::procs], body, content_type, start_at, args.timeout) for i in range(procs)]
    with HealthPoller(host, port, min(args.timeout, 5.0)) as health:
        done, end = clients_runner.run(open_clients, tasks, args.seconds + args.timeout + 30)
    elapsed = max(end - start_at, args.seconds)
    row = {"rate": spec, "offered_rps": len(offsets) / args.seconds, **_summary(done), "seconds": elapsed,
           "healthz_ok": health.ok, "healthz_failed": health.failed, "healthz_worst_ms": health.worst * 1000}
    row["rps"] = row["ok"] / elapsed
    row["busy_503_rps"] = row["busy_503"] / elapsed
    return row


def offline_images_per_s(captioner, args) -> float:
    """The baseline: captioner.caption_images on --max-batch copies of the image, best of a few calls."""
    import torch
    from PIL import Image

    from vision_rwkv import SamplingConfig

    x = captioner.model.encoder.preprocess(Image.open(IMAGE).convert("RGB"))
    batch = torch.stack([x] * args.max_batch)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    captioner.caption_images(batch, sampling)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        captioner.caption_images(batch, sampling)
        best = min(best, time.perf_counter() - start)
    return args.max_batch / best


def load_captioner(args):
    import torch

    from vision_rwkv import Captioner

    if args.model == "checkpoint":
        return Captioner.load(args.checkpoint, device=args.device, dtype=args.dtype)
    if args.model == "stub":  # only its preprocess and description are used
        return Captioner.load(device="cpu", dtype="fp32")
    from vision_rwkv.caption.captioner import resolve_device

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from caption_throughput import build_model

    device = resolve_device(args.device)
    model = build_model(device)
    cuda = device.type == "cuda"
    if cuda and args.dtype != "fp32":
        model = model.to(torch.bfloat16)  # as caption_throughput.py does: bf16 weights, under autocast
    return Captioner(model, device, autocast=cuda)


class InProcessServer:
    def __init__(self, args):
        import uvicorn

        from vision_rwkv.config import ServeConfig
        from vision_rwkv.serve import create_app

        self.captioner = load_captioner(args)  # on CUDA the app's start-up warms it up (continuous.warm_up)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = ServeConfig(port=self.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_queue=args.max_queue, continuous=args.continuous, overlap_joins=args.overlap_joins,
                          intake_threads=args.intake_threads)
        app = self.app = create_app(self.captioner, cfg)
        if args.model == "stub":
            app.state.scheduler.submit = _answer_at_once
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    limit_concurrency=4096, backlog=4096,
                                                    http=args.http, loop=args.loop))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


class ProcessesServer:
    """--http-processes N: serve.processes.ProcessServer on a free loopback port, the model loaded in its own
    process by load_captioner(args) (so --model throughput works there too)."""

    def __init__(self, args):
        from functools import partial

        from vision_rwkv.config import ServeConfig
        from vision_rwkv.serve.processes import ProcessServer

        cfg = ServeConfig(port=0, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                          continuous=args.continuous, overlap_joins=args.overlap_joins,
                          intake_threads=args.intake_threads, http_processes=args.http_processes)
        self.server = ProcessServer(partial(load_captioner, args), cfg, name=args.model)

    def __enter__(self):
        self.server.start(timeout=600)
        self.port = self.server.port
        return self

    def __exit__(self, *exc):
        self.server.stop()


def _answer_at_once(images, sampling):
    """--model stub: what BatchScheduler.submit returns, done at once, with no model run."""
    from concurrent.futures import Future

    from vision_rwkv.serve.scheduler import Captioned

    done = Future()
    done.set_result(Captioned([[("a stub caption", 0.0)]] * images.shape[0], 0.0, 0.0, images.shape[0]))
    return done


def describe(captioner, args=None) -> str:
    import torch

    if captioner is None:
        return "a server at --url"
    if args is not None and args.model == "stub":
        return "stub: the HTTP side alone, every request answered at once with no model run"
    dev = captioner.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    c = captioner.model.config.decoder
    weights = str(captioner.model.decoder.emb.weight.dtype).removeprefix("torch.")
    return f"{name}, decoder L{c.n_layer}-D{c.n_embd} V{c.vocab_size}, {weights} weights, " \
           f"autocast {'bf16' if captioner.bf16 else 'off'}"


def measure(host, port, args, body, content_type, scheduler=None) -> tuple[list, list]:
    """The warm-up, the closed-loop levels, then the open-loop rates -> (closed rows, open rows). With the
    in-process server's scheduler, each row also gets what its worker thread did meanwhile (worker_fields)."""
    runner = Clients(args.client_procs)

    def watched(run, *a):
        before = dataclasses.replace(scheduler.stats) if scheduler is not None else None
        row = run(*a)
        if before is not None:
            row.update(worker_fields(scheduler.stats.since(before), row["seconds"]))
        # at once, on stderr: a run stopped by a time limit still leaves the levels it finished
        level = f"{row['clients']} clients" if "clients" in row else f"rate {row['rate']}"
        print(f"serve load: {level}: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
              f"{row['busy_503']} 503s, {row['errors']} errors", file=sys.stderr, flush=True)
        return row

    try:
        if args.warmup_seconds > 0:
            busiest = max(args.levels, default=args.max_batch)
            run_level(runner, host, port, min(busiest, args.max_batch), args, body, content_type,
                      seconds=args.warmup_seconds)
        closed = [watched(run_level, runner, host, port, n, args, body, content_type) for n in args.levels]
        capacity = max((r["rps"] for r in closed), default=float("nan"))
        opened = []
        for spec in args.rate_specs:
            rate = float(spec[:-1]) * capacity if spec.endswith("x") else float(spec)
            if not rate > 0:
                opened.append({"rate": spec, "offered_rps": 0.0, "skipped": "the capacity measured was 0"})
                continue
            opened.append(watched(run_rate, runner, host, port, spec, rate, args, body, content_type))
    finally:
        runner.close()
    return closed, opened


def worker_fields(stats, seconds: float) -> dict:
    """The worker's share of the wall time busy (joining, stepping or captioning whole requests), and its
    steps a second, mean rows a step, mean images a join and the share of steps taken while a join was in
    flight on its own stream, over one level; and the shares of parts of that time: launching joins and
    placing their rows (of joining), the step's read of its tokens and answering requests (of stepping)."""
    busy = stats.joining_s + stats.stepping_s + stats.captioning_s
    return {"worker_busy": busy / seconds, "worker_join_share": stats.joining_s / seconds,
            "steps_per_s": stats.steps / seconds, "rows_per_step": stats.row_steps / max(stats.steps, 1),
            "images_per_join": stats.joined_images / max(stats.joins, 1),
            "overlapped_share": stats.overlapped_steps / max(stats.steps, 1),
            **{f"worker_{part}_share": getattr(stats, f"{part}_s") / seconds
               for part in ("launching", "placing", "reading", "answering")}}


def main(argv=None) -> list[dict]:
    """Runs the load test and prints its tables -> the closed-loop rows (then the open-loop ones)."""
    args = parse_args(argv)
    body, content_type = multipart(IMAGE.read_bytes(), {"max_new_tokens": args.max_new_tokens})
    if args.url:
        target = urlsplit(args.url)
        if target.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--url must point at this machine (127.0.0.1, localhost or ::1), not {target.hostname}")
        closed, opened = measure(target.hostname, target.port or 80, args, body, content_type)
        return report(None, None, closed, opened, args)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.http_processes:
        if args.model == "stub":
            raise SystemExit("--model stub runs in this process only; leave --http-processes at 0")
        captioner = load_captioner(args)  # for the baseline and the description; the server loads its own
        baseline = offline_images_per_s(captioner, args)
        with ProcessesServer(args) as server:  # its .stats come from the model process
            closed, opened = measure("127.0.0.1", server.port, args, body, content_type, server.server)
        return report(captioner, baseline, closed, opened, args)
    with InProcessServer(args) as server:
        baseline = None if args.model == "stub" else offline_images_per_s(server.captioner, args)
        scheduler = None if args.model == "stub" else server.app.state.scheduler
        closed, opened = measure("127.0.0.1", server.port, args, body, content_type, scheduler)
    return report(server.captioner, baseline, closed, opened, args)


def report(captioner, baseline, closed, opened, args) -> list[dict]:
    device = describe(captioner, args)
    print(f"serve load: {device}; max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, "
          f"max_queue {args.max_queue}, continuous {args.continuous}, overlap_joins {args.overlap_joins}, "
          f"{args.max_new_tokens} new tokens max, "
          f"{args.seconds:g} s per level, {args.client_procs} client processes, {args.intake_threads} intake "
          f"threads, {args.http_processes or 'no'} separate HTTP processes; uvicorn http {args.http}, "
          f"loop {args.loop}, GIL switch interval {sys.getswitchinterval() * 1000:g} ms")
    if baseline is not None:
        print(f"baseline: offline caption_images at batch {args.max_batch}: {baseline:.1f} images/s")
    if closed:
        print(f"{'clients':>7} {'requests':>8} {'req/s':>8} {'vs offline':>10} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'503s':>6} {'errors':>6}")
    for r in closed:
        r["vs_offline"] = r["rps"] / baseline if baseline else float("nan")
        print(f"{r['clients']:>7} {r['requests']:>8} {r['rps']:>8.1f} {r['vs_offline']:>10.2f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['busy_503']:>6} {r['errors']:>6}")
    if opened:
        print(f"open loop ({args.arrivals} arrivals, {args.seconds:g} s a rate; capacity = the best closed-loop "
              f"req/s):")
        print(f"{'rate':>7} {'offered':>8} {'answered':>8} {'p50 ms':>8} {'p99 ms':>8} {'503s':>6} {'503/s':>7} "
              f"{'errors':>6} {'healthz':>9}")
    for r in opened:
        if "skipped" in r:
            print(f"{r['rate']:>7} skipped: {r['skipped']}")
            continue
        health = f"{r['healthz_ok']}/{r['healthz_ok'] + r['healthz_failed']}"
        print(f"{r['rate']:>7} {r['offered_rps']:>8.1f} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['busy_503']:>6} {r['busy_503_rps']:>7.1f} {r['errors']:>6} {health:>9}")
        if r["healthz_failed"]:
            print(f"        /healthz failed {r['healthz_failed']} times during this rate "
                  f"(slowest answer {r['healthz_worst_ms']:.0f} ms)")
    watched = [r for r in closed + opened if "worker_busy" in r]
    if watched:
        print("the worker thread meanwhile (busy: joining, stepping or captioning whole requests):")
        print(f"{'level':>7} {'busy':>6} {'joining':>8} {'steps/s':>8} {'rows/step':>9} {'images/join':>11} "
              f"{'steps beside a join':>19}")
    for r in watched:
        level = r["clients"] if "clients" in r else r["rate"]
        print(f"{level!s:>7} {r['worker_busy']:>6.0%} {r['worker_join_share']:>8.0%} {r['steps_per_s']:>8.1f} "
              f"{r['rows_per_step']:>9.1f} {r['images_per_join']:>11.1f} {r['overlapped_share']:>19.0%}")
    if watched:
        print("parts of it (launching joins and placing rows: of joining; reading tokens and answering: of "
              "stepping):")
        print(f"{'level':>7} {'launching':>9} {'placing':>8} {'reading':>8} {'answering':>9}")
    for r in watched:
        level = r["clients"] if "clients" in r else r["rate"]
        print(f"{level!s:>7} {r['worker_launching_share']:>9.0%} {r['worker_placing_share']:>8.0%} "
              f"{r['worker_reading_share']:>8.0%} {r['worker_answering_share']:>9.0%}")
    if args.json:
        write_json(args.json, device, baseline, closed, opened, args)
    return closed + opened


def write_json(path, device, baseline, closed, opened, args) -> None:
    from vision_rwkv._fs import atomic_write  # the project's one atomic write: a temp file, fsync, rename

    def plain(row):  # NaN (no answered request) is not JSON: null
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}

    settings = {k: v for k, v in vars(args).items() if k not in ("levels", "rate_specs")}
    doc = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "settings": settings,
           "baseline_images_per_s": baseline, "closed_loop": [plain(r) for r in closed],
           "open_loop": [plain(r) for r in opened]}
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
