"""``planner simulate``: predicted vs simulated peak of a plan (fake tensors)."""
from __future__ import annotations

from lrcnn.executor.simulate import simulate_plan
from lrcnn.planner.cli.args import EXIT_OK, mib_text
from lrcnn.planner.files import check_output_path, write_csv_atomic
from lrcnn.planner.plan import OPTIMIZERS
from lrcnn.planner.units import format_table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="predicted vs simulated peak memory of a plan (fake tensors, any size)",
        description="Run one training step of the plan's model with the plan applied under "
                    "FakeTensorMode (no real memory, full size in seconds) and print the cost model's "
                    "predicted peak per phase next to the simulated one, and the CUDA caching allocator's "
                    "reserved peak modeled on the simulated step's allocations.")
    p.add_argument("plan", metavar="PLAN.json", help="plan file")
    p.add_argument("--device-profile", default=None, metavar="NAME|FILE",
                   help="device profile for the prediction (default: the one the plan was solved with, else "
                        "cpu; a profile's workspace reserve is left out of the comparison)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="optimizer (default: the plan's training.optimizer)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    p.set_defaults(func=command)


def command(args) -> int:
    if args.csv:
        check_output_path(args.csv, "CSV")
    df, info = simulate_plan(args.plan, args.device_profile, args.optimizer)
    rows = [[r.phase, mib_text(r.predicted_bytes), mib_text(r.simulated_bytes), f"{r.error_pct:+.2f}%"]
            for r in df.itertuples()]
    print(f"{info['model']} {info['shape']} {info['dtype']}, optimizer {info['optimizer']}, "
          f"profile {info['profile']}: simulated in {info['sim_s']:.1f} s")
    if info.get("workspace"):
        print(f"(predicted without the profile's {info['workspace'] / 2**20:.0f} MiB workspace reserve, which the "
              f"simulated step does not allocate)")
    print(format_table(["phase", "predicted MiB", "simulated MiB", "error"], rows, "lrrr"))
    on, off = ("with", "without") if info["expandable_segments"] else ("without", "with")
    print(f"reserved (modeled CUDA caching allocator on the simulated step's allocations, {on} expandable segments): "
          f"{mib_text(info['modeled_reserved_bytes'])} MiB; {off} them: {mib_text(info['modeled_reserved_other_bytes'])} MiB")
    if args.csv:
        write_csv_atomic(df, args.csv)
    return EXIT_OK
