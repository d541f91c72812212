"""The figure of ``planner report --png``: per run, a header (model, batch, resolution, dtype,
budget, device, torch), the memory timeline of the measured step (phases shaded and named,
segment passes marked with their names, row strips ticked, predicted and actual peak of every
segment pass and of the optimizer step, the budget), and per segment pass predicted vs actual
peak and time as horizontal bars (full names).  Several runs (or DDP ranks): one panel each,
one under the other, in one PNG.

Matplotlib is imported when a figure is drawn, never before, and only through its object API
(:class:`matplotlib.figure.Figure`, no pyplot): drawing changes no backend and leaves no figure
open in the caller's pyplot."""
from __future__ import annotations

import math
import os

import numpy as np

from lrcnn.analysis.compare import compare, timeline, timeline_spans
from lrcnn.planner.files import atomic_write
from lrcnn.planner.units import binary_unit, fmt_both, fmt_bytes

#: runs drawn in one figure; the others are named in a line at the bottom
MAX_RUNS = 8
PHASES = ("forward", "backward", "optimizer")
PHASE_TITLES = {"forward": "forward", "backward": "backward", "optimizer": "optimizer step"}
PHASE_COLOURS = {"forward": "#e3eef9", "backward": "#fcebdc", "optimizer": "#e3f3dc"}
ACTUAL, PREDICTED, CURVE, LIVE, BUDGET, STRIP = "#1f4e79", "#e07b00", "#6fa8dc", "#7f7f7f", "#c00000", "#2e7d32"
WIDTH_IN = 15.0
#: the least share of the timeline's width of a segment pass and of the optimizer step
MIN_PASS, MIN_OPTIMIZER = 0.07, 0.06


def _value(row, col):
    """``row[col]``, or None when the column is missing or the value is None, NaN or empty."""
    v = row.get(col) if hasattr(row, "get") else None
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None
    return v


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.number)) and math.isfinite(float(v))


def _ms(s) -> str:
    if not _finite(s):
        return "-"
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def _rel(p, a) -> str:
    return f"{(p - a) / a:+.1%}" if _finite(p) and _finite(a) and a else "no prediction"


def run_header(g, cmp_run, index: int = 0, runs: int = 1):
    """The header of one run's panel: (first line, second line, third line).  ``g``: the run's
    records, ``cmp_run``: its rows of :func:`compare`."""
    first = g.iloc[0]
    model = _value(first, "model") or "?"
    dtype = _value(first, "dtype") or "?"
    amp = _value(first, "amp")
    parts = [str(model)]
    ws = _value(first, "world_size")
    ranks = int(ws) if _finite(ws) and int(ws) > 1 else 1
    if _value(first, "batch") is not None:
        parts.append(f"batch {first['batch']}" + (f" per rank ({ranks} ranks: {int(first['batch']) * ranks})"
                                                   if ranks > 1 else ""))
    if _value(first, "resolution") is not None:
        parts.append(f"{first['resolution']} px")
    parts.append(f"{dtype} + autocast {amp}" if amp else str(dtype))
    budget = _value(first, "budget_bytes")
    parts.append(f"budget {fmt_both(float(budget))}" if _finite(budget) else "no budget")
    dev, dev_name = _value(first, "device") or "?", _value(first, "device_name")
    parts.append(f"{dev} ({dev_name})" if dev_name and dev_name != dev else str(dev))
    tv = _value(first, "torch_version")
    parts.append(f"torch {tv}" if tv else "torch version not recorded")
    line1 = " \u00b7 ".join(parts)

    details = ([f"panel {index + 1} of {runs}"] if runs > 1 else []) + [f"run {first['run_id']}"]
    if ranks > 1:
        details.append(f"rank {int(first['rank'])} of {ranks} (DDP)")
    plan = _value(first, "plan_path")
    if plan:
        details.append(f"plan {os.path.basename(str(plan))}")
    opt, lr = _value(first, "optimizer"), _value(first, "lr")
    if opt:
        details.append(f"{opt} lr {float(lr):g}" if _finite(lr) else str(opt))
    steps = g.loc[g["scope"] == "step"]
    tracked = sorted(steps.loc[steps["tracked"], "step"].unique())
    n = int(steps["step"].nunique())
    if tracked:
        details.append(f"{n} step(s): memory of step {int(tracked[0])}, time the median of "
                       + (f"the other {n - len(tracked)}" if n > len(tracked) else "all (all tracked)"))
    data = _value(first, "data")
    if data:
        details.append(f"{data} data")
    method = _value(first, "mem_method")
    if method:
        details.append(f"memory counted by {method}")
    line2 = " \u00b7 ".join(details)

    peaks = []
    for _, r in cmp_run[cmp_run["scope"].isin(["step", "phase"])].iterrows():
        a, p = r["actual_peak_bytes"], r["predicted_peak_bytes"]
        if _finite(a):
            peaks.append(f"{PHASE_TITLES.get(r['name'], r['name'])} {fmt_bytes(a)} / "
                         + (f"{fmt_bytes(p)} ({_rel(p, a)})" if _finite(p) else "-"))
    line3 = ("peak, actual / predicted: " + " \u00b7 ".join(peaks)) if peaks else "no memory measured"
    st = cmp_run[cmp_run["scope"] == "step"]
    if len(st):
        a, p = st.iloc[0]["actual_s"], st.iloc[0]["predicted_s"]
        line3 += f"   |   step time {_ms(a)} / {_ms(p)}" + (f" ({_rel(p, a)})" if _finite(p) else "")
    return line1, line2, line3


