"""bench/decode_path.py runs in-process on the CPU with a tiny model (a smoke test: figures come from a GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode_path  # noqa: E402


def test_the_decode_path_bench_runs_and_both_loops_agree(capsys):
    rows = decode_path.main(["--device", "cpu", "--layers", "2", "--embd", "64", "--vocab", "300",
                             "--batches", "1,3", "--new-tokens", "4", "--beams", "2", "--repeats", "1"])
    assert [(r["strategy"], r["batch"], r["rows"]) for r in rows] == [("greedy", 1, 1), ("beam", 1, 2),
                                                                      ("greedy", 3, 3), ("beam", 3, 6)]
    assert all(r["same"] and r["new_ms_per_token"] > 0 and r["ratio"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "CPU" in out and "L2-D64 V300" in out and out.count(" yes") == 4
