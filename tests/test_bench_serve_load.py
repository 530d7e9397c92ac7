"""bench/serve_load.py runs on the CPU at tiny sizes (a smoke test: its figures come from longer runs)."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load  # noqa: E402

TINY = ["--device", "cpu", "--max-new-tokens", "4", "--max-batch", "4", "--warmup-seconds", "0.2"]


def test_the_load_bench_runs_and_every_request_is_answered(capsys):
    rows = serve_load.main(TINY + ["--clients", "1,4", "--seconds", "1", "--max-queue", "2", "--max-requests", "3",
                                   "--client-procs", "1"])
    assert [r["clients"] for r in rows] == [1, 4]
    for r in rows:
        assert r["errors"] == 0 and r["ok"] >= 1 and r["ok"] + r["busy_503"] == r["requests"]
        assert r["p50_ms"] > 0 and r["vs_offline"] > 0
        assert 0 < r["worker_busy"] <= 1.05 and r["steps_per_s"] > 0 and 1 <= r["rows_per_step"] <= 4
    captured = capsys.readouterr()
    out = captured.out
    assert "the worker thread meanwhile" in out
    assert "serve load: 1 clients: " in captured.err and "serve load: 4 clients: " in captured.err  # as they end
    assert "baseline: offline caption_images at batch 4" in out and "CPU, decoder L4-D256" in out


@pytest.mark.parametrize("procs", [1, 2])
def test_open_loop_rates_in_client_processes_and_the_json(tmp_path, capsys, procs):
    """A closed level, then an absolute rate and one relative to the capacity it measured, the clients in
    this process or in two spawned ones; every row, the baseline and the settings land in the JSON."""
    path = tmp_path / "load.json"
    rows = serve_load.main(TINY + ["--clients", "1", "--seconds", "1", "--rates", "2,0.5x",
                                   "--client-procs", str(procs), "--json", str(path)])
    closed, absolute, relative = rows
    assert closed["clients"] == 1 and closed["ok"] >= 1
    assert absolute["rate"] == "2" and absolute["offered_rps"] == 2 and absolute["requests"] == 2
    assert relative["offered_rps"] == pytest.approx(0.5 * closed["rps"], abs=1)  # a whole number of requests
    for r in (absolute, relative):
        assert r["errors"] == 0 and r["ok"] + r["busy_503"] == r["requests"] and r["ok"] >= 1
        assert r["healthz_ok"] >= 1 and r["healthz_failed"] == 0
    doc = json.loads(path.read_text())
    assert doc["settings"]["client_procs"] == procs and doc["settings"]["rates"] == "2,0.5x"
    assert doc["baseline_images_per_s"] > 0 and "CPU" in doc["device"]
    assert [r["clients"] for r in doc["closed_loop"]] == [1]
    assert [r["rate"] for r in doc["open_loop"]] == ["2", "0.5x"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it
    assert "open loop (even arrivals" in capsys.readouterr().out


def test_the_load_bench_runs_against_the_model_in_its_own_process(capsys):
    rows = serve_load.main(TINY + ["--clients", "2", "--seconds", "1", "--client-procs", "1",
                                   "--http-processes", "2"])
    (row,) = rows
    assert row["errors"] == 0 and row["ok"] >= 1 and row["vs_offline"] > 0
    assert 0 < row["worker_busy"] <= 1.05 and row["steps_per_s"] > 0  # the model process's own counters
    out = capsys.readouterr().out
    assert "2 separate HTTP processes" in out and "the worker thread meanwhile" in out


def test_schedules_are_fixed():
    assert serve_load.schedule(4, 1, "even", 0) == [0, 0.25, 0.5, 0.75]
    poisson = serve_load.schedule(50, 2, "poisson", 7)
    assert poisson == serve_load.schedule(50, 2, "poisson", 7) and 50 < len(poisson) < 150
    assert poisson == sorted(poisson) and 0 < poisson[0] and poisson[-1] < 2


def test_bad_rates_are_refused_before_any_work():
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--rates", "fast"])
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--clients", "", "--rates", "2x"])  # no closed loop to measure the capacity


def test_it_refuses_a_server_elsewhere():
    with pytest.raises(SystemExit, match="must point at this machine"):
        serve_load.main(["--url", "http://example.com:8000", "--clients", "1", "--seconds", "0.1"])


def test_the_parse_bench_runs_and_both_parsers_agree(capsys):
    import serve_parse

    best = serve_parse.main(["--repeats", "3", "--rounds", "1"])
    assert set(best) == {"email.parser", "ours"} and all(v > 0 for v in best.values())
    assert "1165-byte request" in capsys.readouterr().out


def test_the_stub_model_measures_the_http_side_alone(capsys):
    rows = serve_load.main(["--model", "stub", "--clients", "2", "--seconds", "0.5", "--warmup-seconds", "0",
                            "--max-requests", "5", "--client-procs", "1"])
    assert rows[0]["requests"] == 10 and rows[0]["errors"] == 0 and rows[0]["busy_503"] == 0
    assert "stub: the HTTP side alone" in capsys.readouterr().out


def test_the_worker_bench_times_joins_and_steps_on_the_cpu(capsys):
    import serve_worker

    rows = serve_worker.main(["--device", "cpu", "--model", "demo", "--rows", "1,3", "--joins", "2",
                              "--steps", "2", "--repeats", "1", "--profile"])
    steps, joins = rows[:2], rows[2:]
    assert [r["rows"] for r in steps] == [1, 3] and [r["capacity"] for r in steps] == [1, 4]
    assert all(r["join_ms"] > 0 and r["step_ms"] > 0 and r["bare_ms"] > 0 for r in steps)
    assert joins == [{"join_images": 2, "join_ms": joins[0]["join_ms"]}] and joins[0]["join_ms"] > 0
    out = capsys.readouterr().out
    assert "joins padded in chunks of none" in out and "Ordered by: internal time" in out


def test_the_worker_bench_stops_stepping_once_every_row_has_ended(capsys):
    import serve_worker

    # the demo model's greedy caption of a blank image ends long before 60 steps; the steps ended used to
    # crash the run (a step on an empty batch)
    rows = serve_worker.main(["--device", "cpu", "--model", "demo", "--rows", "2", "--joins", "1",
                              "--steps", "60", "--repeats", "1"])
    assert 0 < rows[0]["steps"] < 60 and rows[0]["step_ms"] > 0
    assert "every row ended after" in capsys.readouterr().out
