"""``analysis``: records -> predicted vs actual tables, plots, and ``planner report`` errors."""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from lrcnn.analysis import compare, load_records, phase_table, runs_summary, segment_table, timeline
from lrcnn.analysis.records import RecordsError
from lrcnn.executor.run import COLUMNS
from lrcnn.planner.cli import main

from test_cli import assert_one_line_error


def records(run_id="r1", pred=True, steps=3, budget=np.nan):
    """Hand-made records of a run with one segment: peak 100 (tracked step 1), times 1.0/2.0/3.0."""
    rows = []
    base = {c: None for c in COLUMNS}
    base.update(run_id=run_id, model="m", device="cpu", batch=2, resolution="8x8", dtype="float32",
                budget_bytes=budget)
    for s in range(1, steps + 1):
        t = s == 1

        def add(scope, name, phase, peak, secs, p_peak, p_s, seg=-1, order=-1):
            rows.append(dict(base, step=s, tracked=t, scope=scope, name=name, phase=phase, segment=seg,
                             order=order, actual_peak_bytes=peak if t else np.nan, actual_s=float(secs),
                             predicted_peak_bytes=p_peak if pred else np.nan,
                             predicted_s=p_s if pred else np.nan, loss=3.0 - s))
        add("step", "step", "step", 100, s, 110, 2.5)
        for ph, pk in (("forward", 60), ("backward", 100), ("optimizer", 80)):
            add("phase", ph, ph, pk, s / 3, 50 if ph == "forward" else np.nan, np.nan)
        add("segment", "0 a..b", "forward", 40, s / 10, 50, 0.1, seg=0)
        add("segment", "0 a..b", "backward", 90, s / 5, 90, 0.4, seg=0)
        if t:
            for k, (lab, pk) in enumerate([("segment 0 forward begin", 30), ("segment 0 forward", 40),
                                           ("forward", 60), ("backward", 100), ("optimizer", 80)]):
                add("timeline", lab, "timeline", pk, np.nan, np.nan, np.nan, order=k)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["actual_live_bytes"] = df["actual_peak_bytes"]
    return df


def test_compare_errors_and_time_median():
    c = compare(records())
    assert list(c.scope) == ["step", "phase", "phase", "phase", "segment", "segment"]
    st = c.iloc[0]
    assert st.actual_peak_bytes == 100 and st.predicted_peak_bytes == 110
    assert st.peak_abs_err_bytes == 10 and st.peak_rel_err == pytest.approx(0.1)
    assert st.actual_s == 2.5  # median of the untracked steps 2 and 3, not the tracked step 1
    assert st.time_abs_err_s == 0 and st.time_rel_err == 0
    seg = segment_table(records())
    assert list(seg.phase) == ["forward", "backward"]
    assert seg.peak_rel_err.tolist() == pytest.approx([0.25, 0.0])
    ph = phase_table(records()).set_index("name")
    assert ph.loc["forward", "peak_rel_err"] == pytest.approx((50 - 60) / 60)
    assert math.isnan(ph.loc["backward", "peak_rel_err"])  # no prediction: NaN, never 0


def test_no_predictions_and_summary_across_runs():
    df = pd.concat([records("r1"), records("r2", pred=False, budget=50)], ignore_index=True)
    c = compare(df)
    assert c[c.run_id == "r2"].predicted_peak_bytes.isna().all()
    assert c[c.run_id == "r2"].peak_rel_err.isna().all()
    s = runs_summary(df).set_index("run_id")
    assert s.loc["r1", "within_budget"] and not s.loc["r2", "within_budget"]
    assert s.loc["r1", "first_loss"] == 2.0 and s.loc["r1", "last_loss"] == 0.0
    assert s.loc["r1", "steps"] == 3
    t = timeline(df, "r1")
    assert list(t.name) == ["segment 0 forward begin", "segment 0 forward", "forward", "backward", "optimizer"]


