"""``apply_plan``: turn a model and a plan into an ordinary ``nn.Module`` that trains by the plan.

The returned :class:`PlannedModule` owns the very same submodules, parameters and buffers as the
user's model (same objects, same ``state_dict()`` keys), so the user's optimizer keeps working.
Its forward walks the model's fx graph; plan segments replace runs of nodes:

* ``store``: plain autograd; nodes in the ``recompute`` set have their outputs dropped after the
  forward pass (saved-tensor hooks store a recipe instead) and recomputed when backward needs them
  (a BatchNorm that normalised with its batch statistics is recomputed from the mean and inverse
  std its forward saved: one normalising pass, not the statistics again);
* ``checkpoint``: ``torch.utils.checkpoint`` (non-reentrant); BatchNorm running statistics are
  updated once, in the forward pass, never again in the recompute;
* ``rows``: :mod:`lrcnn.executor.rows`.

A loss inside the last row segment (``apply_plan(model, plan, loss=fn)``, ``pm(x, target)``): the
segment that makes a dense model's logits evaluates the per-position loss ``fn`` strip by strip
and returns its mean (:class:`lrcnn.executor.rows.RowLoss`), so the logits map never exists.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils.checkpoint as tcp

from lrcnn.errors import UsageError, UsageTypeError
from lrcnn.executor.rows import RowLoss, RowSegment, bn_normalise, run_rows
from lrcnn.executor.state import StateSlots, amp_replay, amp_state, no_cast_cache
from lrcnn.models import ops as _ops
from lrcnn.models.capture import capture, fetch_attr, fold_values, read_values, shape_values, trace
from lrcnn.models.loss import OUT_KEY, logits_of
from lrcnn.models.memory import mark as _mark, measuring as _measuring
from lrcnn.models.ops import call, out_of_place_call, out_of_place_module
from lrcnn.planner.plan import Plan, PlanError


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class _NodeRunner:
    """Runs single fx nodes against the planned module (plain semantics, or side-effect free)."""

    def __init__(self, root: nn.Module):
        self._root = weakref.ref(root)  # no reference cycle: a dropped model is freed at once
        self._cache: Dict[str, nn.Module] = {}  # node -> its module, out of place

    def run(self, n: fx.Node, env: Dict[str, Any], mode: str = "plain") -> Any:
        """Evaluate node ``n``.

        ``mode``: ``plain`` (the model's own call), ``noinplace`` (same, but activations do not
        overwrite their input), ``pure`` (recomputation: no in-place; run it with the segment's
        buffers bound to copies, :meth:`StateSlots.replay`, so no state is written twice).
        """
        args = fx.node.map_arg(n.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
        if n.op == "call_module":
            mod = self._root().get_submodule(n.target)
            if mode != "plain":  # (``pure``: the caller binds copies of the buffers, StateSlots.replay)
                if n.name not in self._cache:
                    self._cache[n.name] = out_of_place_module(mod)
                mod = self._cache[n.name]
            return mod(*args, **kwargs)
        if n.op in ("call_function", "call_method"):
            target = n.target
            if mode != "plain":
                target, kwargs = out_of_place_call(target, kwargs)
            return call(n.op, target, args, kwargs)
        if n.op == "get_attr":
            return fetch_attr(self._root(), str(n.target))
        raise RuntimeError(f"internal: cannot run node {n.name} ({n.op})")

    def normalise(self, n: fx.Node, x, stats) -> Any:
        """BatchNorm node ``n`` applied to ``x`` with the forward's batch ``stats`` =
        ``(mean, invstd)``: its normalisation again (:func:`~executor.rows.bn_normalise`), without
        computing the statistics or touching running statistics (a store-segment recompute); the
        result differs from the forward's output by a few units in the last place."""
        m = self._root().get_submodule(n.target)
        return bn_normalise(x, *stats, m.weight, m.bias)


