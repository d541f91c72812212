"""The ``planner`` command line: ``planner <verb> [options]`` (also ``python -m lrcnn <verb>``).

The only code that imports every layer; nothing imports it.  One module per verb
(:mod:`~lrcnn.planner.cli.solve`, ``inspect``, ``check_plan``, ``run``, ``validate``, ``simulate``,
``calibrate``, ``report``, ``bench``, ``models``), each with ``add_parser(subparsers)`` (the
options and their ``--help``) and ``command(args)`` (reads the argparse namespace and calls the
library with keyword arguments: the namespace never leaves this package); the argument types and
options the verbs share are in :mod:`~lrcnn.planner.cli.args`.

Errors: :func:`run_parser` prints a :class:`~lrcnn.errors.LrcnnError` (bad input, a refused
request: the message names the fix) or an ``OSError`` as one line on stderr with exit code 2, no
traceback; argparse usage errors are one line with exit 2 too.  Anything else is a bug in lrcnn:
its traceback is printed with a line asking to report it, exit code 1.  Output files are written
atomically, so a failed command leaves no half-written file behind.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from typing import Optional, Sequence

from lrcnn.errors import LrcnnError
from lrcnn.planner.cli import bench, calibrate, check_plan, inspect, models, report, run, simulate, solve, validate
from lrcnn.planner.cli.args import EXIT_ERROR, EXIT_OK, one_line, Parser

EXIT_BUG = 1
#: The verbs in the order ``planner --help`` lists them.
VERBS = (models, inspect, check_plan, solve, calibrate, simulate, run, validate, report, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``planner`` argument parser with every verb in :data:`VERBS`."""
    parser = Parser(prog="planner",
                    description="lrcnn planner: plan row-centric CNN training (exact, less memory).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``planner`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Bad input of any kind (unknown model, bad resolution, unreadable file, mismatched plan, usage
    errors) gives one line on stderr and exit code 2, never a traceback; a bug gives its
    traceback and exit code 1.
    """
    return run_parser(build_parser(), argv)


def run_parser(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` with ``parser`` and call ``args.func(args)`` with :func:`main`'s error
    handling."""
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
    except (LrcnnError, OSError) as e:  # bad input: one line
        print(f"planner: error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:  # a bug in lrcnn: keep the traceback
        traceback.print_exc()
        print("planner: internal error (a bug in lrcnn, not in your input): please report it with the command "
              "line and the traceback above", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
