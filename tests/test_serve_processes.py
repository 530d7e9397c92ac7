"""The server with the model in a process of its own behind HTTP processes (serve.processes), on the demo
model: the same answers as one process, errors across the pipe, a model that cannot load, a model process
that dies, and the command stopped by SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="the tests' client (in the [serve] extra)")

from starlette.testclient import TestClient  # noqa: E402

from vision_rwkv import Captioner, VisionRWKVError  # noqa: E402
from vision_rwkv.config import ServeConfig  # noqa: E402
from vision_rwkv.serve import create_app  # noqa: E402
from vision_rwkv.serve.processes import ProcessServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES_3 = REPO / "examples" / "shapes_test_3.png"
SHAPES_1 = REPO / "examples" / "shapes_test_1.png"
LOAD_DEMO = partial(Captioner.load, None, device="cpu", dtype="fp32")


def post(base, *paths, **fields):
    files = [("image", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{base}/v1/caption", files=files, data={k: str(v) for k, v in fields.items()}, timeout=60)


@pytest.fixture(scope="module")
def server():
    cfg = ServeConfig(port=0, http_processes=2, max_wait_ms=1, max_queue=2)
    server = ProcessServer(LOAD_DEMO, cfg, name="demo").start(timeout=120)
    try:
        yield server, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_process():
    with TestClient(create_app(LOAD_DEMO(), ServeConfig(max_wait_ms=1))) as c:
        yield c


def answers(response):
    assert response.status_code == 200, response.text
    return [[(c["caption"], round(c["score"], 4)) for c in r["captions"]] for r in response.json()["results"]]


@pytest.mark.parametrize("fields", [{}, {"strategy": "beam", "num_beams": 3, "num_return": 2},
                                    {"strategy": "sample", "seed": 5, "num_return": 2, "temperature": 1.5}])
def test_the_answers_equal_one_process(server, one_process, fields):
    _, base = server
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in (SHAPES_3, SHAPES_1)]
    expected = one_process.post("/v1/caption", files=files, data={k: str(v) for k, v in fields.items()})
    assert answers(post(base, SHAPES_3, SHAPES_1, **fields)) == answers(expected)


def test_every_http_process_answers_and_reports_the_model(server):
    srv, base = server
    for _ in range(6):  # connections land on either process; each must be able to caption
        assert answers(post(base, SHAPES_3))[0][0][0]
    health = httpx.get(f"{base}/healthz").json()
    assert health["status"] == "ok"
    info = httpx.get(f"{base}/v1/model").json()
    assert info["name"] == "demo" and info["device"] == "cpu" and info["limits"]["http_processes"] == 2
    assert [p.is_alive() for p in [srv.model, *srv.http]] == [True, True, True]
    stats = srv.stats  # the model process's worker counters, over the supervisor's own pipe
    assert stats.steps > 0 and stats.joined_images >= 6 and stats.stepping_s > 0


def test_errors_cross_the_pipe_as_one_process_gives_them(server):
    _, base = server
    full = post(base, SHAPES_3, SHAPES_1, SHAPES_3)  # 3 images, max_queue 2: refused by the model process
    assert full.status_code == 503 and full.headers["retry-after"] == "1" and "queue is full" in full.json()["error"]
    bad = post(base, SHAPES_3, strategy="beam", num_beams=2, top_p=0.5)  # refused in the HTTP process
    assert bad.status_code == 400 and "\n" not in bad.json()["error"]
    not_image = httpx.post(f"{base}/v1/caption", files=[("image", ("x.png", b"not a png", "image/png"))])
    assert not_image.status_code == 400 and "x.png" in not_image.json()["error"]


def test_the_pipe_carries_pixels_of_any_dtype_and_answers_and_errors_back():
    """EngineClient and serve_links over a pipe in this process, with a scheduler that echoes what it got."""
    import threading
    from concurrent.futures import Future
    from multiprocessing import Pipe

    import torch

    from vision_rwkv import SamplingConfig
    from vision_rwkv.serve import Captioned, QueueFull
    from vision_rwkv.serve.processes import EngineClient, serve_links
    from vision_rwkv.serve.scheduler import WorkerStats

    class Echo:
        stats, queued_images, got = WorkerStats(), 3, None

        def submit(self, images, sampling):
            if sampling.max_new_tokens == 1:
                raise QueueFull("the queue is full (test)")
            self.got, done = images, Future()
            done.set_result(Captioned([[(sampling.strategy, float(images.float().sum()))]], 1.0, 2.0, 1))
            return done

    echo, (ours, theirs) = Echo(), Pipe()
    reader = threading.Thread(target=serve_links, args=(echo, [theirs]))
    reader.start()
    client = EngineClient(ours).start()
    for dtype in (torch.uint8, torch.float32, torch.bfloat16):
        images = (torch.rand(1, 3, 4, 5) * 200).to(dtype)
        captioned = client.submit(images, SamplingConfig()).result(10)
        assert echo.got.dtype == dtype and torch.equal(echo.got, images)
        assert captioned.captions == [[("greedy", float(images.float().sum()))]] and captioned.queue_ms == 1.0
    assert client.queued_images == 3
    with pytest.raises(QueueFull, match="queue is full"):
        client.submit(images, SamplingConfig(max_new_tokens=1)).result(10)
    client.close(10)
    reader.join(10)
    assert not reader.is_alive() and not client.alive


def test_a_model_that_cannot_load_is_one_line_and_leaves_no_process(tmp_path):
    server = ProcessServer(partial(Captioner.load, str(tmp_path / "missing"), device="cpu"),
                           ServeConfig(port=0, http_processes=1))
    with pytest.raises(VisionRWKVError) as caught:
        server.start(timeout=120)
    assert "missing" in str(caught.value) and "\n" not in str(caught.value)
    assert not server.model.is_alive() and server.http == []


def test_when_the_model_process_dies_requests_get_503_and_the_server_stops():
    server = ProcessServer(LOAD_DEMO, ServeConfig(port=0, http_processes=1)).start(timeout=120)
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert answers(post(base, SHAPES_3))
        os.kill(server.model.pid, signal.SIGKILL)
        server.model.join(10)
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)  # the HTTP process learns of it when its pipe closes
        assert httpx.get(f"{base}/healthz").status_code == 503
        gone = post(base, SHAPES_3)
        assert gone.status_code == 503 and "model process has stopped" in gone.json()["error"]
        assert server.wait() == 1 and "vision-rwkv-model" in server.failure
        assert not any(p.is_alive() for p in server.http)
    finally:
        server.stop()


def test_an_http_process_that_dies_is_replaced():
    server = ProcessServer(LOAD_DEMO, ServeConfig(port=0, http_processes=1)).start(timeout=120)
    base = f"http://127.0.0.1:{server.port}"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(server.wait)  # wait() is what replaces the processes
        try:
            first = server.http[0]
            os.kill(first.pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while server.restarts == 0:
                assert time.monotonic() < deadline and not waiting.done(), server.failure
                time.sleep(0.05)
            assert server.http[0] is not first and server.http[0].is_alive()
            assert answers(post(base, SHAPES_3))  # the new process, over its new pipe to the model process
        finally:
            server.stop()
        assert waiting.result(60) == 0 and server.failure is None


def test_http_processes_that_keep_dying_stop_the_server(monkeypatch):
    from vision_rwkv.serve import processes

    monkeypatch.setattr(processes, "MAX_RESTARTS", 1)
    server = ProcessServer(LOAD_DEMO, ServeConfig(port=0, http_processes=1)).start(timeout=120)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(server.wait)
        try:
            os.kill(server.http[0].pid, signal.SIGKILL)  # replaced: the one restart allowed
            deadline = time.monotonic() + 60
            while server.restarts == 0:
                assert time.monotonic() < deadline and not waiting.done(), server.failure
                time.sleep(0.05)
            os.kill(server.http[0].pid, signal.SIGKILL)  # a second death within the window: give up
            assert waiting.result(60) == 1 and "within 60 s" in server.failure, server.failure
            assert not server.model.is_alive() and not server.http[0].is_alive()
        finally:
            server.stop()


def test_the_command_serves_and_sigterm_stops_every_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vision_rwkv", "serve", "device=cpu", f"port={port}",
                             "http_processes=2"], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stderr.readline()  # printed once every process serves
        assert "serving demo" in line and "2 HTTP processes" in line, line + proc.stderr.read()
        base = f"http://127.0.0.1:{port}"
        assert answers(post(base, SHAPES_3))
        children = _children(proc.pid)
        assert len(children) == 3
        with ThreadPoolExecutor(1) as pool:  # a slow request (about 3 s on a 2-core CPU), in flight at SIGTERM
            slow = pool.submit(post, base, *[SHAPES_3] * 16, strategy="sample", num_return=16, temperature=3,
                               max_new_tokens=128, seed=1)
            time.sleep(0.3)
            assert not slow.done()
            proc.send_signal(signal.SIGTERM)
            assert len(answers(slow.result(120))) == 16  # answered, not dropped
        assert proc.wait(60) == 0
        time.sleep(0.2)
        assert not [pid for pid in children if _running(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list[int]:
    """The spawned processes of pid (the spawn start method's resource tracker aside), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False