def _segment_info(g):
    """segment index -> (name, mode), from the run's segment records."""
    s = g[g["scope"] == "segment"]
    return {int(r["segment"]): (str(r["name"]), _value(r, "mode")) for _, r in s.drop_duplicates("segment").iterrows()}


def _widths(n: int, sp) -> np.ndarray:
    """x widths of the timeline's intervals: one each, but every segment pass at least
    :data:`MIN_PASS` of the axis (a store pass is one or two intervals, a row pass dozens: its name
    must fit under it) and the optimizer step at least :data:`MIN_OPTIMIZER`."""
    groups = [list(range(s["first"], s["last"] + 1)) for s in sp["segments"]]
    least = [min(MIN_PASS, 0.8 / max(1, len(groups)))] * len(groups)
    opt = [k for k, p in enumerate(sp["phase_of"]) if p == "optimizer"]
    if opt:
        groups.append(opt)
        least.append(MIN_OPTIMIZER)
    w = np.ones(n)
    for _ in range(20):  # each widening widens the whole: a few rounds settle it
        total = w.sum()
        for ks, f in zip(groups, least):
            if ks and w[ks].sum() < f * total:
                w[ks] *= f * total / w[ks].sum()
    after = [k for k, p in enumerate(sp["phase_of"]) if p is None]  # after the optimizer mark: nothing runs
    if after:
        w[after] = min(1.0, 0.01 * w.sum())
    return w


