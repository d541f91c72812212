"""``python -m bench compare ...``: the same command as ``planner bench`` (``--help`` lists the options)."""
import sys

from lrcnn.planner.cli import _add_bench, _Parser, run_parser


def main(argv=None) -> int:
    p = _Parser(prog="python -m bench", description="lrcnn benchmarks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_bench(sub, "compare")
    return run_parser(p, argv)


if __name__ == "__main__":
    sys.exit(main())
