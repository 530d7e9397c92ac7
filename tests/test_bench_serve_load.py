"""bench/serve_load.py runs on the CPU at tiny sizes (a smoke test: its figures come from longer runs)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load  # noqa: E402


def test_the_load_bench_runs_and_every_request_is_answered(capsys):
    rows = serve_load.main(["--device", "cpu", "--clients", "1,4", "--seconds", "1", "--max-new-tokens", "4",
                            "--max-batch", "4", "--max-queue", "2", "--max-requests", "3"])
    assert [r["clients"] for r in rows] == [1, 4]
    for r in rows:
        assert r["errors"] == 0 and r["ok"] >= 1 and r["ok"] + r["busy_503"] == r["requests"]
        assert r["p50_ms"] > 0 and r["vs_offline"] > 0
    out = capsys.readouterr().out
    assert "baseline: offline caption_images at batch 4" in out and "CPU, decoder L4-D256" in out


def test_it_refuses_a_server_elsewhere():
    with pytest.raises(SystemExit, match="must point at this machine"):
        serve_load.main(["--url", "http://example.com:8000", "--clients", "1", "--seconds", "0.1"])
