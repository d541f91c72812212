"""``compile_plan``: a plan executed through ``torch.compile``.

The eager :class:`~executor.program.PlannedModule` is opaque to Dynamo: its store segments' saved-
tensor hooks key tensors by storage (unhashable while tracing) and its checkpoint closures count
calls, so compiling it breaks the graph at every segment and runs them eagerly.  Here the plan
becomes one ``torch.fx.GraphModule`` that Dynamo traces whole and AOTAutograd partitions:

* ``checkpoint`` segment: a ``torch.utils.checkpoint`` region (non-reentrant).  The partitioner
  recomputes it in the backward graph; a training-mode BatchNorm's running-statistics update is a
  functionalised mutation of the forward graph, so it happens once, as in plain PyTorch;
* ``store`` segment: every node of its ``recompute`` set is a one-node checkpoint region (its output
  is recomputed in backward from its stored inputs), every other node runs plainly;
* ``rows`` segment: called eagerly (``torch.compiler.disable``: a graph break), exactly as the
  eager executor runs it.

The maths is the eager executor's (float64: within rounding of plain PyTorch); float32 rounding is
Inductor's, as for any compiled model.  Memory is the compiled program's: the plan's prediction is
for eager execution, so measure it (``bench.compare`` runs the same program op by op on the CPU).
The program refuses to run outside ``torch.compile`` (an eager checkpoint region would update the
BatchNorm running statistics a second time in its recompute).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils.checkpoint as tcp

from planner.plan import Plan
from .program import PlannedModule, adopt, apply_plan
from .rows import RowSegment, run_rows


class _EagerRows(nn.Module):
    """A row segment inside a compiled plan: run eagerly (Dynamo breaks the graph here)."""

    def __init__(self, seg: RowSegment) -> None:
        super().__init__()
        object.__setattr__(self, "seg", seg)  # not a submodule: its root is the PlannedModule

    @torch.compiler.disable
    def forward(self, x):
        return run_rows(self.seg, x)


def _region(root: nn.Module, nodes: List[fx.Node], inputs: List[str]) -> fx.GraphModule:
    """``nodes`` (in order) as a GraphModule of their external ``inputs``, returning the last one."""
    g = fx.Graph()
    env: Dict[str, fx.Node] = {name: g.placeholder(name) for name in inputs}
    for n in nodes:
        env[n.name] = g.node_copy(n, lambda a: env[a.name])
    g.output(env[nodes[-1].name])
    return fx.GraphModule(root, g)


class CompilablePlan(nn.Module):
    """The plan's program as one fx graph (see the module docstring), run through ``torch.compile``
    (``compile_kwargs``: its arguments).  Owns the model's submodules, parameters and buffers (same
    objects, same ``state_dict()`` keys, row segments' included); ``program`` is the GraphModule,
    ``compiled`` its ``torch.compile``, ``planned`` the eager PlannedModule it was built from."""

    def __init__(self, planned: PlannedModule, **compile_kwargs) -> None:
        super().__init__()
        adopt(self, planned)
        object.__setattr__(self, "planned", planned)
        object.__setattr__(self, "plan", planned.plan)
        root = nn.Module()
        adopt(root, planned)
        g = fx.Graph()
        g.call_function(_require_compiling, ())
        env: Dict[str, fx.Node] = {}
        count = [0]

        def attach(mod: nn.Module) -> str:
            name = f"_lrcnn_part{count[0]}"
            count[0] += 1
            root.add_module(name, mod)
            return name

        def checkpointed(nodes: List[fx.Node], inputs: List[str]) -> fx.Node:
            sub = attach(_region(root, nodes, inputs))
            return g.call_function(tcp.checkpoint, (g.get_attr(sub),) + tuple(env[i] for i in inputs),
                                   {"use_reentrant": False})

        for st in planned._steps:
            kind = st[0]
            if kind == "node":
                env[st[1].name] = g.node_copy(st[1], lambda a: env[a.name])
            elif kind == "rows":
                env[st[3]] = g.call_module(attach(_EagerRows(st[1])), (env[st[2]],))
            elif kind == "checkpoint":
                env[st[3]] = checkpointed(st[1], [st[2]])
            else:  # store
                nodes, recompute = st[1], st[4]
                for n in nodes:
                    if n.name in recompute:
                        env[n.name] = checkpointed([n], [a.name for a in n.all_input_nodes])
                    else:
                        env[n.name] = g.node_copy(n, lambda a: env[a.name])
        g.lint()
        # not registered submodules: the tensors are this module's, under the model's names.  The
        # program's code is its own (fx generates it per GraphModule), so each plan compiles apart
        # from the others and many plans in one process stay under Dynamo's recompile limit.
        object.__setattr__(self, "program", fx.GraphModule(root, g))
        object.__setattr__(self, "compiled", torch.compile(self.program, **compile_kwargs))

    def forward(self, x):
        return self.compiled(x)


def _require_compiling() -> None:
    """The program's first node: nothing under Dynamo (it reads ``is_compiling()`` as True while
    tracing), an error when the program runs eagerly (e.g. Dynamo gave up and fell back)."""
    if not torch.compiler.is_compiling():
        raise RuntimeError("a compiled plan's program runs only through torch.compile (use compile_plan); "
                           "for eager execution use apply_plan")


def compile_plan(model: nn.Module, plan: Plan, graph=None, **compile_kwargs) -> CompilablePlan:
    """``model`` trained by ``plan``, its program run through ``torch.compile`` (see the module
    docstring).

    The result is an ordinary module sharing the model's submodules, parameters and buffers (same
    ``state_dict()`` keys), so the user's optimizer keeps working; ``compile_kwargs`` go to
    ``torch.compile`` (``backend``, ``mode``, ...).  Raises PlanError / RowSegmentError, as
    :func:`~executor.program.apply_plan` does, when the plan does not fit the model."""
    return CompilablePlan(apply_plan(model, plan, graph), **compile_kwargs)
