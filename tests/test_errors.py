"""Issue 24, one error root: every error lrcnn raises for its user is an ``lrcnn.errors.LrcnnError``.

Each module's error class subclasses the root and keeps the builtin base it had (``ValueError``,
``OSError``, ...), so ``except ValueError`` in user code keeps working.  A ``raise`` of a builtin
exception class anywhere in the library is either a user-facing error not yet converted (this test
fails) or an internal invariant, a bug if it ever fires, listed in ``INTERNAL`` with its reason.
"""
from __future__ import annotations

import ast
import os

import pytest

from lrcnn.analysis.bench.cases import BenchError
from lrcnn.analysis.records import RecordsError
from lrcnn.errors import LrcnnError, StateError, UsageError, UsageTypeError
from lrcnn.executor.run import RunError
from lrcnn.executor.strips import RowSegmentError
from lrcnn.models.capture import CaptureError, UnknownNodeError
from lrcnn.models.zoo import ModelError
from lrcnn.planner.cost import CostError
from lrcnn.planner.files import OutputError
from lrcnn.planner.ilp import InfeasibleError
from lrcnn.planner.plan import PlanError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each error class and the builtin exception it still is
ERRORS = [
    (ModelError, ValueError), (CaptureError, ValueError), (UnknownNodeError, KeyError),
    (PlanError, ValueError), (CostError, ValueError), (InfeasibleError, ValueError), (OutputError, OSError),
    (RowSegmentError, ValueError), (RunError, ValueError), (RecordsError, ValueError), (BenchError, ValueError),
    (UsageError, ValueError), (UsageTypeError, TypeError), (StateError, RuntimeError),
]


@pytest.mark.parametrize("cls,builtin", ERRORS, ids=[c.__name__ for c, _ in ERRORS])
def test_every_error_class_has_the_root(cls, builtin):
    assert issubclass(cls, LrcnnError) and issubclass(cls, builtin)


def test_unknown_node_error_reads_as_its_message():
    e = UnknownNodeError("no node or module named 'x' in the graph of m")
    assert str(e) == "no node or module named 'x' in the graph of m"  # not KeyError's repr
    assert isinstance(e, (KeyError, CaptureError))


# ---------------------------------------------------------------------------------------------
# raise sites of builtin exceptions: only internal invariants, each with its reason
# ---------------------------------------------------------------------------------------------
LIBRARY = ("lrcnn", "models", "planner", "executor", "analysis")  # the command line (planner/cli/) included
SKIP = ()
BUILTINS = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "LookupError", "AttributeError",
            "OSError", "IOError", "EnvironmentError", "FileNotFoundError", "PermissionError", "Exception",
            "BaseException"}

# (file, enclosing function, exception, start of the message): why it stays a builtin (a bug if it fires)
INTERNAL = {
    ("models/geometry.py", "strip_schedule", "RuntimeError", "internal: 2PS schedule ends at row"):
        "the greedy 2PS schedule always reaches the last row; a geometry bug otherwise",
    ("models/ops.py", "window_geom", "TypeError", "{} has no window geometry"):
        "called only for the conv / max-pool / avg-pool modules ops.py classifies as spatial",
    ("planner/ilp.py", "Problem._build", "ValueError", "the cost model refuses a plain store segment"):
        "the cost model prices every store segment (only row segments can be unsupported)",
    ("planner/ilp.py", "Problem._quantise", "ValueError", "cost model gave a negative byte count"):
        "byte counts of the cost model are sizes, never negative",
    ("planner/ilp.py", "Problem.min_cap", "ValueError", "no plan is feasible at any budget"):
        "the all-store path fits a large enough cap; the bisection never runs off",
    ("planner/ilp.py", "Problem.min_peak_path", "ValueError", "no plan is feasible at the smallest cap"):
        "min_cap is the smallest cap the min-keep DP finds a path for; its path is that path",
    ("planner/ilp.py", "Problem.solve_ilp", "RuntimeError", "solver returned an inconsistent solution"):
        "the MILP solver's answer is neither a valid path nor infeasible: a solver bug, no input fixes it",
    ("executor/strips.py", "Band.rows", "RuntimeError", "internal: rows ["):
        "row bands hold every row the geometry asks of them",
    ("executor/rows.py", "RowSegment._statistics", "RuntimeError", "internal: no rows of"):
        "the statistics sweep covers every row of every BN input",
    ("executor/rows.py", "_BNStrip.backward", "RuntimeError", "internal: BN input gradient needed before"):
        "the backward sweeps compute BN's constants before its input gradient",
    ("executor/program.py", "_NodeRunner.run", "RuntimeError", "internal: cannot run node"):
        "fx graphs hold only the node kinds the runner handles",
}


