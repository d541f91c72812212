"""``planner validate``: plans across the budget range, each run and compared."""
from __future__ import annotations

import sys

from lrcnn.errors import UsageError
from lrcnn.executor.run import check_out, write_records
from lrcnn.executor.validate import draw_validate, format_validate, validate
from lrcnn.planner.cli.args import add_model_args, argtype, nonneg_int, positive_int
from lrcnn.planner.cost import check_profile
from lrcnn.planner.files import check_output_path, write_csv_atomic
from lrcnn.planner.plan import OPTIMIZERS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "validate", help="prove the planner on this device: solve plans across the budget range, run each, "
                         "compare predicted with measured",
        description="Solve plans of one model across its budget range (the plain step's budget, then "
                    "--points - 1 budgets down to the smallest feasible plan), run each for real training "
                    "steps on the device (as 'planner run'), and print per plan: budget, predicted and "
                    "measured peak (CPU: storage accounting; CUDA: allocated bytes), error, the CUDA caching "
                    "allocator's reserved peak (CUDA: measured; CPU: modeled), whether it stayed within its "
                    "budget, predicted and measured step time.  Budgets of a GPU profile are reserved bytes.  "
                    "Exit 1 when a plan measured above its budget.")
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
    p.add_argument("--warmup", type=argtype(nonneg_int), default=1, metavar="N",
                   help="unrecorded steps first (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and data (default 0)")
    p.add_argument("--out", default=None, metavar="RECORDS.parquet",
                   help="write every run's records (.parquet or .csv; column validate_point: the plan)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the validate table as CSV")
    p.add_argument("--png", default=None, metavar="FILE", help="plot predicted vs measured over the budgets (PNG)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=command)


def command(args) -> int:
    """``planner validate``: the table, optional records / CSV / PNG; exit 1 on a plan over budget."""

    if args.weights is not None:
        raise UsageError("--weights: validate builds random weights; drop --weights")
    check_out(args.out)
    check_output_path(args.csv, "table", (".csv",))
    check_output_path(args.png, "plot", (".png",))
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