def test_load_report_csv_png(tmp_path, capfd):
    a, b = tmp_path / "a.parquet", tmp_path / "b.csv"
    records("r1").to_parquet(a)
    records("r2", pred=False).to_csv(b, index=False)
    df = load_records([a, b])
    assert set(df.run_id) == {"r1", "r2"} and df.tracked.dtype == bool
    png, csv = tmp_path / "p.png", tmp_path / "s.csv"
    rc = main(["report", str(a), str(b), "--png", str(png), "--csv", str(csv)])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "Runs" in out and "+10.0%" in out
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.std() > 0
    assert len(pd.read_csv(csv)) == 12


def test_report_bad_input(tmp_path, capfd):
    png, csv = tmp_path / "p.png", tmp_path / "s.csv"

    def bad(*files, needles=()):
        rc = main(["report", *map(str, files), "--png", str(png), "--csv", str(csv)])
        out, err = capfd.readouterr()
        assert_one_line_error(rc, out, err, *needles)
        assert not png.exists() and not csv.exists()
        assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []

    bad(tmp_path / "missing.parquet", needles=["does not exist"])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    bad(corrupt, needles=["cannot read records", "corrupt.parquet"])
    other = tmp_path / "other.csv"
    pd.DataFrame({"x": [1]}).to_csv(other, index=False)
    bad(other, needles=["not a records file", "missing column"])
    empty = tmp_path / "empty.csv"
    records().iloc[:0].to_csv(empty, index=False)
    bad(empty, needles=["no rows"])
    with pytest.raises(RecordsError):
        load_records([])


def rows_records(run_id="rows1", rank=0, world_size=1):
    """Hand-made records shaped like a real run's (the executor's mark labels): a rows segment of
    2 strips (backward: one BatchNorm sweep, then the real one) and a store segment; the first
    segment's backward has no end mark (its input needs no gradient)."""
    names = {0: "0 conv1..layer1_0_relu_2", 1: "1 layer2_0_conv1..fc"}
    modes = {0: "rows", 1: "store"}
    marks = ["segment 0 forward begin", f"rows {names[0][2:]} forward", "segment 0 forward",
             "segment 1 forward begin", "segment 1 forward", "forward",
             "segment 1 backward begin", "segment 1 backward", "segment 0 backward begin",
             *[f"rows {names[0][2:]} backward strip {i}" for i in (1, 0, 1, 0)],
             "backward", "optimizer", "end"]
    base = {c: None for c in COLUMNS}
    base.update(run_id=run_id, rank=rank, world_size=world_size, model="tiny_resnet", device="cuda:0",
                device_name="NVIDIA H100 80GB HBM3", torch_version="2.9.0", batch=4, resolution="64x64",
                dtype="float32", amp="bf16", budget_bytes=900_000.0, optimizer="momentum", lr=0.01,
                plan_path="/x/plan.json", mem_method="cuda")
    rows = []
    for s in (1, 2, 3):
        t = s == 1

        def add(scope, name, phase, peak, p_peak, secs=0.01, seg=-1, order=-1, mode=None):
            rows.append(dict(base, step=s, tracked=t, scope=scope, name=name, phase=phase, segment=seg, order=order,
                             mode=mode, actual_peak_bytes=peak if t else np.nan,
                             actual_live_bytes=peak if t else np.nan, actual_s=secs, predicted_peak_bytes=p_peak, predicted_s=secs * 0.9, loss=1.0))
        add("step", "step", "step", 800_000, 810_000)
        for ph, pk in (("forward", 600_000), ("backward", 800_000), ("optimizer", 300_000)):
            add("phase", ph, ph, pk, pk + 5_000)
        for i in (0, 1):
            for ph, pk in (("forward", 500_000 + i), ("backward", 700_000 + i)):
                add("segment", names[i], ph, pk, pk * 1.1, seg=i, mode=modes[i])
        if t:
            for k, lab in enumerate(marks):
                add("timeline", lab, "timeline", 300_000 + 10_000 * k, np.nan, secs=np.nan, order=k)
    return pd.DataFrame(rows, columns=COLUMNS)


