"""Cost-model accuracy grid: predicted vs measured vs simulated peak memory, and step time.

    python -m lrcnn.analysis.bench.cost_grid                      # full grid (4 models x 5 plans x 2 sizes)
    python -m lrcnn.analysis.bench.cost_grid --models resnet18 --sizes small
    python -m lrcnn.analysis.bench.cost_grid --csv grid.csv --profile profile.json
    python -m lrcnn.analysis.bench.cost_grid --bn train --no-time # training-mode BN (simulator only, no VGG)
    python -m lrcnn.analysis.bench.cost_grid --amp bf16 --no-time # mixed precision: captured and run under autocast

For every model, plan kind (plain, checkpoint, rows-2PS, rows-OverL, mixed) and size:

* ``small`` (batch 2, 64x64): the cost model's predicted absolute peak against a *real* CPU
  training step (storage accounting), against the simulator (the same step under fake tensors;
  it must agree with the real step within 1%), and predicted step time (calibrated cpu profile)
  against the measured median step time;
* ``large`` (batch 8, 224x224, the size people train at): predicted against simulated peak.

Peaks are whole-step absolute bytes: parameters, buffers, optimizer state (SGD momentum), batch,
activations, gradients and transients.  BatchNorm runs in eval mode (frozen) so every plan kind
applies to every model.  ``--bn train``: BatchNorm in training mode (batch statistics; inside row
segments by strip sweeps, executor.rows._BNStrip), models with BN only, predicted against the
simulator at both sizes (the real step is skipped: simulator and real step agree, see tests).
``--amp bf16|fp16``: the plans are captured, priced and run under CPU autocast in that dtype
(float32 parameters), as ``planner solve --amp`` plans them.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from lrcnn.executor import apply_plan
from lrcnn.executor.calibrate import calibrate
from lrcnn.executor.measure import autocast, make_optimizer, train_step_memory
from lrcnn.models import capture, get_model, set_bn_mode
from lrcnn.models.geometry import max_strips
from lrcnn.planner import Plan, Segment
from lrcnn.planner.cost import CostModel, load_profile
from lrcnn.planner.files import write_json_atomic

MODELS = ["vgg16", "resnet50", "resnet18", "mobilenet_v2"]
KINDS = ["plain", "checkpoint", "2ps", "overl", "mixed"]
SIZES = {"small": (2, 64), "large": (8, 224)}


def grid_plan(cm: CostModel, kind: str, strips: int = 4, bn: str = "eval") -> List[Segment]:
    """A plan of the given kind built from the graph's units (generic, any CNN).  ``bn='train'``:
    units with training-mode BN may run in rows (statistics by strip sweeps)."""
    g = cm.graph
    units = cm.units()
    rowwise = []
    for first, last in units:
        if not all(n.rowwise and (bn == "train" or not n.batch_stats) for n in g.span(first, last)):
            break
        rowwise.append((first, last))
    body = units[:len(rowwise)] if rowwise else units[:-1]
    if kind == "plain" or not body:
        return []
    if kind == "checkpoint":
        k = max(1, round(math.sqrt(len(body))))
        size = -(-len(body) // k)
        return [Segment(body[i][0], body[min(i + size, len(body)) - 1][1], "checkpoint")
                for i in range(0, len(body), size)]

    def rows(a, b, policy):
        seg = Segment(body[a][0], body[b - 1][1], "rows", policy=policy, strips=strips)
        src = g.source_of(seg.first).name
        seg.strips = max(1, min(strips, max_strips(cm.rg, src, seg.last, policy)))
        return seg

    half = max(1, len(body) // 2)
    if kind in ("2ps", "overl"):
        return [rows(0, half, kind)]
    third = max(1, len(body) // 3)
    segs = [rows(0, third, "overl")]
    if 2 * third > third:
        segs.append(rows(third, 2 * third, "2ps"))
    if len(body) > 2 * third:
        segs.append(Segment(body[2 * third][0], body[-1][1], "checkpoint"))
    return segs


def _step_time(model, shape, optimizer: str, steps: int = 5, warmup: int = 2, amp=None) -> float:
    """Median seconds of a training step after ``warmup`` steps (the first steps after the first
    one still run up to 1.5x slower on a CPU while allocator and oneDNN caches settle)."""
    opt = make_optimizer(model.parameters(), optimizer)
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name: str, kind: str, size: str, profile, optimizer: str = "momentum",
             real: Optional[bool] = None, timing: bool = True, bn: str = "eval",
             sim_cache: Optional[dict] = None, amp: Optional[str] = None) -> Dict:
    batch, res = SIZES[size]
    shape = (batch, 3, res, res)
    real = (size == "small" and bn == "eval") if real is None else real
    model = set_bn_mode(get_model(name, num_classes=10, device=None if real else "meta"), bn)
    graph = capture(model, shape, model_name=name, amp=amp)
    cm = CostModel(graph, optimizer=optimizer, profile=profile)
    segs = grid_plan(cm, kind, bn=bn)
    # (under autocast, row strips train only where the plan accepts their rounding: --amp-rows)
    plan = Plan.build(graph, segs, training={"optimizer": optimizer, "bn": bn, **({"amp_rows": True} if amp else {})})
    pred = cm.predict(plan)
    planned = apply_plan(model, plan, graph)
    row = {"model": name, "plan": kind, "size": f"{batch}x{res}x{res}",
           "segments": " ".join(f"{s.mode[0]}{(s.policy or '')[:1]}{s.strips or ''}" for s in segs) or "-",
           "predicted_MiB": pred["peak_bytes"] / 2**20}
    key = f"{name} {kind} {size} {bn} {optimizer} {row['segments']}" + (f" amp:{amp}" if amp else "")
    if sim_cache is not None and key in sim_cache:
        sim_peak = sim_cache[key]
    else:
        sim_peak = train_step_memory(planned, shape, optimizer, fake=True, amp=amp).absolute_peak
        if sim_cache is not None:
            sim_cache[key] = sim_peak
    row["simulated_MiB"] = sim_peak / 2**20
    row["err_sim_%"] = (pred["peak_bytes"] - sim_peak) / sim_peak * 100
    if real:
        meas = train_step_memory(planned, shape, optimizer, fake=False, amp=amp)
        row["measured_MiB"] = meas.absolute_peak / 2**20
        row["err_meas_%"] = (pred["peak_bytes"] - meas.absolute_peak) / meas.absolute_peak * 100
        row["sim_vs_meas_%"] = (sim_peak - meas.absolute_peak) / meas.absolute_peak * 100
        if timing:
            t = _step_time(planned, shape, optimizer, amp=amp)
            row["predicted_ms"] = pred["time_s"] * 1e3
            row["measured_ms"] = t * 1e3
            row["err_time_%"] = (pred["time_s"] - t) / t * 100
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrcnn.analysis.bench.cost_grid", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"default: {' '.join(MODELS)} (--bn train: those with BatchNorm)")
    ap.add_argument("--plans", nargs="+", default=KINDS, choices=KINDS)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--profile", default=None,
                    help="device profile name or file (default: calibrate this CPU first, about 25 s)")
    ap.add_argument("--no-time", action="store_true", help="skip the step-time measurements")
    ap.add_argument("--bn", default="eval", choices=["eval", "train"],
                    help="BatchNorm mode (train: batch statistics, simulator only)")
    ap.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                    help="mixed precision: capture, price and run under CPU autocast in this dtype")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--sim-cache", default=None,
                    help="JSON file of simulated peaks (read and extended): re-running the cost model "
                         "against an unchanged executor skips the simulation")
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = [m for m in MODELS if args.bn == "eval" or m != "vgg16"]
    import pandas as pd
    from tqdm import tqdm

    if args.profile is None and not args.no_time:
        profile = calibrate("cpu")
    else:
        profile = load_profile(args.profile or "cpu")
    torch.manual_seed(0)
    rows = []
    cache = None
    if args.sim_cache:
        import json
        import os

        cache = {}
        if os.path.exists(args.sim_cache):
            with open(args.sim_cache) as f:
                cache = json.load(f)
    cases = [(m, k, s) for s in args.sizes for m in args.models for k in args.plans]
    for m, k, s in tqdm(cases, desc="grid", file=sys.stderr):
        rows.append(run_case(m, k, s, profile, timing=not args.no_time and args.bn == "eval", bn=args.bn,
                             sim_cache=cache, amp=args.amp))
        if cache is not None:
            write_json_atomic(cache, args.sim_cache, "simulation cache")
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.2f}".format):
        print(df.to_string(index=False))
    print()
    for col in ("err_meas_%", "err_sim_%", "sim_vs_meas_%", "err_time_%"):
        if col in df:
            v = df[col].dropna().abs()
            print(f"{col:15s} median |err| {v.median():6.2f}%   worst {v.max():6.2f}%   ({len(v)} cases)")
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
