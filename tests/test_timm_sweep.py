"""bench.timm_sweep end to end on two small timm models: the record format, not exactness."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("timm")

from lrcnn.analysis.bench import timm_sweep as ts  # noqa: E402

@pytest.fixture(autouse=True)
def _one_thread():
    # tiny steps: one thread is much faster than two fighting over a busy 2-core machine
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


STATUSES = {"exact", "inexact", "refused", "error"}
STAGES = {"", "create", "capture", "solve", "apply", "plain", "step", "compare", "sweep"}


def _check_record(r):
    assert list(r) == ts.FIELDS
    assert r["status"] in STATUSES, r
    assert r["stage"] in STAGES, r
    if r["status"] in ("exact", "inexact"):
        assert r["plan"] in ("smallest", "middle", "plain")
        assert r["budget_bytes"] > 0 and r["plain_peak_bytes"] > 0
        assert r["segments"] and all(":" in part for part in r["segments"].split())
        assert isinstance(r["max_err"], float) and r["max_err"] >= 0
        assert r["worst"] and r["stage"] == ""
        groups = [r[f"err_{k}"] for k in ("out", "loss", "xgrad", "grad", "param", "buffer")]
        assert all(isinstance(v, float) for v in groups)
        assert r["max_err"] == max(groups)
        assert (r["status"] == "exact") == (r["max_err"] <= ts.TOL)
        assert r["state"] == "kept" or r["state"].startswith("changed: ")
    else:
        assert r["stage"] and r["detail"], r
    assert isinstance(r["seconds"], float) and r["seconds"] >= 0


def test_sweep_two_models(tmp_path):
    # test_efficientnet (timm's tiny test net) is planned and trained; tf_efficientnet_lite0 (dynamic 'same' padding) is not
    # fx-traceable: a per-model record, and the sweep goes on
    rows = ts.sweep(["test_efficientnet", "tf_efficientnet_lite0"], progress=False, batch=2, resolution=32,
                    time_limit=5.0)
    for r in rows:
        _check_record(r)
    by = {}
    for r in rows:
        by.setdefault(r["model"], []).append(r)
    assert set(by) == {"test_efficientnet", "tf_efficientnet_lite0"}
    planned = by["test_efficientnet"]
    assert [r["plan"] for r in planned] in (["smallest", "middle"], ["plain"])
    assert all(r["status"] in ("exact", "inexact") for r in planned), planned
    assert all(r["params_M"] > 0 and r["nodes"] > 0 for r in planned)
    (bad,) = by["tf_efficientnet_lite0"]
    assert bad["status"] in ("refused", "error") and bad["stage"] == "capture"

    csv, md = tmp_path / "s.csv", tmp_path / "s.md"
    ts.write_outputs(rows, str(csv), str(md), "settings", 1.0)
    import pandas as pd

    df = pd.read_csv(csv)
    assert list(df.columns) == ts.FIELDS and len(df) == len(rows)
    text = md.read_text()
    assert "| model | plan |" in text and "test_efficientnet" in text and "Models: 2" in text


def test_compare_floor_and_missing_gradients():
    import torch

    from lrcnn.executor.exactness import compare

    step = {"out": torch.ones(2), "loss": torch.tensor(1.0), "xgrad": torch.ones(3),
            "grads": {"w": torch.full((4,), 1.0), "b": torch.zeros(2)}}
    ref = {"steps": [step, step], "params": {"w": torch.ones(4), "b": torch.zeros(2)},
           "buffers": {"n": torch.tensor(1)}}
    noisy = {**step, "grads": {"w": torch.full((4,), 1.0), "b": torch.full((2,), 1e-25)}}
    got = {**ref, "steps": [step, noisy], "buffers": {"n": torch.tensor(2)}}
    e = compare(got, ref, floor=1e-10)
    # a zero reference gradient: measured against 1e-10 x |G| (|G| = 2), never skipped
    assert e["grad:b@1"] == pytest.approx(math.sqrt(2) * 1e-25 / 2e-10)
    assert e["grad:b"] == 0.0 and e["buffer:n"] == 1.0 and e["out"] == 0.0 and e["out@1"] == 0.0
    assert ts._group_max(e, "grad") == e["grad:b@1"] and ts._kinds(["grad:x.b@1", "buffer:y.n"]) == "buffer:n grad:b"
    got["steps"] = [{**step, "grads": {"w": None, "b": step["grads"]["b"]}}, step]
    assert compare(got, ref)["grad:w"] == math.inf
    assert compare({**ref, "steps": [step]}, ref)["steps"] == math.inf


def test_state_diff_sees_buffers_and_flags():
    import torch.nn as nn

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    snap = ts.snapshot(m)
    assert ts.state_diff(snap, m) == []
    m[1].num_batches_tracked.add_(1)
    m[0].eval()
    assert ts.state_diff(snap, m) == ["1.num_batches_tracked", "0.training"]
