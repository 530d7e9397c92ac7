"""A bounded load test of the captioning server on localhost: N concurrent clients for T seconds each.

    python bench/serve_load.py [--clients 1,8,32,128] [--seconds 10] [--device cpu] [--checkpoint DIR]
    python bench/serve_load.py --model throughput --device cuda --max-batch 128 --max-new-tokens 20 \
        --client-procs 8 --rates 0.5x,2x --json out.json
    python bench/serve_load.py --url http://127.0.0.1:8000      # a server already running (loopback only)

Without --url the server runs in this process (uvicorn on a free loopback port, in a thread) with the demo
model or --checkpoint, and the baseline is measured in the same run: the offline Captioner.caption_images
throughput at --max-batch images per call, on the same image and settings. Every client posts
examples/shapes_test_3.png (multipart, greedy, --max-new-tokens) in a loop, keep-alive, until T seconds
or --max-requests have passed. Per N: requests/s, p50 and p99 latency of the answered requests, and
the 503s and other errors. Every request is bounded by a timeout, so a run cannot hang.

--model throughput serves caption_throughput.py's model instead (ViT-B-16 + mlp projector + RWKV-7 L12-D768
V65536, random weights, bf16 on CUDA): its decoder rarely ends a caption, so each runs --max-new-tokens.
--client-procs spreads the clients over that many processes (threads in each), so that the clients do not
share the server's interpreter. --rates runs open-loop levels after the closed-loop ones: requests sent on a
fixed schedule whatever the answers, at R requests/s, or at a multiple of the measured capacity (the best
closed-loop req/s) written 0.5x, 2x; per rate, the answered share, p50/p99, the 503s and whether /healthz
answered throughout (polled every 0.5 s). Before the timed levels, an untimed warm-up level captures the
CUDA graphs. --json writes every row, the baseline and the settings.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "shapes_test_3.png"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server on localhost; default: start one in this process")
    p.add_argument("--clients", default="1,8,32,128", help="comma-separated concurrency levels")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each level runs")
    p.add_argument("--max-requests", type=int, default=100_000, help="per client and level, a second bound")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument("--checkpoint", default=None, help="in-process server: a caption checkpoint (default: demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--no-continuous", dest="continuous", action="store_false",
                   help="batch every request whole (no rows joining the running decode)")
    p.add_argument("--model", choices=("checkpoint", "throughput"), default="checkpoint",
                   help="in-process server: --checkpoint's model (the demo by default), or the throughput model")
    p.add_argument("--client-procs", type=int, default=1, help="processes the clients run in (1: threads here)")
    p.add_argument("--rates", default="", help="open-loop levels: requests/s, or multiples of capacity (0.5x, 2x)")
    p.add_argument("--warmup-seconds", type=float, default=2.0, help="an untimed level before the timed ones")
    p.add_argument("--json", default=None, help="write the rows, baseline and settings here")
    return p.parse_args(argv)


def multipart(image: bytes, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{IMAGE.name}"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def client_loop(host, port, body, content_type, until, max_requests, timeout, out: list):
    """Post until the deadline; out receives (status or an error name, seconds) per request."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    for _ in range(max_requests):
        if time.perf_counter() >= until:
            break
        start = time.perf_counter()
        try:
            conn.request("POST", "/v1/caption", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            out.append((response.status, time.perf_counter() - start))
        except (OSError, http.client.HTTPException) as e:
            out.append((type(e).__name__, time.perf_counter() - start))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.close()


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _threads(target, n, *args) -> list:
    """n threads running target(*args, out) -> every out's items, once all have ended."""
    outs = [[] for _ in range(n)]
    threads = [threading.Thread(target=target, args=(*args, out)) for out in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for out in outs for r in out]


def _closed_share(host, port, body, content_type, seconds, max_requests, timeout, clients):
    """A client process's share of a closed-loop level: its clients as threads; -> (status, seconds) list."""
    until = time.perf_counter() + seconds
    return _threads(client_loop, clients, host, port, body, content_type, until, max_requests, timeout)


def _open_share(host, port, body, content_type, seconds, rate, timeout, offset):
    """A client process's share of an open-loop level: a request every 1/rate s from offset, each in a thread of
    its own (bounded by timeout), whatever the answers."""
    results, threads = [], []
    start = time.perf_counter() + offset

    def one(out=results):
        client_loop(host, port, body, content_type, float("inf"), 1, timeout, out)

    k = 0
    while True:
        at = start + k / rate
        if at - start >= seconds:
            break
        time.sleep(max(0.0, at - time.perf_counter()))
        t = threading.Thread(target=one)
        t.start()
        threads.append(t)
        k += 1
    for t in threads:
        t.join()
    return results


def _spread(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def run_level(host, port, clients, args, body, content_type) -> dict:
    start = time.perf_counter()
    procs = max(1, min(args.client_procs, clients))
    if procs == 1:
        done = _closed_share(host, port, body, content_type, args.seconds, args.max_requests, args.timeout, clients)
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            shares = pool.starmap(_closed_share, [(host, port, body, content_type, args.seconds, args.max_requests,
                                                   args.timeout, n) for n in _spread(clients, procs) if n])
        done = [r for share in shares for r in share]
    elapsed = time.perf_counter() - start
    ok = [s for status, s in done if status == 200]
    return {"clients": clients, "requests": len(done), "ok": len(ok), "rps": len(ok) / elapsed,
            "p50_ms": percentile(ok, 50) * 1000, "p99_ms": percentile(ok, 99) * 1000,
            "busy_503": sum(status == 503 for status, _ in done),
            "errors": sum(status not in (200, 503) for status, _ in done), "seconds": elapsed}


def run_rate(host, port, rate, args, body, content_type) -> dict:
    """An open-loop level at `rate` requests/s for --seconds, /healthz polled throughout."""
    health = {"polls": 0, "failed": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection(host, port, timeout=5)
                conn.request("GET", "/healthz")
                ok = conn.getresponse().status == 200
                conn.close()
            except (OSError, http.client.HTTPException):
                ok = False
            health["polls"] += 1
            health["failed"] += not ok
            stop.wait(0.5)

    poller = threading.Thread(target=poll)
    poller.start()
    procs = max(1, args.client_procs)
    start = time.perf_counter()
    try:
        if procs == 1:
            done = _open_share(host, port, body, content_type, args.seconds, rate, args.timeout, 0.0)
        else:
            with multiprocessing.get_context("spawn").Pool(procs) as pool:
                shares = pool.starmap(_open_share, [(host, port, body, content_type, args.seconds, rate / procs,
                                                     args.timeout, i / rate) for i in range(procs)])
            done = [r for share in shares for r in share]
    finally:
        stop.set()
        poller.join()
    elapsed = time.perf_counter() - start
    ok = [s for status, s in done if status == 200]
    busy = sum(status == 503 for status, _ in done)
    return {"rate": rate, "requests": len(done), "ok": len(ok), "answered_rps": len(ok) / elapsed,
            "p50_ms": percentile(ok, 50) * 1000, "p99_ms": percentile(ok, 99) * 1000, "busy_503": busy,
            "busy_share": busy / max(1, len(done)), "errors": sum(status not in (200, 503) for status, _ in done),
            "healthz_polls": health["polls"], "healthz_failed": health["failed"], "seconds": elapsed}


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


class InProcessServer:
    def __init__(self, args):
        import uvicorn

        from vision_rwkv import Captioner
        from vision_rwkv.config import ServeConfig
        from vision_rwkv.serve import create_app

        if args.model == "throughput":
            import torch

            sys.path.insert(0, str(REPO / "bench"))
            from caption_throughput import build_model

            device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                  ("cpu" if args.device == "auto" else args.device))
            model = build_model(device)
            self.captioner = Captioner(model.to(torch.bfloat16) if device.type == "cuda" else model, device)
        else:
            self.captioner = Captioner.load(args.checkpoint, device=args.device, dtype=args.dtype)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = ServeConfig(port=self.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_queue=args.max_queue, continuous=args.continuous)
        app = create_app(self.captioner, cfg)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    limit_concurrency=4096, backlog=4096))
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


