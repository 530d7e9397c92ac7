"""bench/coco_recipe.py runs its whole path on the CPU at tiny sizes (its figures come from a GPU run)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import coco_recipe  # noqa: E402


def test_the_recipe_bench_measures_every_stage_and_projects_the_wall_time(tmp_path, capsys):
    out = tmp_path / "recipe.json"
    report = coco_recipe.main(["--device", "cpu", "--smoke", "--train-images", "12", "--test-images", "4",
                               "--steps", "2", "--workers", "0", "--big", "tiny", "--json", str(out)])
    assert report["cache"]["images"] == 12 and report["cache"]["images_per_s"] > 0
    assert report["cache"]["bytes_per_image"] > 0
    assert set(report["train"]) == {"projector", "all"}
    assert all(r["samples_per_s"] > 0 and r["batch"] == 4 for r in report["train"].values())
    assert report["eval"]["images"] == 4 and report["eval"]["images_per_s"] > 0
    p = report["projection"]
    assert p["samples"] == 30_000 * 4 and p["evaluations"] == 15  # the recipe's steps and eval_every
    assert p["total_s"] == pytest.approx(p["cache_s"] + p["projector_s"] + p["all_s"] + p["eval_s"])
    assert p["projector_s"] == pytest.approx(5_000 * 4 / report["train"]["projector"]["samples_per_s"])
    assert [(r["decoder"], r["activation_checkpointing"]) for r in report["big"]] == [("tiny", False), ("tiny", True)]
    assert json.loads(out.read_text())["projection"]["total_s"] == pytest.approx(p["total_s"])
    assert "the recipe's wall time, projected" in capsys.readouterr().out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        coco_recipe.main(["--steps", "0"])
