"""Predicted vs actual: per step / phase / segment, with absolute and relative errors.

Errors are signed, ``predicted - actual`` (positive: the cost model over-estimates), relative
to the actual value.  Memory: the peak of the tracked step(s) (the maximum if several).  Time:
the median over untracked steps (the tracked step runs under the memory tracker, which slows it),
or over all steps when every step was tracked.  Missing predictions stay NaN.
"""
from __future__ import annotations

import numpy as np

KEYS = ["run_id", "scope", "name", "phase", "segment"]
_SCOPE_ORDER = {"step": 0, "phase": 1, "segment": 2}
_PHASE_ORDER = {"step": 0, "forward": 1, "backward": 2, "optimizer": 3}


def _errors(out):
    out["peak_abs_err_bytes"] = out["predicted_peak_bytes"] - out["actual_peak_bytes"]
    out["peak_rel_err"] = out["peak_abs_err_bytes"] / out["actual_peak_bytes"].replace(0, np.nan)
    out["time_abs_err_s"] = out["predicted_s"] - out["actual_s"]
    out["time_rel_err"] = out["time_abs_err_s"] / out["actual_s"].replace(0, np.nan)
    return out


def compare(df):
    """One row per (run, scope, name, phase): predicted/actual peak and time, their errors."""
    import pandas as pd

    d = df[df["scope"].isin(list(_SCOPE_ORDER))]
    rows = []
    for key, g in d.groupby(KEYS, sort=False, dropna=False):
        tracked = g[g["tracked"]]
        untracked = g[~g["tracked"]]
        times = untracked["actual_s"] if untracked["actual_s"].notna().any() else g["actual_s"]
        first = g.iloc[0]
        rows.append(dict(zip(KEYS, key), mode=first.get("mode"), model=first["model"], device=first["device"],
                         predicted_peak_bytes=g["predicted_peak_bytes"].iloc[0],
                         actual_peak_bytes=tracked["actual_peak_bytes"].max() if len(tracked) else np.nan,
                         predicted_s=g["predicted_s"].iloc[0], actual_s=times.median(),
                         steps=int(g["step"].nunique())))
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = _errors(out)
    out["_s"] = out["scope"].map(_SCOPE_ORDER)
    out["_p"] = out["phase"].map(_PHASE_ORDER).fillna(9)
    order = {r: i for i, r in enumerate(dict.fromkeys(df["run_id"]))}
    out["_r"] = out["run_id"].map(order)
    out = out.sort_values(["_r", "_s", "segment", "_p"], kind="stable").drop(columns=["_s", "_p", "_r"])
    return out.reset_index(drop=True)


def segment_table(df):
    """:func:`compare` restricted to segments (forward and backward of each)."""
    c = compare(df)
    return c[c["scope"] == "segment"].reset_index(drop=True) if len(c) else c


def phase_table(df):
    """:func:`compare` restricted to the whole step and its phases."""
    c = compare(df)
    return c[c["scope"].isin(["step", "phase"])].reset_index(drop=True) if len(c) else c


def runs_summary(df):
    """One row per run: setting, whole-step peak and time predicted vs actual, the reserved peak
    (measured on CUDA, modeled on the CPU), budget (within it: the allocated peak, and the
    reserved one where the budget is in reserved bytes), losses."""
    import pandas as pd

    c = compare(df)
    rows = []
    for run_id, g in df.groupby("run_id", sort=False):
        steps = g[g["scope"] == "step"].sort_values("step")
        first = g.iloc[0]
        st = c[(c["run_id"] == run_id) & (c["scope"] == "step")].iloc[0]
        budget = first.get("budget_bytes", np.nan)
        budget = np.nan if budget is None else float(budget)
        # reserved peak (records before it existed: NaN); it counts where the budget is reserved bytes
        resv = pd.to_numeric(steps.get("actual_reserved_bytes", pd.Series(dtype=float)), errors="coerce").max()
        in_reserved = first.get("budget_in") == "reserved"
        within = np.isnan(budget) or (st["actual_peak_bytes"] <= budget and not (in_reserved and resv > budget))
        rows.append(dict(run_id=run_id, model=first["model"], device=first["device"],
                         batch=first.get("batch"), resolution=first.get("resolution"), dtype=first.get("dtype"),
                         steps=int(steps["step"].nunique()),
                         predicted_peak_bytes=st["predicted_peak_bytes"], actual_peak_bytes=st["actual_peak_bytes"],
                         reserved_bytes=resv, reserved_method=first.get("reserved_method", ""),
                         predicted_s=st["predicted_s"], actual_s=st["actual_s"], budget_bytes=budget,
                         within_budget=bool(within),
                         first_loss=steps["loss"].iloc[0], last_loss=steps["loss"].iloc[-1]))
    return _errors(pd.DataFrame(rows))


