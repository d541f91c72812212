"""Wall time of ``planner.solve`` (capture + pricing + ILP) at budgets that force row segments.

    python -m lrcnn.analysis.bench.solve_time                      # VGG-16, ResNet-50, ResNet-152, batch 32, 224x224
    python -m lrcnn.analysis.bench.solve_time --models resnet50 --profile cpu --csv out.csv

For each model the budget is set halfway between the smallest plan of any kind and the smallest
plan without row segments (``--policy checkpoint``), so no store/checkpoint-only plan fits and the
solver must use rows.  Working out that budget is not timed; the timed part is what ``planner
solve`` does after start-up: capture, cost-model pricing of every candidate, min-peak check, warm
start and the ILP.  The torch/torchvision import and the first-capture warm-up (fx, fake tensors)
are paid once before the first model and are not in the numbers (``planner solve`` pays them too:
about 3-5 s on a loaded 2-core machine).  ``--solver cbc`` forces the ILP (warm-started from the
DP); ``cbc+dp`` in the table means CBC stopped at its time limit on the plan the exact DP proves
optimal (``ilp_gap_%``: CBC's own gap then).  ResNets run with BatchNorm in eval mode: row segments
over train-mode BatchNorm are not supported by cost model v0.
"""
from __future__ import annotations

import argparse
import sys
import time
from lrcnn.planner.files import write_csv_atomic
from lrcnn.planner.solve import Solver, capture_model
from lrcnn.planner.units import format_table, fmt_both

TARGETS = {"vgg16": 3.0, "resnet50": 10.0, "resnet152": 30.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "resnet152"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--bn", default="train", choices=["train", "eval"])
    ap.add_argument("--solver", default="auto", help="auto (exact DP where it applies) | cbc | highs")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)

    import pandas as pd

    capture_model("tiny_resnet", (2, 3, 32, 32))  # one-time warm-up (imports, fx, fake tensors)
    rows = []
    for name in args.models:
        bn = args.bn
        _, g = capture_model(name, None, bn=bn, batch=args.batch)
        lo_any = Solver(g, name, bn=bn, device_profile=args.profile).min_peak()
        lo_ckpt = Solver(g, name, bn=bn, device_profile=args.profile, policy="checkpoint").min_peak()
        budget = (lo_any + lo_ckpt) // 2

        t0 = time.perf_counter()
        _, graph = capture_model(name, None, bn=bn, batch=args.batch)
        t1 = time.perf_counter()
        s = Solver(graph, name, bn=bn, device_profile=args.profile, solver=args.solver)
        s.problem  # price the candidates now (lazy otherwise), so pricing_s is its own column
        t2 = time.perf_counter()
        plan = s.solve(budget, time_limit=args.time_limit)
        t3 = time.perf_counter()
        info, pred = plan.solver, plan.predicted
        nrows = sum(seg.mode == "rows" for seg in plan.segments)
        rows.append({
            "model": name, "batch": args.batch, "bn": bn, "budget": fmt_both(budget),
            "units": info["units"], "candidates": info["candidates"],
            "capture_s": round(t1 - t0, 2), "pricing_s": round(t2 - t1, 2), "solve_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2), "target_s": TARGETS.get(name, float("nan")),
            "solver": info["solver"], "status": info["status"], "gap_%": round(100 * info["gap"], 3),
            "ilp_gap_%": round(100 * info["ilp_gap"], 2) if "ilp_gap" in info else "", "row_segs": nrows,
            "peak_GB": round(pred["peak_bytes"] / 1e9, 3),
            "overhead_%": round(100 * (pred["time_s"] / info["baseline_time_s"] - 1), 2),
        })
        print(f"{name}: {rows[-1]['total_s']} s", file=sys.stderr)
    df = pd.DataFrame(rows)
    print(format_table(list(df.columns), df.values.tolist()))
    if args.csv:
        write_csv_atomic(df, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