def _draw_timeline(ax, t, cmp_run, seg_info, budget, unit):
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    name_u, scale = unit
    sp = timeline_spans(t)
    n = len(t)
    edges = np.concatenate([[0.0], np.cumsum(_widths(n, sp))])
    trans = blended_transform_factory(ax.transData, ax.transAxes)

    for ph, k0, k1 in sp["phases"]:
        ax.axvspan(edges[k0], edges[k1 + 1], color=PHASE_COLOURS[ph], zorder=0, lw=0)
        ax.text((edges[k0] + edges[k1 + 1]) / 2, 1.012, PHASE_TITLES[ph], transform=trans, ha="center",
                va="bottom", fontsize=10, fontweight="bold", clip_on=False)
    peak = t["actual_peak_bytes"].to_numpy(dtype=float) / scale
    live = t["actual_live_bytes"].to_numpy(dtype=float) / scale if "actual_live_bytes" in t else np.full(n, np.nan)
    ax.stairs(peak, edges, baseline=None, color=CURVE, lw=1.2, zorder=3)
    if np.isfinite(live).any():
        ax.plot(edges[1:], live, "o-", ms=2.5, lw=0.6, color=LIVE, zorder=3)

    strips = sp["strips"]
    if strips:
        ax.vlines(edges[np.array(strips) + 1], 0, 0.035, transform=trans, color=STRIP, lw=1.2, zorder=4)

    bounds = set()
    ticks, labels = [], []
    strips_of = {s["segment"]: s["strips"] for s in sp["segments"] if s["strips"]}
    rows = {(int(r["segment"]), r["phase"]): r for _, r in cmp_run[cmp_run["scope"] == "segment"].iterrows()}
    top = []
    for s in sp["segments"]:
        x0, x1 = edges[s["first"]], edges[s["last"] + 1]
        bounds.update((x0, x1))
        name, mode = seg_info.get(s["segment"], (f"segment {s['segment']}", None))
        what = mode or ""
        if mode == "rows" and s["segment"] in strips_of:
            what = f"rows, {strips_of[s['segment']]} strips"
            if s["sweeps"] > 1:
                what += f" \u00d7 {s['sweeps']} sweeps"
        ticks.append((x0 + x1) / 2)
        labels.append(f"{name}\n{what}" if what else name)
        r = rows.get((s["segment"], s["direction"]))
        if r is not None:
            for col, colour, ls in (("actual_peak_bytes", ACTUAL, "-"), ("predicted_peak_bytes", PREDICTED, "--")):
                if _finite(r[col]):
                    ax.hlines(r[col] / scale, x0, x1, colors=colour, lw=2.4, linestyles=ls, zorder=5)
                    top.append(r[col] / scale)
    for ph, k0, k1 in sp["phases"]:  # a phase without segment passes: its own peak marks
        if ph != "optimizer":
            continue
        r = cmp_run[(cmp_run["scope"] == "phase") & (cmp_run["name"] == ph)]
        for col, colour, ls in (("actual_peak_bytes", ACTUAL, "-"), ("predicted_peak_bytes", PREDICTED, "--")):
            if len(r) and _finite(r.iloc[0][col]):
                ax.hlines(r.iloc[0][col] / scale, edges[k0], edges[k1 + 1], colors=colour, lw=2.4, linestyles=ls,
                          zorder=5)
                top.append(r.iloc[0][col] / scale)
    for x in sorted(bounds):
        ax.axvline(x, color="0.55", lw=0.7, ls=":", zorder=1)

    handles = [Line2D([], [], color=CURVE, lw=1.2, label="actual peak between two marks")]
    if np.isfinite(live).any():
        handles.append(Line2D([], [], color=LIVE, marker="o", ms=2.5, lw=0.6, label="live at a mark"))
    handles += [Line2D([], [], color=ACTUAL, lw=2.4, label="actual peak of a segment pass\nor of the optimizer step"),
                Line2D([], [], color=PREDICTED, lw=2.4, ls="--", label="predicted peak, same span")]
    if strips:
        handles.append(Line2D([], [], color=STRIP, lw=1.2, label="row strip done (tick)"))
    if sp["segments"]:
        handles.append(Line2D([], [], color="0.55", lw=0.7, ls=":", label="segment pass begins / ends"))
    if _finite(budget):
        ax.axhline(budget / scale, color=BUDGET, ls="--", lw=1.3, zorder=4)
        handles.append(Line2D([], [], color=BUDGET, ls="--", lw=1.3, label=f"budget {fmt_bytes(budget)}"))
        top.append(budget / scale)
    top += [v for v in np.concatenate([peak, live]) if np.isfinite(v)]
    ax.set_ylim(0, max(top) * 1.08 if top else 1)
    ax.set_xlim(0, edges[-1])
    ax.set_xticks(ticks, labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    ax.tick_params(axis="x", length=0)
    ax.set_ylabel(f"memory ({name_u})")
    ax.set_xlabel("the step in order, from mark to mark (marks end phases, segment passes, row strips)",
                  fontsize=8)
    ax.set_title("memory over the measured step", fontsize=10, pad=20, loc="left")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False,
              borderaxespad=0)


