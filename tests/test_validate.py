"""``planner validate`` (issue 26): plans across the budget range, each run for real on the CPU here,
predicted against measured; bad input one line, exit 2, no file."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from lrcnn.executor.validate import budget_points
from lrcnn.planner.cli import main


def test_budget_points_run_from_the_plain_step_down_to_the_smallest_plan():
    assert budget_points(100, 200, 3) == [200, 150, 100]
    assert budget_points(100, 200, 1) == [200]
    assert budget_points(100, 100, 4) == [100]  # nothing to trade: one plan
    assert budget_points(10, 12, 5) == [12, 11, 10]  # distinct budgets only
    with pytest.raises(ValueError, match="--points"):
        budget_points(1, 2, 0)


def test_validate_end_to_end_on_cpu(tmp_path, capsys):
    out, png, csv = str(tmp_path / "r.csv"), str(tmp_path / "v.png"), str(tmp_path / "t.csv")
    rc = main(["validate", "--model", "resnet18", "--batch", "2", "--resolution", "96", "--device", "cpu",
               "--points", "3", "--steps", "1", "--out", out, "--png", png, "--csv", csv, "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "plans within budget" in text and "budget_MiB" in text
    table = pd.read_csv(csv)
    assert len(table) >= 3 and table.within_budget.all()
    assert table.budget_bytes.is_monotonic_decreasing  # the plain step's budget first
    assert table.segments.iloc[0] == "store" and any("rows" in s for s in table.segments)
    # the CPU cost model against storage accounting, real steps of real plans
    assert (table.peak_err.abs() <= 0.025).all(), table[["budget_bytes", "peak_err"]]
    assert (table.measured_peak_bytes <= table.budget_bytes).all()
    # the reserved peak, modeled here (the CUDA caching allocator on each step's allocations)
    assert "resv_MiB(model)" in text and "budgets in allocated bytes" in text and "reserved above allocated (modeled)" in text
    assert (table.reserved_method == "model").all() and (table.reserved_bytes >= table.measured_peak_bytes).all()
    rec = pd.read_csv(out)
    assert set(rec.validate_point) == set(table.point) and set(rec.run_id) == set(table.run_id)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_validate_gpu_profile_on_cpu_keeps_reserved_bytes_within_budget(tmp_path, capsys):
    """Plans of a GPU profile keep their budget in reserved bytes: run here, each plan's reserved
    peak modeled on its real step's allocations stays within the budget (and within what the
    plan kept for it)."""
    csv = str(tmp_path / "t.csv")
    rc = main(["validate", "--model", "tiny_resnet", "--batch", "2", "--resolution", "32", "--device", "cpu",
               "--device-profile", "h100", "--points", "2", "--steps", "1", "--csv", csv, "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "budgets in reserved bytes" in text and "resv_MiB(model)" in text
    t = pd.read_csv(csv)
    assert t.within_budget.all() and (t.reserved_bytes <= t.budget_bytes).all()
    assert (t.reserved_bytes <= t.predicted_reserved_bytes).all() and (t.predicted_reserved_bytes <= t.budget_bytes).all()


@pytest.mark.parametrize("argv,msg", [
    (["--model", "nosuchnet"], "nosuchnet"),
    (["--model", "tiny_resnet", "--points", "0"], "--points"),
    (["--model", "tiny_resnet", "--out", "{tmp}/missing/r.parquet"], "missing"),
    (["--model", "tiny_resnet", "--out", "{tmp}/r.txt"], ".parquet or .csv"),
    (["--model", "tiny_resnet", "--png", "{tmp}/plot.jpg"], ".png"),
    (["--model", "tiny_resnet", "--device-profile", "{tmp}/nope.json"], "nope.json"),
] + ([] if torch.cuda.is_available() else [(["--model", "tiny_resnet", "--device", "cuda"], "no CUDA GPU")]))
def test_validate_bad_input(argv, msg, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["validate", *argv, "--quiet", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0] and "Traceback" not in err[0], err
    assert os.listdir(tmp_path) == []  # no file written