@dataclass(frozen=True)
class NodeStep:
    """A program step outside every plan segment: one fx node, run as the model runs it."""

    node: fx.Node

    @property
    def inputs(self) -> List[str]:
        return [a.name for a in self.node.all_input_nodes]


@dataclass(frozen=True)
class RowsStep:
    """A ``rows`` plan segment: its executable :class:`RowSegment`, applied to value ``src``
    (the segment input), giving value ``out`` (its last node)."""

    seg: RowSegment
    src: str
    out: str

    @property
    def inputs(self) -> List[str]:
        return [self.src]


@dataclass(frozen=True)
class CheckpointStep:
    """A ``checkpoint`` plan segment: its fx ``nodes`` run from value ``src`` to value ``out``
    under ``torch.utils.checkpoint``; ``slots``: the state its modules read and write."""

    nodes: Tuple[fx.Node, ...]
    src: str
    out: str
    slots: StateSlots

    @property
    def inputs(self) -> List[str]:
        return [self.src]


@dataclass(frozen=True)
class StoreStep:
    """A ``store`` plan segment: its fx ``nodes`` run from value ``src`` to value ``out`` with plain
    autograd, the outputs of the nodes named in ``recompute`` dropped and recomputed in backward;
    ``slots``: the state of the recomputed nodes' modules."""

    nodes: Tuple[fx.Node, ...]
    src: str
    out: str
    recompute: FrozenSet[str]
    slots: StateSlots

    @property
    def inputs(self) -> List[str]:
        return [self.src]


Step = Union[NodeStep, RowsStep, CheckpointStep, StoreStep]  # one step of a PlannedModule's program


class _Recipe:
    """How to recompute a dropped store-segment output: node + (tensors or recipes) of its inputs;
    ``stats``: for a BatchNorm that normalised with its batch statistics, ``(mean, invstd)`` of
    that batch (the tensors its autograd node saved), so the recompute is the one normalising pass."""

    __slots__ = ("node", "inputs", "stats")

    def __init__(self, node: fx.Node, inputs: Dict[str, Any], stats=None):
        self.node = node
        self.inputs = inputs
        self.stats = stats


def _batch_stats(mod: nn.Module, out) -> Any:
    """``(mean, invstd)`` of the batch a train-mode BatchNorm ``mod`` just normalised into ``out``:
    the tensors its autograd node saved (nothing is computed or allocated); None when ``out`` is not
    such a BatchNorm's output."""
    if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or _ops.module_refusal(mod):
        return None  # (a hook or an own forward: only the module's own call recomputes it)
    fn = getattr(out, "grad_fn", None)
    # NativeBatchNormBackward0 (CPU, and CUDA without cuDNN): result1 = batch mean, result2 = its
    # inverse std.  Other backends (cuDNN, MIOpen) keep the full recompute.
    if type(fn).__name__ != "NativeBatchNormBackward0" or not fn._saved_training:
        return None
    mean, invstd = fn._saved_result1, fn._saved_result2
    if mean is None or invstd is None or mean.dim() != 1 or mean.numel() != out.shape[1]:
        return None
    return mean, invstd


def adopt(dst: nn.Module, src: nn.Module) -> None:
    """Register ``src``'s children, own parameters and own buffers on ``dst``: the same objects
    under the same names (so ``dst.state_dict()`` has ``src``'s keys)."""
    for name, child in src.named_children():
        dst.add_module(name, child)
    for name, p in src.named_parameters(recurse=False):
        dst.register_parameter(name, p)
    for name, b in src.named_buffers(recurse=False):
        dst.register_buffer(name, b)


