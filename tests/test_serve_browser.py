"""The real server (serve.py in a subprocess, the demo model) driven by headless Chromium through Playwright:
the page captions examples/shapes_test_3.png as caption.py does. SIGTERM drains a request in flight."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the [serve] extra")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")

REPO = Path(__file__).resolve().parents[1]
SHAPES_3 = REPO / "examples" / "shapes_test_3.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"port={port}", "device=cpu", "max_wait_ms=300"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve.py exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("serve.py did not answer /healthz within 120 s")
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def caption_py_says(path: Path) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "caption.py"), str(path), "device=cpu"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.slow
def test_the_page_in_chromium_shows_the_caption_caption_py_prints(server):
    if CHROMIUM is None:
        pytest.skip("no browser: the Debian chromium package is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    url, _ = server
    expected = caption_py_says(SHAPES_3)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#model:has-text('demo on cpu')", timeout=30_000)
            page.set_input_files("#file", str(SHAPES_3))
            page.wait_for_selector(".card .caption", timeout=60_000)
            shown = page.inner_text(".card .caption")
            assert page.inner_text(".card .name") == SHAPES_3.name
            assert "log-prob" in page.inner_text(".card .score")
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(Path(tempfile.mkdtemp(prefix="vision-rwkv-page-")) / "page.png"))
            page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"hello"}])
            page.wait_for_selector(".card .card-error", timeout=60_000)
            assert page.inner_text("#error") == "notes.png: not an image (or a format Pillow cannot read)"
        finally:
            browser.close()
    assert shown == expected


def test_sigterm_drains_the_request_in_flight(server):
    url, proc = server
    boundary = "vrwkvboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + SHAPES_3.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/v1/caption", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = {}

    def post():
        with urllib.request.urlopen(request, timeout=60) as r:
            answer["status"], answer["body"] = r.status, json.loads(r.read())

    t = threading.Thread(target=post)
    t.start()
    time.sleep(0.1)  # the request waits in the batch window (max_wait_ms=300) when SIGTERM comes
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert answer.get("status") == 200, answer
    assert answer["body"]["results"][0]["captions"][0]["caption"]
    # uvicorn re-raises the signal once it has shut down gracefully, so the exit reads as SIGTERM's
    assert proc.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in proc.stderr.read()
