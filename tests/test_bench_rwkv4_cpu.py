"""bench/rwkv4_cpu.py runs at a tiny size (a smoke test: its figures come from full-size runs)."""

import sys
from pathlib import Path

import pytest

from vision_rwkv.ops.rwkv7 import cpu_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import rwkv4_cpu  # noqa: E402

BUILD_FAILED = cpu_step.build()


@pytest.mark.skipif(BUILD_FAILED is not None, reason=f"{BUILD_FAILED}")
def test_the_rwkv4_cpu_bench_times_the_cpp_step_lm_step_and_gpt_mode(capsys):
    rows = rwkv4_cpu.main(["--layers", "2", "--embd", "64", "--vocab", "100", "--steps", "2", "--prefill", "8",
                           "--no-baseline"])
    steps, gpt = rows[:4], rows[4:]
    assert [(r["weights"], r["batch"]) for r in steps] == [("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8)]
    assert all(r["cpp_step"] > 0 and r["lm_step"] > 0 and r["rwkv_pkg"] is None for r in steps)
    assert [(r["prefill"], r["weights"]) for r in gpt] == [(8, "fp32"), (8, "bf16")]
    assert all(r["wkv4_kernel"] > 0 and r["wkv4_reference"] > 0 and r["rwkv_pkg"] is None for r in gpt)
    assert "RWKV-4 L2-D64 V100" in capsys.readouterr().out