def _pass_order(segs):
    """Segment passes in step order: forward by segment, then backward from the last segment."""
    import pandas as pd

    fwd = segs[segs["phase"] == "forward"].sort_values("segment", kind="stable")
    bwd = segs[segs["phase"] == "backward"].sort_values("segment", ascending=False, kind="stable")
    return pd.concat([fwd, bwd, segs[~segs["phase"].isin(["forward", "backward"])]])


def _draw_bars(ax_p, ax_t, segs, budget, unit):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    name_u, scale = unit
    segs = _pass_order(segs)
    y = np.arange(len(segs))
    h = 0.38
    labels = [f"{r['name']} \u00b7 {r['phase']}" + (f" ({r['mode']})" if _value(r, "mode") else "")
              for _, r in segs.iterrows()]
    for ax, a_col, p_col, err_col, k, what in (
            (ax_p, "actual_peak_bytes", "predicted_peak_bytes", "peak_rel_err", 1 / scale, f"peak ({name_u})"),
            (ax_t, "actual_s", "predicted_s", "time_rel_err", 1e3, "time (ms)")):
        what += ";  beside the bars: (predicted \u2212 actual) / actual"
        a = segs[a_col].to_numpy(dtype=float) * k
        p = segs[p_col].to_numpy(dtype=float) * k
        ax.barh(y - h / 2, np.nan_to_num(a), h, color=ACTUAL)
        ax.barh(y + h / 2, np.nan_to_num(p), h, color=PREDICTED)
        ends = np.fmax(np.nan_to_num(a), np.nan_to_num(p))
        right = max(ends.max() if len(ends) else 0, budget / scale if (ax is ax_p and _finite(budget)) else 0)
        for yi, e, rel in zip(y, ends, segs[err_col]):
            ax.text(e + right * 0.01, yi, f"{rel:+.1%}" if _finite(rel) else "no prediction", va="center",
                    fontsize=8, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
        ax.set_xlim(0, right * 1.18 if right > 0 else 1)
        ax.set_xlabel(what, fontsize=9)
        ax.grid(axis="x", color="0.9", lw=0.6)
        ax.set_axisbelow(True)
        if not np.isfinite(p).any():
            ax.text(0.99, 0.02, "no predictions in the records", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=8, color="0.3")
    if _finite(budget):
        ax_p.axvline(budget / scale, color=BUDGET, ls="--", lw=1.3)
    ax_p.set_yticks(y, labels, fontsize=8)
    ax_p.set_ylim(len(segs) - 0.5, -0.5)  # the first pass on top
    ax_t.tick_params(axis="y", labelleft=False)
    ax_p.set_title("peak per segment pass (the measured step)", fontsize=10, loc="left")
    ax_t.set_title("time per segment pass (median of the other steps)", fontsize=10, loc="left")
    handles = [Patch(color=ACTUAL, label="actual"), Patch(color=PREDICTED, label="predicted")]
    if _finite(budget):
        handles.append(Line2D([], [], color=BUDGET, ls="--", lw=1.3, label="budget (peak)"))
    ax_t.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False,
                borderaxespad=0)


