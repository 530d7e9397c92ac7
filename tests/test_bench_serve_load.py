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


def test_client_processes_open_loop_rates_and_the_json(tmp_path, capsys):
    out = tmp_path / "load.json"
    rows = serve_load.main(["--device", "cpu", "--clients", "2", "--seconds", "1", "--max-new-tokens", "4",
                            "--max-batch", "4", "--client-procs", "2", "--rates", "3,0.5x", "--warmup-seconds", "0.5",
                            "--json", str(out)])
    assert rows[0]["clients"] == 2 and rows[0]["ok"] >= 1 and rows[0]["errors"] == 0
    import json

    report = json.loads(out.read_text())
    assert [r["spec"] for r in report["open_loop"]] == ["3", "0.5x"]
    for r in report["open_loop"]:
        assert r["errors"] == 0 and r["ok"] + r["busy_503"] == r["requests"] >= 1
        assert r["healthz_polls"] >= 1 and r["healthz_failed"] == 0
    assert report["open_loop"][0]["rate"] == 3.0
    assert report["open_loop"][1]["rate"] == 0.5 * rows[0]["rps"]
    assert "offered/s" in capsys.readouterr().out
