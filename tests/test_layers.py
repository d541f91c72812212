"""The shape of the code: layers bottom to top, no import circles, no borrowed private names, one
installed namespace.

Layers (each imports only those below it)::

    lrcnn.errors  <  lrcnn.models  <  lrcnn.planner  <  lrcnn.executor  <  lrcnn.analysis
                                                                            <  lrcnn.planner.cli, lrcnn (top)

Imports are counted wherever they are written, inside function bodies too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: import package -> folder of the repository (pyproject.toml's package-dir)
PACKAGES = {"lrcnn": "lrcnn", "lrcnn.models": "models", "lrcnn.planner": "planner",
            "lrcnn.executor": "executor", "lrcnn.analysis": "analysis"}
LAYERS = [("lrcnn.errors", 0), ("lrcnn.models", 1), ("lrcnn.planner", 2), ("lrcnn.executor", 3),
          ("lrcnn.analysis", 4)]
TOP = ("lrcnn.planner.cli", "lrcnn.__main__")  # and the package lrcnn itself (its re-exports)


def modules() -> Dict[str, Path]:
    """Every source module of the installed package: dotted name -> file."""
    out = {}
    for pkg, folder in PACKAGES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if any(p.startswith(".") or p == "__pycache__" for p in rel):
                continue
            parts = [p for p in rel if p != "__init__"] if rel[-1] == "__init__" else list(rel)
            name = ".".join([pkg, *parts]) if parts else pkg
            if pkg == "lrcnn" and len(parts) and parts[0] in ("models", "planner", "executor", "analysis"):
                continue  # (a stray folder under lrcnn/ would shadow the mapping)
            out.setdefault(name, path)
    return out


MODULES = modules()


def layer(mod: str) -> int:
    if mod == "lrcnn" or any(mod == t or mod.startswith(t + ".") for t in TOP):
        return 99
    for prefix, n in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return n
    raise AssertionError(f"{mod}: in no layer; add it to tests/test_layers.LAYERS")


def _package_of(mod: str) -> str:
    path = MODULES[mod]
    return mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]


def imports(mod: str) -> Iterator[Tuple[str, List[str], int]]:
    """``(target module, names imported from it, line)`` for every import of a project module."""
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "lrcnn" or a.name.startswith("lrcnn."):
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(mod).split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "lrcnn" or target.startswith("lrcnn.")):
                continue
            names = [a.name for a in node.names]
            sub = [n for n in names if f"{target}.{n}" in MODULES]
            for n in sub:  # `from pkg import module`
                yield f"{target}.{n}", [], node.lineno
            rest = [n for n in names if n not in sub]
            if rest:
                yield target, rest, node.lineno


def graph() -> Dict[str, Set[str]]:
    g: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports(m):
            if target in MODULES and target != m:
                g[m].add(target)
    return g


def test_every_module_is_in_a_layer():
    for m in MODULES:
        layer(m)
    assert "lrcnn.planner.cli" in MODULES and "lrcnn.models.capture" in MODULES


def test_no_import_circle():
    """Tarjan's strongly connected components of the import graph: all of size one."""
    g = graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    circles: List[List[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not circles, "import circles:\n" + "\n".join(
        " <-> ".join(c) + "\n    " + "\n    ".join(f"{a} -> {b}" for a in c for b in sorted(g[a]) if b in c)
        for c in circles)


def test_imports_only_go_down():
    bad = []
    for m in MODULES:
        if layer(m) == 99:
            continue
        for target, _, line in imports(m):
            if target in MODULES and layer(target) > layer(m):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {m} (layer {layer(m)}) imports {target} "
                           f"(layer {layer(target)})")
    assert not bad, "upward imports (only lrcnn.planner.cli may import upward):\n" + "\n".join(bad)


def test_nothing_imports_the_command_line():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: {m} imports {t}"
           for m in MODULES if layer(m) != 99
           for t, _, line in imports(m) if t == "lrcnn.planner.cli" or t.startswith("lrcnn.planner.cli.")]
    assert not bad, "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_borrows_another_modules_private_name():
    bad = []
    for m in MODULES:
        tree = ast.parse(MODULES[m].read_text())
        aliases: Dict[str, str] = {}  # local name -> project module it is bound to
        for target, names, line in imports(m):
            if target == m:
                continue
            bad += [f"{MODULES[m].relative_to(ROOT)}:{line}: from {target} import {n}" for n in names if _private(n)]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lrcnn"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in MODULES:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != m and _private(node.attr)):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr} "
                           f"({aliases[node.value.id]})")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


def test_one_namespace_from_a_users_directory(tmp_path):
    """From a directory holding the user's own models.py and planner.py: lrcnn imports, the user's
    files are the user's, and no top-level models/planner/executor/analysis/bench of ours exists."""
    (tmp_path / "models.py").write_text("WHOSE = 'user'\n")
    (tmp_path / "planner.py").write_text("WHOSE = 'user'\n")
    code = ("import importlib.util, lrcnn.planner, lrcnn.executor, lrcnn.models, lrcnn, models, planner\n"
            "from lrcnn.planner import solve\nfrom lrcnn.executor import apply_plan\nfrom lrcnn.models import capture\n"
            "assert models.WHOSE == planner.WHOSE == 'user'\n"
            "assert lrcnn.solve is solve and lrcnn.apply_plan is apply_plan and lrcnn.capture is capture\n"
            "print(*[importlib.util.find_spec(n) is None for n in ('executor', 'analysis', 'bench')])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "True"]


@pytest.mark.parametrize("argv", [["-m", "lrcnn", "--help"]])
def test_python_dash_m_lrcnn_is_the_planner_command(argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: planner ")
    for verb in ("solve", "run", "validate", "report", "bench", "check-plan", "inspect", "simulate", "calibrate"):
        assert verb in p.stdout