def timeline(df, run_id=None):
    """The memory timeline of a run's tracked step: one row per mark, in order."""
    t = df[df["scope"] == "timeline"]
    if run_id is None and len(t):
        run_id = t["run_id"].iloc[0]
    t = t[t["run_id"] == run_id]
    return t.sort_values(["step", "order"]).reset_index(drop=True)


def timeline_spans(t):
    """Where the marks of a :func:`timeline` fall in the step: mark ``k`` closes interval ``k`` (the
    bytes since mark ``k-1``; interval 0 starts with the step).  Returns a dict of

    * ``phases``: ``(phase, first, last)`` intervals of forward, backward and optimizer in order
      (the phase marks close them; what follows the optimizer mark, ``end``, is in none);
    * ``segments``: one dict per segment pass, in step order: ``segment``, ``direction``
      (forward/backward), ``first``/``last`` interval, ``strips`` (the row strips its marks name,
      0 when none) and ``sweeps`` (backward strip sweeps: one per BatchNorm level, then the real one);
    * ``strips``: the intervals a row strip closes (``rows ... strip i`` marks).

    Segment passes open at their ``begin`` mark and close at their own end mark; a backward
    pass with none (the first segment's: its input needs no gradient) closes at the ``backward``
    mark, as :meth:`lrcnn.executor.measure.StepMeasure.span` measures it."""
    names = [str(n) for n in t["name"]]
    phase_of, phases, segs, strips = [], [], [], []
    current, order = "forward", {"forward": "backward", "backward": "optimizer", "optimizer": None}
    open_seg = None
    for k, lab in enumerate(names):
        phase_of.append(current)
        parts = lab.split()
        if len(parts) >= 3 and parts[0] == "segment" and parts[1].isdigit() and parts[2] in ("forward", "backward"):
            i, direction = int(parts[1]), parts[2]
            if parts[-1] == "begin":
                if open_seg is not None:  # a pass left open (no end mark): it ends where the next begins
                    open_seg["last"] = k
                    segs.append(open_seg)
                open_seg = dict(segment=i, direction=direction, first=k + 1, last=None, strips=0, sweeps=0,
                                _ids=[])
            elif open_seg is not None and open_seg["segment"] == i and open_seg["direction"] == direction:
                open_seg["last"] = k
                segs.append(open_seg)
                open_seg = None
        elif parts[:1] == ["rows"] and len(parts) >= 3 and parts[-2] == "strip" and parts[-1].isdigit():
            strips.append(k)
            if open_seg is not None:
                open_seg["_ids"].append(int(parts[-1]))
        if lab in order and current == lab:
            if open_seg is not None and lab == "backward":  # the first segment's backward: no end mark
                open_seg["last"] = k
                segs.append(open_seg)
                open_seg = None
            current = order[lab]
    if open_seg is not None:
        open_seg["last"] = len(names) - 1
        segs.append(open_seg)
    for s in segs:
        ids = s.pop("_ids")
        if ids:
            s["strips"] = len(set(ids))
            s["sweeps"] = sum(1 for a, b in zip([None] + ids, ids) if a is None or b >= a)  # a sweep counts down
    for ph in ("forward", "backward", "optimizer"):
        ks = [k for k, p in enumerate(phase_of) if p == ph]
        if ks:
            phases.append((ph, ks[0], ks[-1]))
    return dict(phases=phases, segments=segs, strips=strips, phase_of=phase_of)