class PlannedModule(nn.Module):
    """The user's model, trained by a plan.  Same submodules, parameters and buffers."""

    # built from the model, plan and graph: not copied, pickled or saved, but built again
    _DERIVED = ("_fx", "_runner", "_steps", "_last", "_seg_index", "_modes", "_code", "_by_modes", "_traced",
                "_by_shape")

    def __init__(self, model: nn.Module, plan: Plan, graph, gm: fx.GraphModule, loss=None):
        super().__init__()
        adopt(self, model)
        # the per-position loss ``forward(x, target)`` evaluates inside the last row segment
        object.__setattr__(self, "row_loss", loss)
        self.training = model.training  # not train(): that would reset the children's modes
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "graph", graph)
        # the user's model (its submodules are ours): its forward is traced again when a copy
        # (copy.deepcopy, swa_utils.AveragedModel, pickle, torch.save) is built
        object.__setattr__(self, "_model", model)
        self._program(gm)

    def _program(self, gm: fx.GraphModule) -> None:
        # the train/eval modes the program was traced in: traced code keeps the branches it took
        # (``if self.training:``), so another mode is traced again before it runs (_mode_program)
        object.__setattr__(self, "_modes", self._mode_key())
        object.__setattr__(self, "_code", gm.code)
        object.__setattr__(self, "_by_modes", {})
        object.__setattr__(self, "_runner", _NodeRunner(self))
        # the model's shape values (x.shape[-2:] ...) folded in as the constants they are at the
        # plan's input shape; a batch of another shape runs a program folded for it (_shape_program)
        object.__setattr__(self, "_traced", gm)
        object.__setattr__(self, "_by_shape", {})
        fxg = fold_values(gm.graph, self.graph.values) if self.graph.values else gm.graph
        object.__setattr__(self, "_fx", fxg)
        self._set_program(self._build_steps(fxg))

    def __getstate__(self):
        state = super().__getstate__()
        state = {k: v for k, v in state.items() if k not in self._DERIVED}
        return state

    def __setstate__(self, state):
        # a copy: its own modules (shared with its own copy of the model), the same plan; the
        # program is built for them, so the copy trains its own parameters
        super().__setstate__(state)
        self._program(trace(self._model))

    # -- program --------------------------------------------------------------------------------
    def _set_program(self, program: tuple) -> None:
        steps, last, seg_index = program
        object.__setattr__(self, "_steps", steps)
        object.__setattr__(self, "_last", last)
        object.__setattr__(self, "_seg_index", seg_index)

    def _shape_program(self, x) -> tuple:
        """The program for a batch of ``x``'s shape, of a model with shape values: the planned one
        where they are the values the plan was captured with (a model reading only ``x.shape[-2:]``,
        at another batch size), else one folded with this shape's values (made once per shape)."""
        shape = tuple(x.shape)
        hit = self._by_shape.get(shape)
        if hit is None:
            values = shape_values(self._traced, shape, _dtype(self.plan.dtype))
            g = self._traced.graph
            if read_values(g, values) == read_values(g, self.graph.values):
                hit = (self._steps, self._last, self._seg_index)
            else:
                hit = self._build_steps(fold_values(g, values))
            self._by_shape[shape] = hit
        return hit

    def _build_steps(self, fxg: fx.Graph) -> tuple:
        """The program (steps, last use of every value, step -> plan segment) of the fx graph ``fxg``."""
        fxnodes = {n.name: n for n in fxg.nodes}
        graph, plan = self.graph, self.plan
        seg_at = {}
        for s in plan.segments:
            seg_at[s.first] = s
        steps: List[Step] = []
        seg_index: Dict[int, int] = {}  # step position -> index of its plan segment
        order = list(fxg.nodes)
        i = 0
        while i < len(order):
            n = order[i]
            s = seg_at.get(n.name)
            if s is None:
                steps.append(NodeStep(n))
                i += 1
                continue
            j = graph.index(s.last)
            nodes = order[i: j + 1]
            seg_index[len(steps)] = plan.segments.index(s)
            src = order[i - 1].name
            if s.mode == "rows":
                seg = RowSegment(self, graph, fxnodes, s)
                seg.allow_amp = bool(plan.training.get("amp_rows"))
                steps.append(RowsStep(seg, src, s.last))
            elif s.mode == "checkpoint":
                steps.append(CheckpointStep(tuple(nodes), src, s.last, StateSlots(self._modules_of(nodes))))
            else:
                rec = set(s.recompute)
                for r in rec:
                    gn = graph[r]
                    if not _ops.recomputable(gn):
                        raise PlanError(f"segment {s.first}..{s.last}: recompute node {r!r} is a {gn.op} "
                                        f"({gn.kind}); only activation, BatchNorm and add outputs can be "
                                        f"recomputed ({', '.join(sorted(_ops.RECOMPUTE_OPS))})")
                mods = self._modules_of([n for n in nodes if n.name in rec])
                steps.append(StoreStep(tuple(nodes), src, s.last, frozenset(rec), StateSlots(mods)))
            i = j + 1
        # last use of every value, for freeing
        last: Dict[str, int] = {}
        for k, st in enumerate(steps):
            for name in st.inputs:
                last[name] = k
        return steps, last, seg_index

    def _modules_of(self, nodes: List[fx.Node]) -> List[nn.Module]:
        """The modules ``nodes`` call, and the owners of the tensors they read by attribute."""
        mods = []
        for n in nodes:
            if n.op == "call_module":
                mods.append(self.get_submodule(n.target))
            elif n.op == "get_attr":
                owner = str(n.target).rpartition(".")[0]
                mods.append(self.get_submodule(owner) if owner else self)
        return mods

    def _mode_key(self) -> tuple:
        self._model.training = self.training  # (train()/eval() on us reach its children, not it)
        return tuple(m.training for m in self._model.modules())

    def _mode_program(self):
        """None when the model's traced code in its current train/eval modes is the planned
        program's; else the model itself (its code differs in these modes: eval-mode inference
        runs it as written) or PlanError (training: the plan is for other code)."""
        key = self._mode_key()
        if key == self._modes:
            return None
        hit = self._by_modes.get(key)
        if hit is None:
            hit = self._by_modes[key] = trace(self._model).code == self._code
        if hit:
            return None
        if self.training:
            raise PlanError("the model's traced code differs in its current train/eval modes from the code "
                            "the plan was made for (a forward that branches on self.training); capture and "
                            "solve again with the modules in these modes")
        return self._model

    def _loss_step(self, steps: List[Step]) -> int:
        """The position of the step that evaluates the loss (``row_loss``): the plan's last
        segment, a rows segment ending at the node whose output is the model's logits (the output
        itself, or its dict's ``"out"`` entry), with nothing but the output after it.  PlanError
        otherwise (the fix in the message)."""
        out = steps[-1].node if steps and isinstance(steps[-1], NodeStep) else None
        if out is None or out.op != "output":
            raise PlanError("internal: the program does not end at the model's output")
        res = out.args[0]
        if isinstance(res, dict):
            logits = res.get(OUT_KEY) if OUT_KEY in res else (next(iter(res.values())) if len(res) == 1 else None)
        elif isinstance(res, (tuple, list)):
            logits = res[0] if len(res) == 1 else None
        else:
            logits = res
        fix = ("apply the plan without loss= (then compute the loss on the output), or plan the model "
               "with its last row segment ending at the logits")
        if not isinstance(logits, fx.Node):
            raise PlanError(f"loss inside the last row segment: the model's output holds no logits tensor under "
                            f"{OUT_KEY!r}; {fix}")
        others = [a.name for a in out.all_input_nodes if a is not logits]
        if others:
            raise PlanError(f"loss inside the last row segment: the model's output reads {', '.join(others)} "
                            f"besides its logits {logits.name!r} (an auxiliary head?): only the logits can "
                            f"be reduced to the loss inside the strips; build the model without them, or {fix}")
        k = len(steps) - 2
        st = steps[k] if k >= 0 else None
        if not (isinstance(st, RowsStep) and st.out == logits.name):
            what = (f"rows segment {st.seg.name}" if isinstance(st, RowsStep)
                    else f"node {st.node.name!r} (outside every row segment)" if isinstance(st, NodeStep)
                    else f"a {type(st).__name__.replace('Step', '').lower()} segment ending at {st.out!r}"
                    if st is not None else "nothing")
            raise PlanError(f"loss inside the last row segment: the logits {logits.name!r} must be made by the "
                            f"plan's last segment in rows mode, but {what} makes them; {fix}")
        return k

    @property
    def row_segments(self) -> List[RowSegment]:
        return [st.seg for st in self._steps if isinstance(st, RowsStep)]

    # -- execution ----------------------------------------------------------------------------
    def forward(self, x, target=None):
        """The model's output for the batch ``x``; with ``target`` (a module applied with
        ``loss=``), the loss's mean over every output position, evaluated inside the last row
        segment (the logits map never exists)."""
        if target is not None and self.row_loss is None:
            raise UsageError("forward(x, target) returns the loss of a module applied with a per-position loss: "
                             "apply_plan(model, plan, loss=lrcnn.models.loss.pixel_cross_entropy); without "
                             "one, call it with x alone and compute the loss on its output")
        other = self._mode_program()
        if other is not None:
            if target is None:
                return other(x)
            logits = logits_of(other(x))  # (eval-mode code of its own: the plain loss of its output)
            rl = RowLoss(self.row_loss, target)
            rl.check(logits, logits.shape[2] if logits.dim() == 4 else 0, "(the model's eval-mode code)")
            return rl.sum(logits, 0, logits.shape[2], "(the model's eval-mode code)") / rl.count
        env: Dict[str, Any] = {}
        runner = self._runner
        result = None
        steps, last_use, seg_index = (self._steps, self._last, self._seg_index)
        if self.graph.values and tuple(x.shape) != tuple(self.plan.input_shape):
            steps, last_use, seg_index = self._shape_program(x)
        loss_at = self._loss_step(steps) if target is not None else -1
        # Segment boundaries for memory/time measurement (executor.memory.mark): only while a
        # measurement is active, so normal runs register nothing.  Backward marks come from
        # gradient hooks that return None (the gradient is untouched).
        marks: Dict[str, List[str]] = {} if _measuring() else None
        for k, st in enumerate(steps):
            seg = seg_index.get(k) if marks is not None else None
            if seg is not None:
                _mark(f"segment {seg} forward begin")
                self._grad_mark(env[st.src], st.src, f"segment {seg} backward", marks)
            if isinstance(st, NodeStep):
                n = st.node
                if n.op == "placeholder":
                    env[n.name] = x
                elif n.op == "output":
                    result = fx.node.map_arg(n.args[0], lambda a: env[a.name])
                else:
                    env[n.name] = runner.run(n, env)
            elif k == loss_at:  # the loss's mean, in place of the logits (the last step: returned)
                env[st.out] = result = run_rows(st.seg, env[st.src], RowLoss(self.row_loss, target))
            elif isinstance(st, RowsStep):
                env[st.out] = run_rows(st.seg, env[st.src])
            elif isinstance(st, CheckpointStep):
                env[st.out] = self._run_checkpoint(st.nodes, env[st.src], st.src, st.slots)
            else:
                env[st.out] = self._run_store(st.nodes, env[st.src], st.src, st.recompute, st.slots)
            if seg is not None:
                _mark(f"segment {seg} forward")
                self._grad_mark(env[st.out], st.out, f"segment {seg} backward begin", marks)
            for name in st.inputs:
                if last_use.get(name) == k:
                    env.pop(name, None)
            if k == loss_at:
                break
        return result

    @staticmethod
    def _grad_mark(t, name: str, label: str, marks: Dict[str, List[str]]) -> None:
        """Have ``mark(label)`` fire when the gradient w.r.t. ``t`` is computed.  One hook per
        tensor; labels fire in the order added (a segment's input is the previous segment's
        output: "segment i backward" is added first and must fire before "segment i-1 backward
        begin").  The hook holds the label list, never the tensor."""
        if not (isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()):
            return
        labels = marks.get(name)
        if labels is None:
            labels = marks[name] = []

            def hook(grad, labels=labels):
                for lab in labels:
                    _mark(lab)

            t.register_hook(hook)
        if label.endswith("begin"):
            labels.append(label)
        else:
            labels.insert(0, label)

    def _run_nodes(self, nodes: List[fx.Node], x, src: str, mode: str = "plain"):
        env = {src: x}
        last: Dict[str, int] = {}
        for k, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last[a.name] = k
        for k, n in enumerate(nodes):
            # never overwrite the segment input: a checkpoint saved it (e.g. a segment that
            # starts with an in-place ReLU)
            m = "noinplace" if mode == "plain" and any(a.name == src for a in n.all_input_nodes) else mode
            env[n.name] = self._runner.run(n, env, m)
            for a in n.all_input_nodes:
                if last.get(a.name) == k:
                    env.pop(a.name, None)
        return env[nodes[-1].name]

    def _run_checkpoint(self, nodes, x, src, slots: StateSlots):
        if not torch.is_grad_enabled():
            return self._run_nodes(nodes, x, src)
        snap = slots.snapshot()  # before the forward writes any state
        calls = [0]

        def fn(inp):
            calls[0] += 1
            if calls[0] == 1:  # the forward pass (keeping no autocast weight copies: see no_cast_cache)
                with no_cast_cache():
                    return self._run_nodes(nodes, inp, src, "plain")
            # a recomputation: the forward's tensors and state; what it writes is thrown away
            with slots.replay(snap):
                return self._run_nodes(nodes, inp, src, "pure")

        return tcp.checkpoint(fn, x, use_reentrant=False, preserve_rng_state=True)

    def _run_store(self, nodes, x, src, recompute: set, slots: StateSlots):
        if not recompute or not torch.is_grad_enabled():
            return self._run_nodes(nodes, x, src)
        runner = self._runner
        snap = slots.snapshot()  # the recompute uses the tensors and state this forward used
        amp = amp_state()  # ... and runs each op in the dtype this forward ran it in
        env: Dict[str, Any] = {src: x}
        registry: Dict[int, tuple] = {}  # storage id -> (weakref to output, recipe)

        def key(t):
            return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))

        fresh: List[list] = []  # boxes packed while the current node runs

        def pack(t):
            if not isinstance(t, torch.Tensor):
                return t
            hit = registry.get(key(t))
            if hit is not None and hit[0]() is not None:
                return [hit[1]]
            box = [t]  # an op may save its own output before we know it is one to drop
            fresh.append(box)
            return box

        def materialise(v):
            if isinstance(v, _Recipe):
                ins = {k: materialise(a) for k, a in v.inputs.items()}
                # a backward with create_graph=True differentiates the recompute too: then it is
                # recorded, and a BN recomputes its statistics (the saved ones carry no graph)
                graph = torch.is_grad_enabled()
                with torch.set_grad_enabled(graph), slots.replay(snap), amp_replay(amp):
                    if v.stats is not None and not graph:
                        return runner.normalise(v.node, *ins.values(), v.stats)
                    return runner.run(v.node, ins, "pure")
            return v

        def unpack(box):
            return materialise(box[0]) if isinstance(box, list) else box

        last: Dict[str, int] = {}
        for k, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last[a.name] = k
        recipes: Dict[str, Any] = {}
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            for k, n in enumerate(nodes):
                touches = n.name in recompute or any(a.name in recompute for a in n.all_input_nodes)
                fresh.clear()
                out = runner.run(n, env, "noinplace" if touches else "plain")
                env[n.name] = out
                if n.name in recompute and isinstance(out, torch.Tensor):
                    stats = _batch_stats(self.get_submodule(n.target), out) if n.op == "call_module" else None
                    rec = _Recipe(n, {a.name: recipes.get(a.name, env[a.name]) for a in n.all_input_nodes}, stats)
                    recipes[n.name] = rec
                    k_out = key(out)
                    registry[k_out] = (weakref.ref(out), rec)
                    for box in fresh:  # the op saved its own output (e.g. ReLU): drop it too
                        if isinstance(box[0], torch.Tensor) and key(box[0]) == k_out:
                            box[0] = rec
                for a in n.all_input_nodes:
                    if last.get(a.name) == k:
                        env.pop(a.name, None)
        # autograd keeps the pack hook (and so its closure) with every saved tensor until the
        # segment's whole backward is done: let go of the recipes (and the tensors they hold) and
        # the last node's boxes here, so each is freed as soon as its own savers ran backward
        registry.clear()
        fresh.clear()
        return env[nodes[-1].name]


