"""The root of every error lrcnn raises for its user.

A :class:`LrcnnError` is bad input or a request lrcnn refuses: its message names the problem and
the fix, and the ``planner`` command line prints it as one line on stderr with exit code 2.  Any
other exception inside lrcnn is a bug: the command line keeps its traceback (exit 1).

Each module's own errors subclass it (``ModelError``, ``CaptureError``, ``PlanError``,
``CostError``, ``InfeasibleError``, ``RowSegmentError``, ``RunError``, ``RecordsError``,
``BenchError``, ``OutputError``), and, where they were ``ValueError``\\ s or ``OSError``\\ s before,
still are, so ``except ValueError`` in user code keeps working.  Where no module class fits, a
wrong argument is a :class:`UsageError` (a ``ValueError``; :class:`UsageTypeError` where it was a
``TypeError``), and a call made outside the state it needs is a :class:`StateError` (a
``RuntimeError``, as it was).
"""
from __future__ import annotations


class LrcnnError(Exception):
    """Bad input or a refused request; the message says what to do instead."""


class UsageError(LrcnnError, ValueError):
    """A value given to a command or function that it cannot take (a size, a name, a count)."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong kind (a file name where a :class:`~lrcnn.planner.Plan` is needed)."""


class StateError(LrcnnError, RuntimeError):
    """A call made outside the state it needs (outside a fake mode, a compiled plan's program run
    eagerly); the message names the way to call it."""


__all__ = ["LrcnnError", "UsageError", "UsageTypeError", "StateError"]
