"""``compile_plan``: a plan executed through ``torch.compile``.

The eager :class:`~executor.program.PlannedModule` is opaque to Dynamo: its store segments' saved-
tensor hooks key tensors by storage (unhashable while tracing) and its checkpoint closures count
calls, so compiling it breaks the graph at every segment and runs them eagerly.  Here the plan
becomes one ``torch.fx.GraphModule`` that Dynamo traces whole and AOTAutograd partitions:

* ``checkpoint`` segment: a ``torch.utils.checkpoint`` region (non-reentrant).  The partitioner
  recomputes it in the backward graph; a training-mode BatchNorm's running-statistics update is a
  functionalised mutation of the forward graph, so it happens once, as in plain PyTorch;
* ``store`` segment: each run of consecutive nodes of its ``recompute`` set is one checkpoint region
  (recomputed in backward from the region's inputs: the stored tensors the run reads), every other
  node runs plainly.  A BatchNorm in a run is split as the eager executor recomputes it: its batch
  statistics (and the running-statistics update) are computed before the region and saved, the
  region recomputes only the normalisation, so a conv -> BN -> ReLU chain saves the convolution's
  output and two per-channel vectors and the backward recomputes one fused pointwise pass;
* ``rows`` segment: called eagerly (``torch.compiler.disable``: a graph break), exactly as the
  eager executor runs it.

The maths is the eager executor's (float64: within rounding of plain PyTorch); float32 rounding is
Inductor's, as for any compiled model.  Memory is the compiled program's: the plan's prediction is
for eager execution, so measure it (``bench.compare`` runs the same program op by op on the CPU).
The program refuses to run outside ``torch.compile`` (an eager checkpoint region would update the
BatchNorm running statistics a second time in its recompute).
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils.checkpoint as tcp

from lrcnn.errors import StateError
from lrcnn.executor.program import CheckpointStep, NodeStep, PlannedModule, RowsStep, adopt, apply_plan
from lrcnn.executor.rows import RowSegment, bn_normalise, run_rows, update_running_stats
from lrcnn.planner.plan import Plan


class _EagerRows(nn.Module):
    """A row segment inside a compiled plan: run eagerly (Dynamo breaks the graph here)."""

    def __init__(self, seg: RowSegment) -> None:
        super().__init__()
        object.__setattr__(self, "seg", seg)  # not a submodule: its root is the PlannedModule

    @torch.compiler.disable
    def forward(self, x):
        return run_rows(self.seg, x)


def _region(root: nn.Module, attach: Callable[[nn.Module], str], nodes: List[fx.Node], inputs: List[str],
            outputs: Sequence[str] = (), stats: Optional[Dict[str, Tuple[str, str]]] = None) -> fx.GraphModule:
    """``nodes`` (in order) as a GraphModule of their external ``inputs``, returning the last one,
    or the tuple of ``outputs``.  ``stats``: BatchNorm node -> the inputs that carry its ``(mean,
    invstd)``; such a node becomes :func:`~executor.rows.bn_normalise` (the normalisation alone).
    A BatchNorm with ``momentum=None`` computes its statistics in the region
    (:func:`_stats_nodes`; ``attach`` registers a module on ``root``): ``nn.BatchNorm``'s own forward reads
    the step count as a Python float, a graph break that would run the region eagerly and update
    the statistics again in its recompute."""
    g = fx.Graph()
    env: Dict[str, fx.Node] = {name: g.placeholder(name) for name in inputs}
    for n in nodes:
        mod = _bn_of(root, n)
        if mod is not None and ((stats and n.name in stats) or mod.momentum is None):
            w = g.get_attr(f"{n.target}.weight") if mod.weight is not None else None
            b = g.get_attr(f"{n.target}.bias") if mod.bias is not None else None
            if stats and n.name in stats:
                mean, invstd = (env[v] for v in stats[n.name])
            else:
                mean, invstd = _stats_nodes(g, attach, mod, env[n.args[0].name])
            env[n.name] = g.call_function(bn_normalise, (env[n.args[0].name], mean, invstd, w, b))
        else:
            env[n.name] = g.node_copy(n, lambda a: env[a.name])
    g.output(tuple(env[o] for o in outputs) if outputs else env[nodes[-1].name])
    return fx.GraphModule(root, g)


def _stats_nodes(g: fx.Graph, attach: Callable[[nn.Module], str], bn: nn.Module, x: fx.Node) -> Tuple[fx.Node, fx.Node]:
    """Nodes of ``g`` computing ``(mean, invstd)`` of BatchNorm ``bn`` on ``x`` (:class:`_BNStats`)."""
    st = g.call_module(attach(_BNStats(bn)), (x,))
    return g.call_function(operator.getitem, (st, 0)), g.call_function(operator.getitem, (st, 1))


class _BNStats(nn.Module):
    """``(mean, invstd)`` a BatchNorm normalises ``x`` with, as its own forward would: in training
    (or without running statistics) the batch's, the running statistics updated
    (:func:`~executor.rows.update_running_stats`); in evaluation the running statistics."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn  # registered: Dynamo sees its tensors as the model's

    def forward(self, x):
        m = self.bn
        if m.training or m.running_mean is None:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            update_running_stats(m, mean, var, x.numel() // x.shape[1])
        else:
            mean, var = m.running_mean, m.running_var
        return mean, torch.rsqrt(var + m.eps)


def _bn_of(root: nn.Module, n: fx.Node) -> Optional[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm module node ``n`` calls, or None when it calls none."""
    mod = root.get_submodule(n.target) if n.op == "call_module" else None
    return mod if isinstance(mod, nn.modules.batchnorm._BatchNorm) else None


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

        def checkpointed(nodes: List[fx.Node], inputs: List[str], outputs: Sequence[str] = (),
                         stats: Optional[Dict[str, Tuple[str, str]]] = None) -> fx.Node:
            sub = attach(_region(root, attach, nodes, inputs, outputs, stats))
            return g.call_function(tcp.checkpoint, (g.get_attr(sub),) + tuple(env[i] for i in inputs),
                                   {"use_reentrant": False})

        def recomputed_run(run: List[fx.Node]) -> None:
            """One region for a run of recomputed nodes (its outputs: the nodes read after it);
            its BatchNorms' statistics before it."""
            names = {n.name for n in run}
            stats: Dict[str, Tuple[str, str]] = {}
            for n in run:
                bn = _bn_of(root, n)
                if bn is not None:
                    key = (f"{n.name}__mean", f"{n.name}__invstd")
                    env[key[0]], env[key[1]] = _stats_nodes(g, attach, bn, env[n.args[0].name])
                    stats[n.name] = key
            inputs: List[str] = []
            for n in run:
                need = [a.name for a in n.all_input_nodes]
                if n.name in stats:
                    need = [n.args[0].name, *stats[n.name]]
                for a in need:
                    if a not in names and a not in inputs:
                        inputs.append(a)
            outputs = [n.name for n in run if any(u.name not in names for u in n.users)] or [run[-1].name]
            out = checkpointed(run, inputs, outputs, stats)
            for k, o in enumerate(outputs):
                env[o] = g.call_function(operator.getitem, (out, k))

        for st in planned._steps:
            if isinstance(st, NodeStep):
                env[st.node.name] = g.node_copy(st.node, lambda a: env[a.name])
            elif isinstance(st, RowsStep):
                env[st.out] = g.call_module(attach(_EagerRows(st.seg)), (env[st.src],))
            elif isinstance(st, CheckpointStep):
                env[st.out] = checkpointed(list(st.nodes), [st.src])
            else:  # StoreStep
                nodes, recompute = st.nodes, st.recompute
                runs: List[List[fx.Node]] = []
                for k, n in enumerate(nodes):
                    if n.name not in recompute:
                        continue
                    prev = runs[-1] if runs and nodes[k - 1] is runs[-1][-1] else None
                    # a split BatchNorm's statistics read its input before the region: the input
                    # must not come from the run itself
                    if prev is not None and not (_bn_of(root, n) is not None
                                                 and n.args[0].name in {p.name for p in prev}):
                        prev.append(n)
                    else:
                        runs.append([n])
                start = {run[0].name: run for run in runs}
                for n in nodes:
                    if n.name in start:
                        recomputed_run(start[n.name])
                    elif n.name not in recompute:
                        env[n.name] = g.node_copy(n, lambda a: env[a.name])
        g.lint()
        # not registered submodules: the tensors are this module's, under the model's names.  The
        # program's code is its own (fx generates it per GraphModule), so each plan compiles apart
        # from the others and many plans in one process stay under Dynamo's recompile limit.
        object.__setattr__(self, "program", fx.GraphModule(root, g))
        object.__setattr__(self, "compiled", torch.compile(self.program, **compile_kwargs))

    def forward(self, x):
        if self.planned.graph.values and tuple(x.shape) != tuple(self.plan.input_shape):
            # the program holds the model's shape values (x.shape[-2:] ...) as constants of the plan's shape
            raise StateError(f"this compiled plan's model reads its tensors' shapes, folded in for the plan's input "
                             f"shape {tuple(self.plan.input_shape)}; a batch of shape {tuple(x.shape)} runs with "
                             f"apply_plan (eager), or compile a plan solved for that shape")
        return self.compiled(x)


def _require_compiling() -> None:
    """The program's first node: nothing under Dynamo (it reads ``is_compiling()`` as True while
    tracing), an error when the program runs eagerly (e.g. Dynamo gave up and fell back)."""
    if not torch.compiler.is_compiling():
        raise StateError("a compiled plan's program runs only through torch.compile (use compile_plan); "
                         "for eager execution use apply_plan")


def compile_plan(model: nn.Module, plan: Plan, graph=None, **compile_kwargs) -> CompilablePlan:
    """``model`` trained by ``plan``, its program run through ``torch.compile`` (see the module
    docstring).

    The result is an ordinary module sharing the model's submodules, parameters and buffers (same
    ``state_dict()`` keys), so the user's optimizer keeps working; ``compile_kwargs`` go to
    ``torch.compile`` (``backend``, ``mode``, ...).  Raises PlanError / RowSegmentError, as
    :func:`~executor.program.apply_plan` does, when the plan does not fit the model."""
    return CompilablePlan(apply_plan(model, plan, graph), **compile_kwargs)