class PlanDtypeWarning(UserWarning):
    """:func:`apply_plan` was given a model whose parameters are not in the plan's dtype: the plan
    runs (it captures the model in its own dtype), but its memory prediction and budget are for the
    plan's dtype, not the model's."""


def _check_model_dtype(model: nn.Module, plan: Plan) -> None:
    """Warn (:class:`PlanDtypeWarning`) when the model's floating parameters are not in ``plan.dtype``."""
    have = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    if not have or have == [plan.dtype]:
        return
    model_dtype = " and ".join(have)
    fix = (f"re-plan for it: solve(model, {tuple(plan.input_shape)}, budget, dtype={have[0]!r}) "
           f"(planner solve --dtype {have[0]}), or convert the model: model.to(torch.{plan.dtype})")
    warnings.warn(f"apply_plan: the model's parameters are {model_dtype} but the plan was made for {plan.dtype}: "
                  f"its memory prediction and budget do not hold for this model; {fix}", PlanDtypeWarning, stacklevel=3)


def apply_plan(model: nn.Module, plan: Plan, graph=None, loss=None) -> PlannedModule:
    """Return a module that computes exactly what ``model`` computes, with the plan's memory use.

    The result shares the model's submodules, parameters and buffers; train it with your own loop
    (``loss = crit(m(x), y); loss.backward(); opt.step()``; a plan with ``training.amp`` is priced for
    that step's forward and loss under ``torch.autocast`` in its dtype).  ``graph``: a capture of the model at
    the plan's input shape, if you already have one.  Raises PlanError / RowSegmentError with a
    message naming the node when the plan does not fit the model.

    ``loss``: a per-position loss ``loss(logits_rows, target_rows)`` returning the loss of every
    position (reduction none), e.g. :func:`lrcnn.models.loss.pixel_cross_entropy`, for a dense
    model whose plan ends in a rows segment that makes its logits (the output, or the output
    dict's ``"out"``; PlanError otherwise).  Then ``m(x, target)`` returns the mean of the loss over
    every position (a scalar to call ``backward()`` on), evaluated inside that segment strip by
    strip: the full-resolution logits, their gradient and the loss's log-softmax map never exist
    (plan ``training.loss_in_rows`` prices that step).  ``m(x)`` still returns the output.  The
    mean is over every position: a target with ignored positions (``ignore_index``) is not the
    plain cross-entropy's mean.
    """
    if not isinstance(plan, Plan):
        raise UsageTypeError(f"apply_plan needs a planner.Plan, got {type(plan).__name__} (use Plan.load(path) "
                             f"for a JSON file)")
    _check_model_dtype(model, plan)
    gm = trace(model)
    if graph is None:
        graph = capture(model, plan.input_shape, _dtype(plan.dtype), model_name=plan.model, gm=gm,
                        amp=plan.training.get("amp"))
    plan.validate(graph)
    if loss is not None and not callable(loss):
        raise UsageTypeError(f"apply_plan's loss must be a function loss(logits_rows, target_rows) -> per-position "
                             f"losses, got {type(loss).__name__}")
    pm = PlannedModule(model, plan, graph, gm, loss)
    if loss is not None:
        pm._loss_step(pm._steps)  # (refused here: the plan's last segment does not make the logits)
    return pm
