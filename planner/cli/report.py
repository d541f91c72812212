"""``planner report``: tables and plots of run records."""
from __future__ import annotations

from lrcnn.analysis.report import report
from lrcnn.planner.cli.args import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="tables and plots of predicted vs actual from 'planner run' records",
        description="Load records of one or more runs and print per-run, per-phase and per-segment "
                    "predicted vs actual peak memory and time with absolute and relative errors.")
    p.add_argument("records", nargs="+", metavar="RECORDS", help="records files (.parquet or .csv)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the comparison table as CSV")
    p.add_argument("--png", default=None, metavar="FILE",
                   help="draw the memory timeline and per-segment peaks (matplotlib PNG)")
    p.set_defaults(func=command)


def command(args) -> int:
    print(report(args.records, csv=args.csv, png=args.png))
    return EXIT_OK