def test_timeline_spans():
    from lrcnn.analysis.compare import timeline_spans

    sp = timeline_spans(timeline(rows_records()))
    assert sp["phases"] == [("forward", 0, 5), ("backward", 6, 13), ("optimizer", 14, 14)]
    assert sp["phase_of"][-1] is None  # "end": after the step's phases
    passes = [(s["segment"], s["direction"], s["first"], s["last"], s["strips"], s["sweeps"]) for s in sp["segments"]]
    assert passes == [(0, "forward", 1, 2, 0, 0), (1, "forward", 4, 4, 0, 0), (1, "backward", 7, 7, 0, 0),
                      (0, "backward", 9, 13, 2, 2)]  # segment 0's backward closes at the "backward" mark
    assert sp["strips"] == [9, 10, 11, 12]


def figure_texts(fig):
    """Every non-empty text of a drawn figure: titles, labels, tick labels, legends, free texts."""
    import matplotlib.text

    fig.draw_without_rendering()  # (tick labels are made at draw time)
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip()]


def test_report_figure_explains_itself():
    from matplotlib.collections import LineCollection

    from lrcnn.analysis import report_figure

    fig = report_figure(rows_records())
    texts = figure_texts(fig)
    joined = "\n".join(texts)
    for phase in ("forward", "backward", "optimizer step"):  # phases named over the timeline
        assert phase in texts
    for name in ("0 conv1..layer1_0_relu_2", "1 layer2_0_conv1..fc"):  # whole names: under the timeline, on the bars
        assert sum(name in t for t in texts) >= 4, name
    assert "0 conv1..layer1_0_relu_2\nrows, 2 strips \u00d7 2 sweeps" in texts  # the backward row pass
    assert "1 layer2_0_conv1..fc \u00b7 backward (store)" in texts
    header = next(t for t in texts if t.startswith("tiny_resnet"))
    for part in ("batch 4", "64x64", "float32 + autocast bf16", "budget 900 kB", "cuda:0 (NVIDIA H100 80GB HBM3)",
                 "torch 2.9.0"):
        assert part in header, (part, header)
    assert "run rows1" in joined and "memory counted by cuda" in joined
    assert "time the median of the other 2" in joined
    sub = fig.subfigs[0]
    timeline_ax = sub.axes[1]
    assert timeline_ax.get_ylabel() == "memory (KiB)"
    ticks = [c for c in timeline_ax.collections if isinstance(c, LineCollection) and len(c.get_segments()) == 4]
    assert ticks, "the 4 row strip marks are ticked"
    leg = timeline_ax.get_legend()
    assert leg is not None and "budget 879 KiB" in [t.get_text() for t in leg.get_texts()]
    # the legend hides no data: it lies outside the timeline's axes
    assert not leg.get_window_extent().overlaps(timeline_ax.get_window_extent())
    bars = sub.axes[2]
    assert [t.get_text() for t in bars.get_yticklabels()] == [
        "0 conv1..layer1_0_relu_2 \u00b7 forward (rows)", "1 layer2_0_conv1..fc \u00b7 forward (store)",
        "1 layer2_0_conv1..fc \u00b7 backward (store)", "0 conv1..layer1_0_relu_2 \u00b7 backward (rows)"]  # step order
    assert "+10.0%" in texts  # predicted vs actual beside the bars


def test_report_figure_one_panel_per_rank(tmp_path):
    from lrcnn.analysis import draw_report, report_figure

    df = pd.concat([rows_records("j-r0", 0, 2), rows_records("j-r1", 1, 2)], ignore_index=True)
    fig = report_figure(df)
    assert len(fig.subfigs) == 2
    texts = figure_texts(fig)
    for i in (0, 1):
        assert any(f"panel {i + 1} of 2" in t and f"run j-r{i}" in t and f"rank {i} of 2 (DDP)" in t for t in texts)
    assert any("batch 4 per rank (2 ranks: 8)" in t for t in texts)
    png = tmp_path / "ddp.png"
    draw_report(df, str(png))
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.shape[0] > img.shape[1]  # two panels, one under the other
    assert os.listdir(tmp_path) == ["ddp.png"]  # written atomically: no temporary left