def _panel(sub, g, cmp_run, index: int, runs: int) -> None:
    """One run's panel in the SubFigure ``sub``: header, timeline, bars."""
    from matplotlib.transforms import blended_transform_factory

    run_id = g["run_id"].iloc[0]
    t = timeline(g, run_id)
    segs = cmp_run[cmp_run["scope"] == "segment"]
    budget = _value(g.iloc[0], "budget_bytes")
    budget = float(budget) if _finite(budget) else None
    vals = [budget or 0.0]
    for c in ("actual_peak_bytes", "predicted_peak_bytes"):
        vals += [float(v) for v in cmp_run[c] if _finite(v)]
        if c in t:
            vals += [float(v) for v in t[c] if _finite(v)]
    unit = binary_unit(max(vals), "KiB")

    gs = sub.add_gridspec(3, 2, height_ratios=_heights(len(segs))[1:], width_ratios=[1, 1])
    head = sub.add_subplot(gs[0, :])
    head.axis("off")
    l1, l2, l3 = run_header(g, cmp_run, index, runs)
    across = blended_transform_factory(sub.transSubfigure, head.transAxes)  # from the panel's left edge
    for y, text, size, weight in ((1.0, l1, 12, "bold"), (0.55, l2, 9, "normal"), (0.22, l3, 9, "normal")):
        head.text(0.006, y, text, fontsize=size, fontweight=weight, va="top", ha="left", transform=across,
                  in_layout=False)  # (the header spans the panel: it must not squeeze the plots)

    ax = sub.add_subplot(gs[1, :])
    if t.empty:
        ax.text(0.5, 0.5, "no memory timeline in the records (no tracked step)", ha="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        _draw_timeline(ax, t, cmp_run, _segment_info(g), budget, unit)
    ax_p = sub.add_subplot(gs[2, 0])
    ax_t = sub.add_subplot(gs[2, 1], sharey=ax_p)
    if len(segs):
        _draw_bars(ax_p, ax_t, segs, budget, unit)
    else:
        for a in (ax_p, ax_t):
            a.set_axis_off()
        ax_p.text(0.5, 0.5, "no segments in the records", ha="center", transform=ax_p.transAxes)


def _heights(n_passes: int):
    """Inches: (the panel, its header, timeline, bars)."""
    head, tl, bars = 1.0, 4.8, max(2.2, 0.34 * n_passes + 1.1)
    return head + tl + bars, head, tl, bars


def report_figure(df):
    """The report's figure (a :class:`matplotlib.figure.Figure`, not saved, no pyplot): one panel
    per run in the records (a run of a DDP job: one per rank), at most :data:`MAX_RUNS`."""
    from matplotlib.figure import Figure

    cmp = compare(df)
    run_ids = list(dict.fromkeys(df["run_id"]))
    drawn = run_ids[:MAX_RUNS]
    panels = []
    for rid in drawn:
        g = df[df["run_id"] == rid]
        cr = cmp[cmp["run_id"] == rid] if len(cmp) else cmp
        panels.append((g, cr, _heights(int((cr["scope"] == "segment").sum()) if len(cr) else 0)[0]))
    heights = [p[2] for p in panels] + ([0.35] if len(run_ids) > len(drawn) else [])
    fig = Figure(figsize=(WIDTH_IN, sum(heights)), layout="constrained")
    subs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    for i, (sub, (g, cr, _)) in enumerate(zip(subs, panels)):
        if len(panels) > 1:
            sub.set_facecolor("white" if i % 2 == 0 else "#f4f4f4")
        _panel(sub, g, cr, i, len(run_ids))
    if len(heights) > len(panels):
        rest = ", ".join(str(r)[:12] for r in run_ids[len(drawn):])
        subs[-1].text(0.01, 0.5, f"{len(run_ids) - len(drawn)} more run(s) not drawn, report them separately: "
                      f"{rest}", fontsize=9, va="center")
    return fig


def draw_report(df, path: str) -> None:
    """Write :func:`report_figure` as a PNG at ``path``, atomically (tmp + os.replace)."""
    fig = report_figure(df)
    atomic_write(path, "PNG", lambda tmp: fig.savefig(tmp, dpi=100, format="png"), ".png")
