"""Reports of run records: predicted vs actual tables (``planner report``, optional CSV and PNG) and
the console summary of one run (``planner run``)."""
from __future__ import annotations

import math

from lrcnn.analysis.compare import compare, runs_summary
from lrcnn.analysis.plot import draw_report
from lrcnn.analysis.records import load_records
from lrcnn.planner.files import check_output_path, write_csv_atomic
from lrcnn.planner.units import format_table


def _mib(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v / 2**20:.2f}"


def _ms(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1e3:.1f}"


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:+.1%}"


def report(paths, csv=None, png=None) -> str:
    """Tables as text; writes the comparison CSV / PNG when asked (atomically)."""
    check_output_path(csv, "comparison CSV", (".csv",))
    check_output_path(png, "report plot", (".png",))
    df = load_records(paths)
    runs = runs_summary(df)
    cmp = compare(df)
    out = ["Runs"]
    out.append(format_table(
        ["run", "model", "device", "batch", "res", "dtype", "steps", "pred_MiB", "actual_MiB", "peak_err",
         "resv_MiB", "pred_ms", "actual_ms", "time_err", "budget_MiB", "ok", "loss"],
        [[str(r.run_id)[:12], r.model, r.device, r.batch, r.resolution, r.dtype, r.steps,
          _mib(r.predicted_peak_bytes), _mib(r.actual_peak_bytes), _pct(r.peak_rel_err),
          _mib(r.reserved_bytes) + ("*" if r.reserved_method == "model" else ""), _ms(r.predicted_s),
          _ms(r.actual_s), _pct(r.time_rel_err), _mib(r.budget_bytes), "yes" if r.within_budget else "OVER",
          f"{r.first_loss:.4g}->{r.last_loss:.4g}"] for r in runs.itertuples()],
        "lllrllrrrrrrrrrll"))
    if (runs.reserved_method == "model").any():
        out.append("* reserved peak modeled (the CUDA caching allocator model on the step's allocations), not measured")
    out.append("")
    out.append("Per phase and segment (peak: tracked step; time: median of the other steps)")
    out.append(format_table(
        ["run", "scope", "name", "phase", "pred_MiB", "actual_MiB", "abs_err_MiB", "rel_err",
         "pred_ms", "actual_ms", "abs_err_ms", "rel_err"],
        [[str(r.run_id)[:6], r.scope, r.name, r.phase, _mib(r.predicted_peak_bytes), _mib(r.actual_peak_bytes),
          _mib(r.peak_abs_err_bytes), _pct(r.peak_rel_err), _ms(r.predicted_s), _ms(r.actual_s),
          _ms(r.time_abs_err_s), _pct(r.time_rel_err)] for r in cmp.itertuples()],
        "llllrrrrrrrr"))
    if csv:
        write_csv_atomic(cmp, csv)
        out.append(f"\nwrote {csv} ({len(cmp)} rows)")
    if png:
        draw_report(df, png)
        out.append(f"wrote {png}")
    return "\n".join(out)


def _rel(p, a) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (p, a)) or a == 0:
        return "-"
    return f"{(p - a) / a:+.1%}"


def summarize(df) -> str:
    """The console summary of one run's records (``planner run``): the run in one line, then step,
    phases and segments, predicted vs actual peak MiB and median ms."""
    cmp = compare(df)
    ranks = dict(zip(df["run_id"], df["rank"])) if "rank" in df else {}
    multi = len(set(ranks.values())) > 1  # a distributed run: one block per rank
    rows = []
    for r in cmp.itertuples():
        rows.append(([ranks.get(r.run_id, 0)] if multi else [])
                    + [r.scope, r.name, r.phase, _mib(r.predicted_peak_bytes), _mib(r.actual_peak_bytes),
                       _rel(r.predicted_peak_bytes, r.actual_peak_bytes), _ms(r.predicted_s), _ms(r.actual_s),
                       _rel(r.predicted_s, r.actual_s)])
    head = (["rank"] if multi else []) + ["scope", "name", "phase", "pred_MiB", "actual_MiB", "peak_err",
                                          "pred_ms", "actual_ms", "time_err"]
    first = df.iloc[0]
    steps = df.loc[df.scope == "step"]
    if multi:
        steps = steps[steps["rank"] == first["rank"]]
    losses = steps["loss"]
    amp = first.get("amp")  # (absent in older records; NaN when read back from CSV)
    info = (f"{first['model']} {first['batch']}x3x{first['resolution']} {first['dtype']}{' + autocast ' + amp if isinstance(amp, str) and amp else ''} on {first['device']} "
            f"({first['device_name']}, torch {first['torch_version']}), {first['optimizer']} lr {first['lr']:g}, "
            f"{losses.size} step(s), loss {losses.iloc[0]:.4g} -> {losses.iloc[-1]:.4g}")
    if multi:
        info += (f" on rank {first['rank']}; {len(set(ranks.values()))} ranks (DDP), "
                 f"global batch {int(first['batch']) * len(set(ranks.values()))}")
    return info + "\n" + format_table(head, rows, ("r" if multi else "") + "lllrrrrrr") + _reserved_line(steps)


def _reserved_line(steps) -> str:
    """The run summary's reserved line (records that carry it): the step's reserved peak, measured
    or modeled, and on CUDA the model's figure beside it."""
    if "actual_reserved_bytes" not in steps:
        return ""
    tracked = steps[steps["tracked"]]
    resv = tracked["actual_reserved_bytes"].max() if len(tracked) else math.nan
    if not isinstance(resv, float) or math.isnan(resv):
        return ""
    first = tracked.iloc[0]
    conf = first.get("alloc_conf")
    conf = conf if isinstance(conf, str) and conf else "default settings"
    if first.get("reserved_method") == "cuda":
        text = (f"reserved peak {_mib(resv)} MiB measured (torch.cuda.max_memory_reserved; the allocator model on "
                f"the step's storages: {_mib(tracked['modeled_reserved_bytes'].max())} MiB)")
    else:
        text = (f"reserved peak {_mib(resv)} MiB modeled (the CUDA caching allocator model on the step's "
                f"allocations; no GPU measured it)")
    pred = first.get("predicted_reserved_bytes")
    if isinstance(pred, float) and not math.isnan(pred) and pred != first.get("predicted_peak_bytes"):
        text += f", {_mib(pred)} MiB kept for it by the plan"
    return "\n" + text + f"; allocator {conf}"
