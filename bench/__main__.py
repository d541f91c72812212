"""``python -m bench compare ...``: see :mod:`bench.compare` (``--help`` lists the options)."""
import sys

from planner.cli import _Parser, run_parser

from . import add_compare_arguments, compare_command


def main(argv=None) -> int:
    p = _Parser(prog="python -m bench", description="lrcnn benchmarks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    c = sub.add_parser("compare", help="lrcnn against plain PyTorch, checkpointing, torch.compile and Rockmate",
                       description="Peak memory, step time and exactness of lrcnn and the alternatives, "
                                   "measured side by side (see bench/compare.py).")
    add_compare_arguments(c)
    c.set_defaults(func=compare_command)
    return run_parser(p, argv)


if __name__ == "__main__":
    sys.exit(main())
