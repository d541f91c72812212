"""The root of every error lrcnn raises for its user.

A :class:`LrcnnError` is bad input or a request lrcnn refuses: its message names the problem and
the fix, and the ``planner`` command line prints it as one line on stderr with exit code 2.  Any
other exception inside lrcnn is a bug: the command line keeps its traceback (exit 1).

Each module's own errors subclass it (``ModelError``, ``CaptureError``, ``PlanError``,
``CostError``, ``InfeasibleError``, ``RowSegmentError``, ``RunError``, ``RecordsError``,
``BenchError``, ``OutputError``), and, where they were ``ValueError``\\ s or ``OSError``\\ s before,
still are, so ``except ValueError`` in user code keeps working.
"""
from __future__ import annotations


class LrcnnError(Exception):
    """Bad input or a refused request; the message says what to do instead."""


class UsageError(LrcnnError, ValueError):
    """A value given to a command or function that it cannot take (a size, a name, a count)."""


__all__ = ["LrcnnError", "UsageError"]