def describe(captioner) -> str:
    import torch

    if captioner is None:
        return "a server at --url"
    dev = captioner.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    c = captioner.model.config.decoder
    return f"{name}, decoder L{c.n_layer}-D{c.n_embd} V{c.vocab_size}, {'bf16' if captioner.bf16 else 'fp32'}"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    levels = [int(n) for n in args.clients.split(",")]
    body, content_type = multipart(IMAGE.read_bytes(), {"max_new_tokens": args.max_new_tokens})
    if args.url:
        target = urlsplit(args.url)
        if target.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--url must point at this machine (127.0.0.1, localhost or ::1), not {target.hostname}")
        return report(None, None, [run_level(target.hostname, target.port or 80, n, args, body, content_type)
                                   for n in levels], args)
    with InProcessServer(args) as server:
        baseline = offline_images_per_s(server.captioner, args)
        if args.warmup_seconds > 0:  # graphs for the batch sizes the levels reach, the allocator's pools
            warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup_seconds})
            for n in sorted({1, max(levels)}):
                run_level("127.0.0.1", server.port, n, warm, body, content_type)
        rows = [run_level("127.0.0.1", server.port, n, args, body, content_type) for n in levels]
        rates = []
        if args.rates:
            capacity = max(r["rps"] for r in rows)
            for spec in args.rates.split(","):
                rate = float(spec[:-1]) * capacity if spec.endswith("x") else float(spec)
                rates.append(run_rate("127.0.0.1", server.port, rate, args, body, content_type) | {"spec": spec})
    rows = report(server.captioner, baseline, rows, args)
    report_rates(rates)
    if args.json:
        out = {"device": describe(server.captioner), "baseline_images_per_s": baseline, "closed_loop": rows,
               "open_loop": rates, "settings": {k: v for k, v in vars(args).items() if k != "json"}}
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
    return rows


def report(captioner, baseline, rows, args) -> list[dict]:
    print(f"serve load: {describe(captioner)}; max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, "
          f"max_queue {args.max_queue}, continuous {args.continuous}, {args.max_new_tokens} new tokens max, "
          f"{args.seconds:g} s per level")
    if baseline is not None:
        print(f"baseline: offline caption_images at batch {args.max_batch}: {baseline:.1f} images/s")
    print(f"{'clients':>7} {'requests':>8} {'req/s':>8} {'vs offline':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'503s':>6} {'errors':>6}")
    for r in rows:
        r["vs_offline"] = r["rps"] / baseline if baseline else float("nan")
        print(f"{r['clients']:>7} {r['requests']:>8} {r['rps']:>8.1f} {r['vs_offline']:>10.2f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['busy_503']:>6} {r['errors']:>6}")
    return rows


def report_rates(rates: list[dict]) -> None:
    if not rates:
        return
    print(f"{'offered/s':>9} {'answered/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'503s':>6} {'503 %':>6} {'errors':>6} "
          f"{'healthz failed':>14}")
    for r in rates:
        print(f"{r['rate']:>9.1f} {r['answered_rps']:>10.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['busy_503']:>6} {100 * r['busy_share']:>5.1f}% {r['errors']:>6} "
              f"{r['healthz_failed']:>6} of {r['healthz_polls']:<5}")


if __name__ == "__main__":
    main()
