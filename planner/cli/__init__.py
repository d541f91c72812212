"""The ``planner`` command line: ``planner <verb> [options]``.

Verbs so far: ``models`` (the model zoo), ``inspect`` (per-layer table of a captured model),
``check-plan`` (validate a plan JSON against its model), ``solve`` (the ILP planner), ``run`` (train with a plan, record
predicted vs actual; :mod:`executor.run`) and ``report`` (tables and plots of run records;
:mod:`analysis`).  Later verbs (solve, simulate, run,
report, bench, calibrate) plug into the same pattern:

* write ``_add_<verb>(subparsers)`` that creates the subparser (``--help`` comes free) and sets
  ``func=cmd_<verb>``, and append it to :data:`SUBCOMMANDS`;
* ``cmd_<verb>(args) -> int`` does the work and raises ``ValueError`` (``ModelError``,
  ``CaptureError``, ``PlanError``, ...) with a one-line message that names the problem and the fix.

:func:`main` turns every such error, and every argparse usage error, into one line on stderr
(``planner: error: ...``) and exit code 2, with no traceback.  Output files are written atomically
(:func:`write_csv_atomic`), so a failed command never leaves a half-written file behind.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

EXIT_OK = 0
EXIT_ERROR = 2

from lrcnn.models.capture import build_and_capture
from lrcnn.planner.cost import check_profile
from lrcnn.planner.files import check_output_path, write_csv_atomic
from lrcnn.planner.plan import AMP_DTYPES, BN_MODES, DTYPES, plan_model, precision
from lrcnn.planner.solve import max_batch, pareto_frame
from lrcnn.planner.units import format_table
DEFAULT_BATCH = 32

_RES_RE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


# ------------------------------------------------------------------------------------------------
# Reusable parsing helpers
# ------------------------------------------------------------------------------------------------

def parse_resolution(text: str) -> Tuple[int, int]:
    """``(H, W)`` from ``"224"`` (square) or ``"512x384"`` (H x W).

    Raises ``ValueError`` with a one-line message for anything else (``"22x"``, ``"abc"``,
    ``"0x5"``, negative or empty sizes).
    """
    m = _RES_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read resolution {text!r}: use H or HxW with positive integers, "
                         f"e.g. 224 or 512x384")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
    if h < 1 or w < 1:
        raise ValueError(f"resolution {text!r} must have positive height and width, e.g. 224 or 512x384")
    return h, w




def _argtype(fn: Callable):
    """Wrap a ValueError-raising parser as an argparse ``type`` that keeps its message."""
    def conv(text):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = fn.__name__
    return conv


def _int_at_least(text: str, lo: int) -> int:
    want = "a positive integer" if lo == 1 else f"{lo} or more"
    try:
        v = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number; give {want}") from None
    if v < lo:
        raise ValueError(f"{text!r} must be {want}")
    return v


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


positive_int = _argtype(_positive_int)
resolution_arg = _argtype(parse_resolution)


# ------------------------------------------------------------------------------------------------
# Output helpers
# ------------------------------------------------------------------------------------------------







# ------------------------------------------------------------------------------------------------
# Model + capture, shared by every verb that works on a model
# ------------------------------------------------------------------------------------------------

def add_amp_arg(p: argparse.ArgumentParser) -> None:
    """``--amp bf16|fp16``: mixed precision as ``torch.autocast`` runs it."""
    p.add_argument("--amp", choices=AMP_DTYPES, default=None,
                   help="mixed precision: activations in bf16 or fp16 as torch.autocast makes them, float32 "
                        "parameters, gradients and optimizer state (needs --dtype float32; default: none)")


def add_model_args(p: argparse.ArgumentParser, batch_default: int = DEFAULT_BATCH) -> None:
    """The options that say which model to capture, at which shape (shared by later verbs)."""
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see 'planner models')")
    p.add_argument("--batch", type=positive_int, default=batch_default, metavar="N",
                   help=f"batch size (default {batch_default})")
    p.add_argument("--resolution", type=resolution_arg, default=None, metavar="H[xW]",
                   help="input size: 224 (square) or HxW such as 512x384 (default: the model's own)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="data type (default float32)")
    p.add_argument("--bn", choices=BN_MODES, default="train",
                   help="BatchNorm mode during capture: train (batch statistics) or eval (default train)")
    add_amp_arg(p)
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="local state dict to load (torch.save(model.state_dict(), PATH)); "
                        "without it the model is built on the meta device (no memory)")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="classifier outputs (default: 1000 for torchvision models, 10 for tiny_*)")






def _shape(s) -> str:
    return "x".join(str(v) for v in s)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def _gflop(n: float) -> str:
    return f"{n / 1e9:.3f}"


# ------------------------------------------------------------------------------------------------
# planner models
# ------------------------------------------------------------------------------------------------

def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the models planner knows",
                       description="List the model zoo: name, default input resolution, parameters.")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    """``planner models``: one line per zoo model (built on the meta device: no memory)."""
    from lrcnn.models import default_resolution, get_model, list_models

    rows = []
    for name in list_models():
        model = get_model(name, device="meta")
        params = sum(p.numel() for p in model.parameters())
        r = default_resolution(name)
        rows.append([name, f"{r}x{r}", f"{params:,}", "test net" if name.startswith("tiny_") else "torchvision"])
    print(format_table(["model", "resolution", "params", "source"], rows, "lrrl"))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# planner inspect
# ------------------------------------------------------------------------------------------------

INSPECT_COLUMNS = ["name", "op", "target", "shape", "out_MiB", "saved_MiB", "GFLOPs_fwd", "GFLOPs_bwd",
                   "rf", "stride", "cut"]


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="per-layer table of a model: shapes, memory, FLOPs, receptive field",
        description="Capture a model (no real memory: meta device + fake tensors) and print one row "
                    "per layer: output shape, output MiB, MiB saved for backward, GFLOPs, receptive "
                    "field (input rows one output row sees), cumulative stride, and whether the "
                    "layer is a cut point (a legal segment end); then totals.")
    add_model_args(p)
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV (exact bytes and FLOPs)")
    p.set_defaults(func=cmd_inspect)


def inspect_frame(graph):
    """The inspect table as a pandas DataFrame with exact integer bytes/FLOPs (the CSV)."""
    import pandas as pd

    cuts = set(graph.cut_points())
    rows = []
    for n in graph.nodes:
        if n.kind in ("input", "output"):
            continue
        rows.append({
            "name": n.name, "op": n.op, "kind": n.kind, "module": n.target, "shape": _shape(n.shape),
            "out_bytes": n.out_bytes, "out_MiB": n.out_bytes / 2**20,
            "saved_bytes": n.saved_bytes, "saved_MiB": n.saved_bytes / 2**20,
            "flops_fwd": n.flops_fwd, "flops_bwd": n.flops_bwd,
            "GFLOPs_fwd": n.flops_fwd / 1e9, "GFLOPs_bwd": n.flops_bwd / 1e9,
            "receptive_field": n.receptive_field, "cum_stride": n.cum_stride,
            "rowwise": bool(n.rowwise), "cut_point": n.name in cuts,
        })
    return pd.DataFrame(rows)


def cmd_inspect(args) -> int:
    """``planner inspect``: aligned per-layer table and totals, optional CSV."""
    model, graph = build_and_capture(args.model, args.batch, args.resolution, args.dtype, args.bn,
                                     args.weights, args.num_classes, amp=args.amp)
    df = inspect_frame(graph)
    if args.csv:
        write_csv_atomic(df, args.csv)
    cuts = graph.cut_points()
    cutset = set(cuts)
    rows = [[n.name, n.op, n.target, _shape(n.shape), _mib(n.out_bytes), _mib(n.saved_bytes),
             _gflop(n.flops_fwd), _gflop(n.flops_bwd), n.receptive_field, n.cum_stride,
             "yes" if n.name in cutset else ""]
            for n in graph.nodes if n.kind not in ("input", "output")]
    nparams = sum(p.numel() for p in model.parameters())
    saved = graph.total_saved_bytes
    inp = graph.input_node.out_bytes
    print(f"{args.model}: input {_shape(graph.input_shape)} {precision(graph.dtype, graph.amp)}, BatchNorm {args.bn} mode, "
          f"{len(rows)} layers")
    print()
    print(format_table(INSPECT_COLUMNS, rows, "llllrrrrrrl"))
    print()
    print("Totals")
    print(format_table(["quantity", "value"], [
        ["saved for backward", f"{saved / 2**20:.2f} MiB ({saved / 2**30:.3f} GiB, {saved:,} bytes)"],
        ["input batch", f"{inp / 2**20:.2f} MiB ({inp:,} bytes)"],
        ["parameters", f"{graph.param_bytes / 2**20:.2f} MiB ({nparams:,} parameters, {graph.dtype})"],
        ["GFLOPs forward", f"{graph.total_flops_fwd / 1e9:.3f}"],
        ["GFLOPs backward", f"{graph.total_flops_bwd / 1e9:.3f}"],
        ["cut points", f"{len(cuts)}"],
    ], "ll"))
    if args.csv:
        print(f"\nwrote {args.csv} ({len(df)} rows)")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# planner check-plan
# ------------------------------------------------------------------------------------------------

def _add_check_plan(sub) -> None:
    p = sub.add_parser(
        "check-plan", help="validate a plan JSON against its model",
        description="Load a plan (lrcnn.plan/1), build the plan's model at the plan's input shape and "
                    "dtype on the meta device, capture it and check schema, fingerprint and segments.")
    p.add_argument("plan", metavar="PLAN.json", help="plan file to check")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="classifier outputs the plan was made with (default: the plan's "
                        "training.num_classes, else the model's default)")
    p.set_defaults(func=cmd_check_plan)




def cmd_check_plan(args) -> int:
    """``planner check-plan PLAN.json``: one OK line, or one error line and exit 2."""
    from lrcnn.planner.plan import Plan

    plan = Plan.load(args.plan)  # schema and field types
    _, graph = plan_model(plan, num_classes=args.num_classes)
    modes = {}
    for s in plan.segments:
        modes[s.mode] = modes.get(s.mode, 0) + 1
    seg = ", ".join(f"{k} {v}" for k, v in sorted(modes.items())) or "none"
    print(f"OK: {args.plan}: {plan.schema} plan for {plan.model} at {_shape(graph.input_shape)} {precision(graph.dtype, graph.amp)}, "
          f"fingerprint {plan.fingerprint} matches; {len(plan.segments)} segment(s) ({seg})")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# planner calibrate / planner simulate
# ------------------------------------------------------------------------------------------------

def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="measure this machine and write a device profile for the cost model",
        description="Time convolutions (FLOP/s), large element-wise ops (bandwidth) and tiny ops "
                    "(per-call cost) on the device and save a profile JSON that '--device-profile FILE' uses.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to measure (default cpu)")
    p.add_argument("--dtype", action="append", choices=DTYPES, default=None,
                   help="data type(s) to time convolutions in (repeatable; default float32)")
    p.add_argument("--quick", action="store_true", help="smaller, fewer measurements (seconds)")
    p.add_argument("-o", "--output", default="profile.json", metavar="FILE",
                   help="where to write the profile (default profile.json)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from lrcnn.executor.calibrate import calibrate, save_profile

    check_output_path(args.output, "device profile")
    prof = calibrate(args.device, tuple(args.dtype or ("float32",)), args.quick,
                     progress=lambda s: print(f"calibrate: {s} ...", file=sys.stderr))
    save_profile(prof, args.output)
    rates = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in prof.flops.items())
    print(f"wrote {args.output}: {prof.name}: {rates}, bandwidth {prof.bandwidth / 1e9:.1f} GB/s, "
          f"{prof.launch_s * 1e6:.1f} us per op")
    return EXIT_OK


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate", help="predicted vs simulated peak memory of a plan (fake tensors, any size)",
        description="Run one training step of the plan's model with the plan applied under "
                    "FakeTensorMode (no real memory, full size in seconds) and print the cost model's "
                    "predicted peak per phase next to the simulated one.")
    p.add_argument("plan", metavar="PLAN.json", help="plan file")
    p.add_argument("--device-profile", default=None, metavar="NAME|FILE",
                   help="device profile for the prediction (default: the one the plan was solved with, else "
                        "cpu; a profile's workspace reserve is left out of the comparison)")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam", "adamw"), default=None,
                   help="optimizer (default: the plan's training.optimizer)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    from lrcnn.executor.simulate import simulate_plan

    if args.csv:
        check_output_path(args.csv, "CSV")
    df, info = simulate_plan(args.plan, args.device_profile, args.optimizer)
    rows = [[r.phase, _mib(r.predicted_bytes), _mib(r.simulated_bytes), f"{r.error_pct:+.2f}%"]
            for r in df.itertuples()]
    print(f"{info['model']} {info['shape']} {info['dtype']}, optimizer {info['optimizer']}, "
          f"profile {info['profile']}: simulated in {info['sim_s']:.1f} s")
    if info.get("workspace"):
        print(f"(predicted without the profile's {info['workspace'] / 2**20:.0f} MiB workspace reserve, which the "
              f"simulated step does not allocate)")
    print(format_table(["phase", "predicted MiB", "simulated MiB", "error"], rows, "lrrr"))
    if args.csv:
        write_csv_atomic(df, args.csv)
    return EXIT_OK

# planner run / planner report (the work is in executor.run and analysis.report)
# ------------------------------------------------------------------------------------------------

def _nonneg_int(text: str) -> int:
    return _int_at_least(text, 0)


def _positive_number(what: str) -> Callable:
    """argparse type: a positive float (``what`` names it in the one-line error)."""
    def conv(text: str) -> float:
        try:
            v = float(str(text).strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number; give {what}") from None
        if not v > 0:
            raise ValueError(f"{text!r} must be a positive number")
        return v
    conv.__name__ = "positive number"
    return _argtype(conv)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="train with a plan for real; record predicted vs actual memory and time",
        description="Build the plan's model (random weights), apply the plan and run real training "
                    "steps (cross-entropy, the plan's optimizer).  Records per step, phase and segment "
                    "predicted and actual peak bytes and time.  Memory is measured on the first "
                    "recorded step (absolute live bytes: parameters, optimizer state, batch, "
                    "gradients, activations), time on the others.  Exit 1 when the measured peak "
                    "exceeds the plan's budget or --check-grads finds a mismatch.  Under torchrun "
                    "every process is one DDP rank (see 'python -m executor.run').")
    add_run_args(p)
    p.set_defaults(func=cmd_run)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``planner run``, shared with ``python -m executor.run`` (torchrun's target)."""
    p.add_argument("plan", metavar="PLAN.json", help="plan file (lrcnn.plan/1)")
    p.add_argument("--steps", type=positive_int, default=20, metavar="N", help="recorded steps (default 20)")
    p.add_argument("--warmup", type=_argtype(_nonneg_int), default=2, metavar="N",
                   help="unrecorded steps first (default 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cuda, cpu or auto (cuda when available; default)")
    p.add_argument("--data", default="synthetic", metavar="synthetic|DIR",
                   help="'synthetic' (random tensors, default) or an ImageFolder root (one folder per class)")
    p.add_argument("--lr", type=_positive_number("a positive learning rate such as 0.01"), default=None, metavar="LR",
                   help="learning rate (default: the plan's training.lr, else 0.01 for sgd/momentum, "
                        "1e-3 for adam/adamw)")
    p.add_argument("--check-grads", action="store_true",
                   help="first compare one step's loss and gradients with the plain model (exit 1 on mismatch)")
    p.add_argument("--amp", choices=AMP_DTYPES, default=None,
                   help="mixed precision to run; the plan's own (planner solve --amp) is used either way, "
                        "and a plan solved for another precision is refused (default: the plan's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default 0)")
    p.add_argument("--out", default=None, metavar="RECORDS.parquet",
                   help="write the records (.parquet, or .csv by the name's extension)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="run as N DistributedDataParallel processes on this machine (launches torchrun "
                        "--standalone; one GPU each on CUDA); the plan's batch is each process's (default 1)")


def cmd_run(args) -> int:
    from lrcnn.executor.run import run_command

    return run_command(args)


def _add_validate(sub) -> None:
    from lrcnn.planner.solve import OPTIMIZERS

    p = sub.add_parser(
        "validate", help="prove the planner on this device: solve plans across the budget range, run each, "
                         "compare predicted with measured",
        description="Solve plans of one model across its budget range (the plain step's budget, then "
                    "--points - 1 budgets down to the smallest feasible plan), run each for real training "
                    "steps on the device (as 'planner run'), and print per plan: budget, predicted and "
                    "measured peak (CPU: storage accounting; CUDA: allocated bytes), error, whether it "
                    "stayed within its budget, predicted and measured step time.  Exit 1 when a plan "
                    "measured above its budget.")
    add_model_args(p, batch_default=8)
    p.add_argument("--amp-rows", action="store_true",
                   help="with --amp: also plan row segments (gradients at half-precision rounding of plain autocast)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum",
                   help="optimizer of the plans and the runs (default momentum)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="device to run on (default: cuda when available)")
    p.add_argument("--device-profile", default=None, metavar="NAME|FILE",
                   help="cost model profile (default: cpu on the CPU, h100 on CUDA)")
    p.add_argument("--points", type=positive_int, default=4, metavar="K", help="plans to validate (default 4)")
    p.add_argument("--steps", type=positive_int, default=3, metavar="S",
                   help="recorded steps per plan (the first measures memory, the others time; default 3)")
    p.add_argument("--warmup", type=_argtype(_nonneg_int), default=1, metavar="N",
                   help="unrecorded steps first (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and data (default 0)")
    p.add_argument("--out", default=None, metavar="RECORDS.parquet",
                   help="write every run's records (.parquet or .csv; column validate_point: the plan)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the validate table as CSV")
    p.add_argument("--png", default=None, metavar="FILE", help="plot predicted vs measured over the budgets (PNG)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    """``planner validate``: the table, optional records / CSV / PNG; exit 1 on a plan over budget."""
    from lrcnn.executor.run import _check_out, write_records
    from lrcnn.executor.validate import draw_validate, format_validate, validate

    if args.weights is not None:
        raise ValueError("--weights: validate builds random weights; drop --weights")
    _check_out(args.out)
    check_output_path(args.csv, "table")
    if args.png is not None and not args.png.endswith(".png"):
        raise ValueError(f"--png {args.png!r}: the plot is a PNG; end the name with .png")
    check_output_path(args.png, "plot")
    if args.device_profile is not None:
        check_profile(args.device_profile)
    res = validate(args.model, args.batch, args.resolution, bn=args.bn, dtype=args.dtype, amp=args.amp,
                   amp_rows=args.amp_rows, optimizer=args.optimizer, device=args.device,
                   device_profile=args.device_profile, points=args.points, steps=args.steps, warmup=args.warmup,
                   seed=args.seed, num_classes=args.num_classes, progress=not args.quiet)
    print(format_validate(res))
    if args.out:
        write_records(res.records, args.out)
        print(f"wrote {args.out} ({len(res.records)} records)")
    if args.csv:
        write_csv_atomic(res.table, args.csv)
        print(f"wrote {args.csv}")
    if args.png:
        draw_validate(res, args.png)
        print(f"wrote {args.png}")
    for f in res.failures:
        print(f"planner: FAILED: {f}", file=sys.stderr)
    return 1 if res.failures else 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="tables and plots of predicted vs actual from 'planner run' records",
        description="Load records of one or more runs and print per-run, per-phase and per-segment "
                    "predicted vs actual peak memory and time with absolute and relative errors.")
    p.add_argument("records", nargs="+", metavar="RECORDS", help="records files (.parquet or .csv)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the comparison table as CSV")
    p.add_argument("--png", default=None, metavar="FILE",
                   help="draw the memory timeline and per-segment peaks (matplotlib PNG)")
    p.set_defaults(func=cmd_report)


def _add_bench(sub, name: str = "bench") -> None:
    """``planner bench`` (also ``python -m bench compare``: ``name='compare'``)."""
    from lrcnn.analysis.bench import add_compare_arguments, compare_command

    p = sub.add_parser(
        name, help="benchmark lrcnn against plain PyTorch, checkpointing, torch.compile and Rockmate",
        description="Peak memory, step time and exactness of lrcnn plans and the alternatives, measured "
                    "side by side in one run (the same as 'python -m bench compare').")
    add_compare_arguments(p)
    p.set_defaults(func=compare_command)


def cmd_report(args) -> int:
    from lrcnn.analysis.report import report_command

    return report_command(args)


# ------------------------------------------------------------------------------------------------
# planner solve
# ------------------------------------------------------------------------------------------------

def _batch_arg(text: str):
    if str(text).strip().lower() == "max":
        return "max"
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch {text!r} must be a positive integer or 'max'") from None


def _gap_arg(text: str) -> float:
    try:
        g = float(text)
    except ValueError:
        g = math.nan
    if not 0 <= g < 1:
        raise argparse.ArgumentTypeError(f"--gap {text!r}: give a relative gap from 0 (prove optimal) to below 1, "
                                         f"e.g. 0.005")
    return g


def _budget_arg(text: str) -> int:
    from lrcnn.planner.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"budget: {e}") from None



def _add_solve(sub) -> None:
    from lrcnn.planner.solve import DEFAULT_GAP, DEFAULT_PROFILE, DEFAULT_TIME_LIMIT, OPTIMIZERS, POLICIES, SOLVERS

    p = sub.add_parser(
        "solve", help="find the fastest plan that fits a memory budget (ILP)",
        description="Capture the model, price every candidate segment (store / checkpoint / rows, "
                    "per policy and strip count) with the cost model and pick, by an ILP, the plan "
                    "with the smallest predicted step time whose predicted peak of every phase "
                    "(forward, each backward step, optimizer step) fits the budget.  Budgets are "
                    "device bytes: 8GB = 8*10^9, 8GiB = 8*2^30.")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see 'planner models')")
    p.add_argument("--budget", required=True, type=_budget_arg, metavar="SIZE",
                   help="memory budget: 8GB (10^9), 7.5GiB (2^30), 512MiB, or bytes")
    p.add_argument("--batch", type=_batch_arg, default=DEFAULT_BATCH, metavar="N|max",
                   help=f"batch size, or 'max': the largest batch a plan fits (default {DEFAULT_BATCH})")
    p.add_argument("--world-size", type=positive_int, default=None, metavar="W",
                   help="plan for W DistributedDataParallel processes: --batch is the global batch, split "
                        "evenly (the plan's batch is each process's; 'max': the largest per-process batch) "
                        "and the budget is per process, DDP's gradient buckets (one copy of the "
                        "parameters' bytes) reserved from it when W > 1; recorded as training.world_size")
    p.add_argument("--resolution", type=resolution_arg, default=None, metavar="H[xW]",
                   help="input size: 224 or HxW (default: the model's own)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="data type (default float32)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum",
                   help="optimizer whose state is budgeted (default momentum)")
    p.add_argument("--bn", choices=BN_MODES, default="train", help="BatchNorm mode (default train)")
    add_amp_arg(p)
    p.add_argument("--amp-rows", action="store_true",
                   help="with --amp: also plan row segments, whose gradients differ from plain autocast at "
                        "half-precision rounding (forward bit-identical); recorded as training.amp_rows")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="classifier outputs (default: 1000 for torchvision models, 10 for tiny_*)")
    p.add_argument("--device-profile", default=DEFAULT_PROFILE, metavar="NAME|FILE",
                   help=f"device the times are predicted for: a profile name or JSON file (default {DEFAULT_PROFILE})")
    p.add_argument("--policy", choices=POLICIES, default="auto",
                   help="restrict the search: auto (all), 2ps or overl (only that row policy), "
                        "checkpoint (no row segments) (default auto)")
    p.add_argument("--strips", type=positive_int, default=None, metavar="N",
                   help="force this strip count for row segments")
    p.add_argument("--compiled", action="store_true",
                   help="plan for executor.compile_plan (torch.compile): recomputing a store segment's "
                        "BN/ReLU/add is fused into the backward kernels and priced free (memory is "
                        "predicted for eager execution; measure the compiled step)")
    p.add_argument("--time-limit", type=_positive_number("a number of seconds"), default=DEFAULT_TIME_LIMIT, metavar="S",
                   help=f"solver time limit in seconds; the best plan found so far is returned with its gap (default {DEFAULT_TIME_LIMIT:g})")
    p.add_argument("--gap", type=_gap_arg, default=DEFAULT_GAP, metavar="G",
                   help=f"relative optimality gap at which the solver stops (default {DEFAULT_GAP:g})")
    p.add_argument("--solver", choices=SOLVERS, default="auto",
                   help="auto: the exact label-setting DP where it applies (mode-independent gradient "
                        "bytes, bounded labels), else the ILP with CBC; cbc / highs (needs highspy): "
                        "always the ILP (warm-started from the DP) (default auto)")
    p.add_argument("-o", "--output", default=None, metavar="PLAN.json", help="write the plan here")
    p.add_argument("--pareto", default=None, metavar="FILE.csv",
                   help="also write budget vs predicted step time over a sweep of budgets (CSV)")
    p.add_argument("--pareto-points", type=positive_int, default=10, metavar="N",
                   help="budgets in the --pareto sweep (default 10)")
    p.set_defaults(func=cmd_solve)




def _solver_for(args, batch: int):
    from lrcnn.planner.solve import Solver

    _, graph = build_and_capture(args.model, batch, args.resolution, args.dtype, args.bn, None, args.num_classes,
                                 amp=args.amp)
    return Solver(graph, args.model, policy=args.policy, bn=args.bn, strips=args.strips,
                  optimizer=args.optimizer, device_profile=args.device_profile, solver=args.solver,
                  compiled=getattr(args, "compiled", False), amp_rows=getattr(args, "amp_rows", False))




def cmd_solve(args) -> int:
    """``planner solve``: solve, print the summary, write the plan (and the Pareto CSV)."""
    import time

    from lrcnn.planner.ilp import InfeasibleError
    from lrcnn.planner.units import fmt_both, fmt_bytes

    t0 = time.perf_counter()
    check_output_path(args.output, "plan")
    check_output_path(args.pareto, "CSV")
    if args.pareto and not args.pareto.lower().endswith(".csv"):
        raise ValueError(f"--pareto file {args.pareto!r} must end in .csv")
    if args.strips is not None and args.policy == "checkpoint":
        raise ValueError("--strips applies to row segments; --policy checkpoint has none")
    check_profile(args.device_profile)
    budget = args.budget
    batch = args.batch
    world = getattr(args, "world_size", None)
    if world is not None and batch != "max":
        if batch % world:
            raise ValueError(f"--batch {batch} does not split evenly over --world-size {world}; "
                             f"give a multiple of {world}")
        batch //= world

    def reserve(s) -> int:  # per process: DDP's gradient buckets, one copy of the parameter bytes
        return s.graph.param_bytes if (world or 1) > 1 else 0

    note = ""
    if batch == "max":
        cache = {}

        def fits_at(n):
            s = _solver_for(args, n)
            cache[n] = s
            return s.fits(budget - reserve(s)), s.min_peak()

        batch = max_batch(fits_at, budget)
        if batch == 0:
            raise InfeasibleError(budget, cache[1].smallest_budget() + reserve(cache[1]), cache[1].hint)
        solver = cache[batch]
        note = f"largest {'per-process ' if world else ''}batch that fits: {batch} ({len(cache)} captures)"
    else:
        solver = _solver_for(args, batch)
    held = reserve(solver)
    if held and budget - held < solver.smallest_budget():
        raise InfeasibleError(budget, solver.smallest_budget() + held, solver.hint)
    plan = solver.solve(budget - held, time_limit=args.time_limit, gap=args.gap)
    if world is not None:
        plan.budget_bytes = budget
        plan.training["world_size"] = world
        plan.solver["ddp_bucket_bytes"] = held
        note = "\n".join(filter(None, [note, f"world size {world}: batch {batch} per process, global batch "
                                              f"{batch * world}; budget per process, DDP gradient buckets "
                                              f"{fmt_bytes(held)} reserved from it"]))
    plan.solver["total_s"] = round(time.perf_counter() - t0, 4)
    frame = None
    if args.pareto:
        frame = pareto_frame(solver, args.pareto_points, time_limit=args.time_limit, gap=args.gap)
    print(format_solve_summary(plan, solver, note))
    if args.output:
        plan.save(args.output)
        print(f"\nwrote {args.output}")
    if frame is not None:
        write_csv_atomic(frame, args.pareto)
        print(f"wrote {args.pareto} ({len(frame)} budgets, {fmt_both(frame['budget_bytes'].min())} .. "
              f"{fmt_both(frame['budget_bytes'].max())})")
    return EXIT_OK




def format_solve_summary(plan, solver, note: str = "") -> str:
    """The readable summary of a solved plan: segments, predicted peak vs budget, time, solver."""
    from lrcnn.planner.units import fmt_both, fmt_bytes

    cm = solver.cm
    units = cm.units()  # (not solver.problem: pricing candidates is not needed to print)
    unit_first = {a: i for i, (a, _) in enumerate(units)}
    unit_last = {b: i for i, (_, b) in enumerate(units)}
    pred, info = plan.predicted, plan.solver
    budget = plan.budget_bytes
    lines = [f"{plan.model}: input {_shape(plan.input_shape)} {precision(plan.dtype, plan.training.get('amp'))}, optimizer {plan.training.get('optimizer')}, "
             f"BatchNorm {plan.training.get('bn')}, device profile {info.get('device_profile')}, policy {info.get('policy')}"
             + (", priced for torch.compile (compile_plan)" if info.get("compiled") else "")]
    if note:
        lines.append(note)
    if plan.training.get("amp") and not plan.training.get("amp_rows"):
        lines.append("no row segments under --amp (their gradients would differ from plain autocast at "
                     "half-precision rounding): --amp-rows allows them")
    lines.append(f"budget {fmt_both(budget)}")
    lines.append("")
    rows = []
    for k, s in enumerate(plan.segments):
        c = cm.segment(s)
        i, j = unit_first.get(s.first, "?"), unit_last.get(s.last, "?")
        rows.append([k, f"{s.first}..{s.last}", f"{i}-{j}" if i != j else f"{i}", s.mode, s.policy or "",
                     s.strips or "", len(s.recompute) or "", f"{c.keep / 2**20:.1f}",
                     f"{max(c.fwd_peak, c.bwd_peak) / 2**20:.1f}", f"{(c.fwd_s + c.bwd_s) * 1e3:.3f}"])
    lines.append(format_table(["#", "segment", "units", "mode", "policy", "strips", "recompute",
                               "keep_MiB", "peak_MiB", "time_ms"], rows, "rllllrrrrr"))
    lines.append("")
    peak = pred.get("peak_bytes", 0)
    lines.append(f"predicted peak   {fmt_both(peak)} of {fmt_both(budget)} ({100 * peak / budget:.1f}% of the budget)")
    phases = pred.get("phases") or {}
    for name, v in phases.items():
        if isinstance(v, (int, float)):
            lines.append(f"  {name:<15}{fmt_both(v)}")
    breakdown = pred.get("breakdown") or {}
    if isinstance(breakdown, dict) and breakdown:
        parts = [f"{k} {fmt_bytes(v)}" for k, v in breakdown.items() if isinstance(v, (int, float))]
        if parts:
            lines.append("  breakdown      " + ", ".join(parts))
    base_t, base_p = info.get("baseline_time_s"), info.get("baseline_peak_bytes")
    t = pred.get("time_s", 0.0)
    over = f"{100 * (t / base_t - 1) + 0.0:+.1f}%".replace("-0.0%", "+0.0%") if base_t else "n/a"
    lines.append(f"predicted step   {t * 1e3:.2f} ms, {over} vs no plan ({base_t * 1e3:.2f} ms, peak {fmt_both(base_p)})")
    mp = info.get("min_peak_bytes")
    lines.append(f"smallest plan    needs --budget {fmt_both(solver.budget_for(mp))} (its peak {fmt_both(mp)} "
                 f"plus the {solver.headroom:.1%} kept free)" if mp is not None
                 else "smallest plan    not searched: the plain step fits the budget")
    gap = info.get("gap")
    gap_s = "n/a" if gap is None or gap != gap else f"{100 * gap:.2f}%"
    lines.append(f"solver           {info.get('solver')}: {info.get('status')}, gap {gap_s}, solve {info.get('solve_s', 0):.2f} s, "
                 f"total {info.get('total_s', 0):.2f} s, {info.get('candidates')} candidates over {info.get('units')} units")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Parser and entry point
# ------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        msg = " ".join(str(message).split())
        self.exit(EXIT_ERROR, f"{self.prog}: error: {msg} (see '{self.prog} --help')\n")


#: Functions that add one subcommand each; later issues append theirs.
SUBCOMMANDS: List[Callable] = [_add_models, _add_inspect, _add_check_plan, _add_solve, _add_calibrate,
                                _add_simulate, _add_run, _add_validate, _add_report, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    """The ``planner`` argument parser with every subcommand in :data:`SUBCOMMANDS`."""
    parser = _Parser(prog="planner",
                     description="lrcnn planner: plan row-centric CNN training (exact, less memory).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``planner`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Bad input of any kind (unknown model, bad resolution, unreadable file, mismatched plan, usage
    errors) gives one line on stderr and exit code 2, never a traceback.
    """
    return run_parser(build_parser(), argv)


def run_parser(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` with ``parser`` and call ``args.func(args)`` with :func:`main`'s error
    handling (one line on stderr, exit 2, for bad input)."""
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_ERROR)
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("planner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `planner inspect ... | head`
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (ValueError, OSError) as e:  # ModelError, CaptureError, PlanError are ValueErrors
        print(f"planner: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