def _message_start(exc: ast.expr) -> str:
    """The literal text a raise's message starts with (``{}`` for each formatted field)."""
    if not isinstance(exc, ast.Call) or not exc.args:
        return ""
    a = exc.args[0]
    if isinstance(a, ast.Constant) and isinstance(a.value, str):
        return a.value
    if isinstance(a, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in a.values)
    return ""


def _builtin_raises():
    """``(file, function, exception, message)`` for every raise of a builtin exception class."""
    out = []

    def visit(node, stack, rel):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(ch, stack + [ch.name], rel)
                continue
            if isinstance(ch, ast.Raise) and ch.exc is not None:
                f = ch.exc.func if isinstance(ch.exc, ast.Call) else ch.exc
                if isinstance(f, ast.Name) and f.id in BUILTINS:
                    out.append((rel, ".".join(stack), f.id, _message_start(ch.exc), ch.lineno))
            visit(ch, stack, rel)

    for top in LIBRARY:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                if not name.endswith(".py") or rel.startswith(SKIP):
                    continue
                with open(os.path.join(ROOT, rel)) as fh:
                    tree = ast.parse(fh.read(), rel)
                visit(tree, [], rel.replace(os.sep, "/"))
    return out


def test_builtin_raises_are_internal_invariants_only():
    found = _builtin_raises()
    assert len(found) >= len(INTERNAL)  # (the walk sees the library)
    used = set()
    bad = []
    for rel, func, exc, msg, line in found:
        hits = [k for k in INTERNAL if k[:3] == (rel, func, exc) and msg.startswith(k[3])]
        if hits:
            used.update(hits)
        else:
            bad.append(f"{rel}:{line} {func}: raise {exc}({msg[:60]!r}...)")
    assert not bad, ("user-facing errors must be the module's error class or lrcnn.errors.UsageError "
                     "(a bug's builtin raise goes in INTERNAL with its reason):\n" + "\n".join(bad))
    stale = sorted(set(INTERNAL) - used)
    assert not stale, f"INTERNAL entries with no raise left: {stale}"


def test_converted_errors_keep_their_builtin_type():
    from lrcnn.models.geometry import even_bounds
    from lrcnn.planner.files import check_output_path
    from lrcnn.planner.units import parse_bytes

    with pytest.raises(UsageError, match="cannot read size"):
        parse_bytes("8 GB?")
    with pytest.raises(ValueError, match="strip count 0 out of range"):
        even_bounds(10, 0)
    with pytest.raises(UsageError, match="is a folder"):
        check_output_path(ROOT, "plan")


def test_apply_plan_refuses_a_path():
    import torch.nn as nn

    from lrcnn.executor import apply_plan

    with pytest.raises(UsageTypeError, match="needs a planner.Plan, got str"):
        apply_plan(nn.Conv2d(3, 3, 3), "plan.json")


def test_fake_state_outside_a_fake_mode():
    import torch.nn as nn

    from lrcnn.models.memory import fake_state

    with pytest.raises(StateError, match="inside `with fake_mode"):
        fake_state(nn.Conv2d(3, 3, 3))


def test_unreadable_files_are_one_error(tmp_path):
    from lrcnn.planner.cost import check_profile
    from lrcnn.planner.plan import Plan

    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(CostError, match="cannot read device profile .*re-run 'planner calibrate'"):
        check_profile(str(binary))
    with pytest.raises(PlanError, match="is not a text file .*give a JSON plan"):
        Plan.load(str(binary))


# ---------------------------------------------------------------------------------------------
# the command line: lrcnn's errors are one line (exit 2), anything else is a bug (traceback, exit 1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raised, code", [
    (UsageError("--thing 3: give at most 2"), 2),       # bad input: the library's root error
    (OutputError("cannot write 'x.csv': disk full"), 2),
    (PermissionError(13, "Permission denied"), 2),       # an OSError: the environment, not a bug
    (ValueError("a plain ValueError inside lrcnn"), 1),  # a bug: kept with its traceback
    (KeyError("missing"), 1),
    (ZeroDivisionError("division by zero"), 1),
])
def test_cli_prints_lrcnn_errors_as_one_line_and_bugs_with_their_traceback(monkeypatch, capfd, raised, code):
    from lrcnn.planner import cli
    from lrcnn.planner.cli import models as models_verb

    def verb(args):
        raise raised

    monkeypatch.setattr(models_verb, "command", verb)
    assert cli.main(["models"]) == code
    out, err = capfd.readouterr()
    assert out == ""
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("planner: error: ") and "Traceback" not in err
    else:
        assert "Traceback (most recent call last)" in err and type(raised).__name__ in err
        assert err.strip().splitlines()[-1].startswith("planner: internal error (a bug in lrcnn, not in your input): "
                                                       "please report it")
