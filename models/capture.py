"""Graph capture: trace a model with torch.fx and describe every node without real memory.

``capture(model, input_shape)`` traces the model, runs the traced graph once under
``FakeTensorMode`` with autograd on (so no real memory is touched, whatever the size) and records
per node: op kind, module path, output shape and bytes, the bytes autograd saves for backward
(observed with saved-tensor hooks, deduplicated by storage), forward/backward FLOPs and the
H-geometry.  The result, :class:`LayerGraph`, is what the planner and executor work from.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re as _re
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from lrcnn.errors import LrcnnError
from lrcnn.models import ops as _ops
from lrcnn.models.loss import logits_of, synthetic_target, cross_entropy as _cross_entropy
from lrcnn.models.geometry import HGeom, IDENTITY, RowGraph, cumulative_strides, receptive_fields
from lrcnn.models.memory import StorageTracker
from lrcnn.models.zoo import default_resolution, get_model, parse_dtype, set_bn_mode


class CaptureError(LrcnnError, ValueError):
    """The model cannot be captured at this input shape, or a captured graph is asked for what it
    does not hold (message says why and what to do)."""


class UnknownNodeError(CaptureError, KeyError):
    """No node or module of that name in a captured graph; still a ``KeyError``, as a lookup's
    error is (its message prints as given, without ``KeyError``'s quotes)."""

    __str__ = CaptureError.__str__


@dataclass
class Node:
    """One node of the layer graph."""

    name: str                 # fx node name (unique)
    op: str                   # conv2d, maxpool2d, batchnorm2d, relu, add, cat, linear, ...
    kind: str                 # spatial | pointwise | join | norm | global | input | output
    target: str               # module path for module calls, function name otherwise
    module: str               # owning module path ('' for the root)
    inputs: List[str]         # tensor inputs (node names)
    shape: Tuple[int, ...]    # output shape
    out_bytes: int            # bytes of the output tensor
    saved_bytes: int = 0      # activation bytes autograd keeps for backward, first saved here
    flops_fwd: int = 0
    flops_bwd: int = 0
    geom: Optional[HGeom] = None
    rowwise: bool = False
    reason: str = ""          # why the node cannot run in a row segment
    param_bytes: int = 0
    grad_bytes: int = 0       # bytes of the parameters that get a gradient (not frozen)
    # autograd records the node in training (a trainable parameter at or upstream of it; the input
    # batch needs no gradient): False on a frozen stem, where every mode runs a plain forward
    needs_grad: bool = True
    param_tensors: int = 0    # parameter tensors of the node's module (weight, bias)
    groups: int = 1           # convolution groups (depthwise convolutions time differently)
    receptive_field: int = 1  # input rows one interior output row depends on
    cum_stride: int = 1       # input rows per row (product of strides; a float below 1 after up-sampling)
    # Memory profile of one plain training step (fake tensors, storage accounting), used by the
    # cost model.  Forward: ``alias`` (the output reuses an input's storage: in-place or view),
    # ``saves`` (producers whose outputs this node keeps for backward), ``extra_saved`` (bytes it
    # keeps that are no node's output: BN statistics, pooling indices), ``fwd_work`` (bytes
    # allocated and freed inside the call).  Backward, measured from the moment this node's
    # gradient function starts until the next node's starts: ``bwd_peak`` (peak above the live
    # bytes at its start) and ``bwd_net`` (change of live bytes: gradients made minus tensors freed).
    batch_stats: bool = False  # a norm layer that normalises with batch statistics (train-mode BN)
    alias: bool = False
    saves: List[str] = field(default_factory=list)
    # producers whose outputs this node saves too, after an earlier node saved the same storage
    # (counted once, in that node's ``saves``): in row strips, where in-place ops run out of
    # place, the two are different tensors (a ReLU's output and the next op's input band)
    also_saves: List[str] = field(default_factory=list)
    extra_saved: int = 0
    # the part of ``extra_saved`` that is the size of a parameter, not of the map (autocast's
    # half-precision copy of a weight): a row strip saves it whole, not a share of it
    extra_fixed: int = 0
    # the part of ``extra_saved`` shaped like one of the node's inputs (autocast's half-precision
    # copy of a float32 input): a row strip saves the input band's share of it
    extra_input: int = 0
    fwd_work: int = 0
    bwd_peak: int = 0
    bwd_net: int = 0

    @property
    def height(self) -> int:
        return self.shape[2] if len(self.shape) == 4 else 1

    @property
    def is_map(self) -> bool:
        return len(self.shape) == 4


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: mixed precision as users run it: ``torch.autocast`` with these half-precision dtypes over
#: float32 parameters (``--amp``)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: Optional[str], dtype: torch.dtype = torch.float32) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` (``None`` for none); :class:`CaptureError` (a ``ValueError``)
    unless ``amp`` is one of :data:`AMP_DTYPES` over float32 parameters."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise CaptureError(f"amp {amp!r} is not one of {', '.join(AMP_DTYPES)}; give one of them, or none")
    if dtype != torch.float32:
        raise CaptureError(f"--amp {amp} runs float32 parameters under autocast: use --dtype float32, "
                           f"not {_dtype_name(dtype)}")
    return AMP_DTYPES[amp]


def compute_dtype(dtype: str, amp: Optional[str]) -> str:
    """The dtype name convolutions run in: ``dtype``, or under autocast ``amp``'s half one."""
    return _dtype_name(AMP_DTYPES[amp]) if amp else dtype


@dataclass
class LayerGraph:
    """Captured layer graph of a model at one input shape."""

    nodes: List[Node]
    input_shape: Tuple[int, ...]
    dtype: str
    model_name: str = ""
    training: bool = True
    amp: Optional[str] = None  # captured under autocast (a key of AMP_DTYPES): half-precision activations
    by_name: Dict[str, Node] = field(default_factory=dict, repr=False)
    # the shape values of the traced model at this input shape (fx node -> value): nodes that
    # compute no tensor, only numbers from tensors' shapes (``x.shape[-2:]``, ``x.size(0)``); they
    # are no nodes of the graph (no live tensor, no cut point blocked), and an executor folds them
    # into the nodes that read them (:func:`fold_values`)
    values: Dict[str, object] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.by_name = {n.name: n for n in self.nodes}
        self._index = {n.name: i for i, n in enumerate(self.nodes)}

    # -- access -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self):
        return len(self.nodes)

    def index(self, name: str) -> int:
        return self._index[name]

    def source_of(self, first: str) -> Node:
        """The node whose output a segment starting at ``first`` reads (the node before it)."""
        return self.nodes[self._index[first] - 1]

    @property
    def input_node(self) -> Node:
        return self.nodes[0]

    @property
    def output_node(self) -> Node:
        return self.nodes[-1]

    def consumers(self) -> Dict[str, List[str]]:
        cons: Dict[str, List[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for u in n.inputs:
                cons[u].append(n.name)
        return cons

    def row_graph(self) -> RowGraph:
        return RowGraph([n.name for n in self.nodes], {n.name: n.inputs for n in self.nodes},
                        {n.name: (n.geom or IDENTITY) for n in self.nodes},
                        {n.name: n.height for n in self.nodes})

    def cut_points(self) -> List[str]:
        """Nodes after which exactly one tensor (that node's output) is live: legal segment ends."""
        last_use = {}
        for i, n in enumerate(self.nodes):
            for u in n.inputs:
                last_use[u] = i
        cuts = []
        live: set = set()
        for i, n in enumerate(self.nodes):
            live.add(n.name)
            live = {u for u in live if last_use.get(u, -1) > i}
            if live == {n.name}:
                cuts.append(n.name)
        return cuts

    def read_indices(self) -> Tuple[List[int], List[int], List[int]]:
        """Per node (by index): the index of the last node that reads its output (-1: none), the
        lowest index of a node it reads (its own index when it reads none), and the node whose
        storage its output lives in (itself, or for an in-place op or view its input's owner).
        Computed once per graph (its nodes are not changed after capture)."""
        hit = self.__dict__.get("_reads_cache")
        if hit is not None and len(hit[0]) == len(self.nodes):
            return hit
        idx = self._index
        last_read = [-1] * len(self.nodes)
        lowest = list(range(len(self.nodes)))
        owner = list(range(len(self.nodes)))
        for i, n in enumerate(self.nodes):
            for u in n.inputs:
                k = idx[u]
                last_read[k] = i
                lowest[i] = min(lowest[i], k)
            if n.alias and n.inputs:
                owner[i] = owner[idx[n.inputs[0]]]
        hit = (last_read, lowest, owner)
        self.__dict__["_reads_cache"] = hit
        return hit

    def passing(self, first: str, last: str) -> List[str]:
        """Values that pass over the segment ``first..last``: made before it (the segment input
        included) and read after it.  They stay live while it runs, in forward and backward."""
        a, b = self._index[first], self._index[last]
        last_read = self.read_indices()[0]
        return [self.nodes[k].name for k in range(a) if last_read[k] > b]

    def segment_refusal(self, first: str, last: str) -> Optional[str]:
        """Why ``first..last`` cannot be a plan segment (None: it can).

        A segment reads one tensor made before it, its input (the output of the node before
        ``first``), and one tensor it makes is read after it, ``last``'s output; older values
        (and the input itself) may pass over it, read by nodes after it.  (An in-place op inside
        it that overwrites its input cannot hide a second output: the capture names what a
        reader after it reads by that op, a tensor the segment makes.)"""
        a, b = self._index[first], self._index[last]
        last_read, lowest, _ = self.read_indices()
        src = a - 1
        for i in range(a, b + 1):
            if lowest[i] < src:
                n = self.nodes[i]
                u = next(v for v in n.inputs if self._index[v] < src)
                return (f"more than one tensor enters the segment before {first!r} ({n.name!r} reads {u!r} "
                        f"besides the segment input {self.nodes[src].name!r}); start it at a block boundary "
                        f"(one of the graph's cut points) or where it reads nothing made before its input")
        for i in range(a, b):
            if last_read[i] > b:
                n = self.nodes[i]
                reader = self.nodes[last_read[i]].name
                return (f"more than one tensor leaves the segment after {last!r} ({n.name!r} is read by "
                        f"{reader!r} too); end it at a block boundary (one of the graph's cut points) or "
                        f"where only its last node's output is read after it")
        return None

    def resolve(self, ref: str, end: str = "first") -> str:
        """Node name for a node name or a module path (first/last node inside that module)."""
        if ref in self.by_name:
            return ref
        hits = [n.name for n in self.nodes if n.target == ref and n.kind not in (_ops.INPUT, _ops.OUTPUT)]
        if not hits:
            hits = [n.name for n in self.nodes if n.module == ref or n.module.startswith(ref + ".")
                    or n.target.startswith(ref + ".")]
        if not hits:
            raise UnknownNodeError(f"no node or module named {ref!r} in the graph of {self.model_name or 'the model'}")
        return hits[0] if end == "first" else hits[-1]

    def span(self, first: str, last: str) -> List[Node]:
        i, j = self.index(first), self.index(last)
        if j < i:
            raise CaptureError(f"segment {first}..{last} is reversed: give its first node before its last")
        return self.nodes[i: j + 1]

    # -- totals -------------------------------------------------------------------------
    @property
    def total_saved_bytes(self) -> int:
        return sum(n.saved_bytes for n in self.nodes)

    @property
    def total_flops_fwd(self) -> int:
        return sum(n.flops_fwd for n in self.nodes)

    @property
    def total_flops_bwd(self) -> int:
        return sum(n.flops_bwd for n in self.nodes)

    @property
    def param_bytes(self) -> int:
        return sum(n.param_bytes for n in self.nodes)

    @property
    def grad_bytes(self) -> int:
        """Bytes of the trainable parameters (their gradients, and what an optimizer keeps)."""
        return sum(n.grad_bytes for n in self.nodes)

    def fingerprint(self) -> str:
        """Hash of the graph structure, shapes and dtype (not of the weights)."""
        canon = [(n.name, n.op, n.target, n.inputs, list(n.shape)) for n in self.nodes]
        dtype = self.dtype + (f"+amp:{self.amp}" if self.amp else "")
        blob = json.dumps([list(self.input_shape), dtype, canon], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dataframe(self):
        """Per-layer table as a pandas DataFrame."""
        import pandas as pd

        rows = []
        for n in self.nodes:
            if n.kind in (_ops.INPUT, _ops.OUTPUT):
                continue
            rows.append({
                "name": n.name, "op": n.op, "kind": n.kind, "module": n.target,
                "shape": "x".join(map(str, n.shape)),
                "out_MiB": n.out_bytes / 2**20, "saved_MiB": n.saved_bytes / 2**20,
                "GFLOPs_fwd": n.flops_fwd / 1e9, "GFLOPs_bwd": n.flops_bwd / 1e9,
                "rf": n.receptive_field, "stride": n.cum_stride, "rowwise": n.rowwise,
            })
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# the graph at another batch size

def _affine(va, vb, n: int, a: int):
    """The value at batch ``n`` of a field that is ``va`` at batch ``a`` and ``vb`` at ``a + 1``:
    equal values are kept, integers (and tuples of them, shapes) follow the line through both;
    :data:`_NO_LINE` where the field is neither (then no graph can be derived)."""
    if va == vb:
        return va
    if isinstance(va, int) and isinstance(vb, int) and not isinstance(va, bool) and not isinstance(vb, bool):
        return va + (vb - va) * (n - a)
    if isinstance(va, tuple) and isinstance(vb, tuple) and len(va) == len(vb):
        out = tuple(_affine(x, y, n, a) for x, y in zip(va, vb))
        return _NO_LINE if any(v is _NO_LINE for v in out) else out
    return _NO_LINE


_NO_LINE = object()


_GRAPH_COUNTS = ("buffer_bytes", "saved_input_bytes")  # LayerGraph's totals set by capture()


def graph_at_batch(ga: LayerGraph, gb: LayerGraph, n: int) -> LayerGraph:
    """The layer graph at batch ``n`` from captures of one model at two consecutive batches
    ``ga`` (batch a) and ``gb`` (batch a + 1), without capturing again.

    What a capture records per node is affine in the batch: a tensor's bytes and an op's FLOPs
    grow with its rows of the batch, and what does not belong to a sample (parameters, their
    gradients, optimizer state, BatchNorm statistics, buffers) stays; so every byte, FLOP and
    shape field is ``value(a) + (value(a + 1) - value(a)) * (n - a)``, exactly (tests compare
    such graphs with real captures field by field).  :class:`CaptureError` when the two graphs
    differ otherwise (another structure: no line to follow)."""
    a = int(ga.input_shape[0])
    if int(gb.input_shape[0]) != a + 1 or len(ga.nodes) != len(gb.nodes) or n < 1:
        raise CaptureError(f"cannot derive batch {n} from captures at batches {ga.input_shape[0]} and "
                           f"{gb.input_shape[0]}: give two consecutive batches of one model")
    if (ga.dtype, ga.model_name, ga.training, ga.amp) != (gb.dtype, gb.model_name, gb.training, gb.amp):
        raise CaptureError(f"cannot derive batch {n}: the captures at batches {a} and {a + 1} differ in "
                           f"dtype, model, training mode or autocast")
    ta, tb = getattr(ga, "memory_timeline", None), getattr(gb, "memory_timeline", None)
    if ta is None or tb is None or len(ta) != len(tb) or any(
            la != lb or len(ea) != len(eb) for (la, _, ea), (lb, _, eb) in zip(ta, tb)):
        raise CaptureError(f"cannot derive batch {n} of {ga.model_name or 'the model'}: the steps captured at "
                           f"batches {a} and {a + 1} run different ops; capture at batch {n}")
    # live bytes at every mark and after every op are affine; the peaks between marks are the
    # largest of them, so the profile fields that are peaks are found again from the timeline
    timeline = [(la, _affine(va, vb, n, a), tuple(_affine(x, y, n, a) for x, y in zip(ea, eb)))
                for (la, va, ea), (_, vb, eb) in zip(ta, tb)]
    peaks = _timeline_fields(timeline)
    nodes = []
    for x, y in zip(ga.nodes, gb.nodes):
        changes = {}
        for f in fields(Node):
            va, vb = getattr(x, f.name), getattr(y, f.name)
            v = _affine(va, vb, n, a)
            if v is _NO_LINE:
                raise CaptureError(f"cannot derive batch {n} of {ga.model_name or 'the model'}: node "
                                   f"{x.name}'s {f.name} is {va!r} at batch {a} and {vb!r} at batch {a + 1}")
            if v is not va:
                changes[f.name] = v
        changes.update({k: peaks.get(x.name, {}).get(k, 0) for k in ("fwd_work", "bwd_peak", "bwd_net")})
        nodes.append(replace(x, **changes))
    if set(ga.values) != set(gb.values):
        raise CaptureError(f"cannot derive batch {n} of {ga.model_name or 'the model'}: the captures at batches {a} "
                           f"and {a + 1} read different shape values; capture at batch {n}")
    values = {}
    for k, va in ga.values.items():  # (x.size(0) follows the batch, x.shape[-2:] stays)
        v = _affine(va, gb.values[k], n, a)
        if v is _NO_LINE:
            raise CaptureError(f"cannot derive batch {n} of {ga.model_name or 'the model'}: shape value {k} is "
                               f"{va!r} at batch {a} and {gb.values[k]!r} at batch {a + 1}; capture at batch {n}")
        values[k] = v
    g = LayerGraph(nodes, _affine(ga.input_shape, gb.input_shape, n, a), ga.dtype, ga.model_name,
                   training=ga.training, amp=ga.amp, values=values)
    for k in _GRAPH_COUNTS:
        if hasattr(ga, k):
            setattr(g, k, _affine(getattr(ga, k), getattr(gb, k), n, a))
    g.memory_timeline = timeline
    return g


def same_graph(a: LayerGraph, b: LayerGraph) -> bool:
    """Whether two graphs agree in every field a capture records (nodes, input shape, dtype,
    autocast, shape values, totals and the memory timeline)."""
    keys = ("input_shape", "dtype", "model_name", "training", "amp", "values") + _GRAPH_COUNTS + ("memory_timeline",)
    return a.nodes == b.nodes and all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


class BatchGraphs:
    """One model's layer graph at any batch size from two captures (:func:`graph_at_batch`).

    ``capture_at(n)`` captures the model at batch ``n``; it runs for ``base`` and ``base + 1``
    (``base`` at least 2) and for batch 1 (a real capture refuses what the model refuses there,
    a train-mode BatchNorm over one value per channel), every other batch is derived.
    ``captures`` counts the captures made."""

    def __init__(self, capture_at: Callable[[int], LayerGraph], base: int = 2):
        self._capture_at = capture_at
        self.base = max(2, int(base))
        self._captured: Dict[int, LayerGraph] = {}
        self._graphs: Dict[int, LayerGraph] = {}

    @property
    def captures(self) -> int:
        return len(self._captured)

    def add(self, graph: LayerGraph) -> None:
        """A capture made elsewhere (at its own batch), used as if captured here."""
        self._captured[int(graph.input_shape[0])] = graph

    def captured(self, n: int) -> LayerGraph:
        """A real capture at batch ``n`` (made once)."""
        if n not in self._captured:
            self._captured[n] = self._capture_at(n)
        return self._captured[n]

    def check(self, n: int) -> bool:
        """Whether the graph derived at batch ``n`` equals a real capture there (one capture, which
        is kept)."""
        derived = self(n)
        return derived is self.captured(n) or same_graph(derived, self.captured(n))

    def __call__(self, n: int) -> LayerGraph:
        n = int(n)
        if n in self._captured or n < 2 or n in (self.base, self.base + 1):
            return self.captured(n)
        if n not in self._graphs:
            self._graphs[n] = graph_at_batch(self.captured(self.base), self.captured(self.base + 1), n)
        return self._graphs[n]


# ------------------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """torch.fx's tracer, changed so that tracing never runs the model's own code on its real state
    and a module that keeps state runs its own forward: buffers read by traced code are graph
    inputs (``get_attr``, never written at trace time); every BatchNorm subclass is a leaf (timm's
    ``BatchNormAct2d``: its forward would otherwise advance ``num_batches_tracked`` and freeze its
    momentum factor at trace time); and so is every module in ``stateful``."""

    proxy_buffer_attributes = True

    def __init__(self, stateful=()):
        super().__init__()
        self.stateful = set(stateful)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, nn.modules.batchnorm._BatchNorm) or qualname in self.stateful
                or super().is_leaf_module(m, qualname))


def _buffer_writers(graph: fx.Graph, buffers: set) -> set:
    """Owners (module paths) of the buffers the traced ``graph`` writes in place: an in-place
    tensor method or function (``add_``, ``copy_``, ...) applied to a ``get_attr`` of a buffer.
    Traced code loses ``torch.no_grad()`` blocks and the like, so such a module is traced again
    as a leaf: its own forward keeps its own semantics."""
    owners = set()
    for n in graph.nodes:
        if n.op == "get_attr" and n.target in buffers:
            for u in n.users:
                name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
                if u.op in ("call_method", "call_function") and isinstance(name, str) and name.endswith("_") \
                        and not name.startswith("__") and u.args and u.args[0] is n:
                    owners.add(str(n.target).rpartition(".")[0])
    return owners


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (stock nn layers, BatchNorm subclasses and modules that write
    their own buffers stay leaf modules; the model's parameters and buffers are never written)."""
    try:
        buffers = {k for k, _ in model.named_buffers()}
        stateful: set = set()
        while True:
            tracer = _Tracer(stateful)
            graph = tracer.trace(model)
            writers = _buffer_writers(graph, buffers) - stateful
            if not writers:
                break
            if "" in writers:
                raise CaptureError(f"{type(model).__name__}.forward writes one of its own buffers in place; "
                                   f"lrcnn runs such state updates only inside a submodule: move the update "
                                   f"into a module of its own")
            stateful |= writers
    except LrcnnError:  # CaptureError above, or one from lrcnn code the model runs: already one line
        raise
    except Exception as e:  # torch.fx raises many types
        raise CaptureError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); lrcnn needs an fx-traceable model") from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _read_overwritten(gm)
    return gm


def _read_overwritten(gm: fx.GraphModule) -> None:
    """After a node that overwrites its first argument in place (``y.add_(x)``, ``F.relu_(y)``, an
    ``inplace=True`` activation), nodes that read that argument read the node instead: the same
    tensor when the graph runs as the model does, and the overwritten value when an executor runs
    the op out of place (row strips, recomputation: ``models.ops.out_of_place_call``).  fx records
    ``y.add_(x); return y`` as an ``add_`` node nobody reads and an output that reads ``y``."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for n in gm.graph.nodes:
        mod = modules.get(n.target) if n.op == "call_module" else None
        if not n.args or not isinstance(n.args[0], fx.Node) or not _ops.overwrites_input(n.op, n.target, n.kwargs, mod):
            continue
        y = n.args[0]
        for user in list(y.users):
            if order[user] > order[n]:
                user.replace_input_with(y, n)
                changed = True
    if changed:
        gm.recompile()


def fetch_attr(root: nn.Module, target: str):
    """The object a ``get_attr`` node reads: ``root`` followed along the dotted ``target``."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensor_args(n: fx.Node) -> List[str]:
    out: List[str] = []

    def visit(a):
        if isinstance(a, fx.Node):
            if a.name not in out:
                out.append(a.name)
        return a

    fx.node.map_aggregate(n.args, visit)
    fx.node.map_aggregate(n.kwargs, visit)
    return out


# ------------------------------------------------------------------------------------------------
# shape values: what a traced model computes from its tensors' shapes, not their contents

#: reads of a tensor that see its shape only: ``getattr(x, "shape")``, ``x.size(2)``, ``len(x)``, ...
_SHAPE_ATTRS = frozenset({"shape", "ndim"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement"})
_VALUE_LEAVES = (int, float, bool)


def _reads_shape_of(n: fx.Node, a: fx.Node) -> bool:
    """Whether node ``n`` reads tensor ``a`` for its shape only (``a`` is the object of a shape
    attribute, a shape method or ``len``, and no other argument of ``n``)."""
    if not n.args or n.args[0] is not a:
        return False
    others: List[fx.Node] = []
    fx.node.map_arg((n.args[1:], n.kwargs), others.append)
    if a in others:
        return False
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    if n.target is getattr:
        return len(n.args) == 2 and n.args[1] in _SHAPE_ATTRS
    return n.target is len and len(n.args) == 1


def is_shape_value(n: fx.Node, out, values) -> bool:
    """Whether fx node ``n``, which computed ``out``, is a shape value: a call that makes no
    tensor, only numbers (an int, a ``torch.Size``, a tuple of them), from the shapes of tensors
    (:func:`_reads_shape_of`) and from other shape values (``values``: their names).  Its value is
    fixed by the model's input shape, whatever the tensors hold."""
    if n.op not in ("call_function", "call_method") or out is None:
        return False
    if not all(isinstance(v, _VALUE_LEAVES) for v in tree_flatten(out)[0]):
        return False
    return all(a.name in values or _reads_shape_of(n, a) for a in n.all_input_nodes)


def _plain_value(v):
    """A shape value as a plain Python constant (a ``torch.Size`` as a tuple)."""
    return tuple(v) if isinstance(v, torch.Size) else v


def read_values(graph: fx.Graph, values: Dict[str, object]) -> Dict[str, object]:
    """The shape values (``values``: node name -> value) that a node other than a shape value
    reads: what :func:`fold_values` puts into ``graph`` (``x.shape[-2:]`` of ``x.shape``)."""
    return {a.name: values[a.name] for n in graph.nodes if n.name not in values
            for a in n.all_input_nodes if a.name in values}


def fold_values(graph: fx.Graph, values: Dict[str, object]) -> fx.Graph:
    """A copy of ``graph`` without its shape value nodes (``values``: node name -> value, as
    :attr:`LayerGraph.values` holds them for one input shape): each node that read one reads the
    constant instead.  The remaining nodes keep their names and order, which are those of the
    :class:`LayerGraph` captured at that input shape."""
    g = fx.Graph()
    env: Dict[fx.Node, object] = {}
    for n in graph.nodes:
        env[n] = values[n.name] if n.name in values else g.node_copy(n, lambda a: env[a])
    return g


def shape_values(gm: fx.GraphModule, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Dict[str, object]:
    """The shape values (:func:`is_shape_value`) of traced model ``gm`` at another input shape:
    one forward under ``FakeTensorMode`` (no real memory, no gradient, no state written), what
    an executor folds for a batch of a shape its plan was not captured at."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    state = _fake_state(gm, fake_mode, dtype)
    values: Dict[str, object] = {}

    class _Interp(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if is_shape_value(n, out, values):
                values[n.name] = _plain_value(out)
            return out

    with _cumulative_bn_momentum(gm), fake_mode, torch.no_grad():
        x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
        functional_call(_Runner(gm, _Interp), {"g." + k: v for k, v in state.items()}, (x,), strict=False)
    return values


def _fake_state(gm: fx.GraphModule, fake_mode, dtype: torch.dtype, autocast: Optional[torch.dtype] = None):
    """Fake copies of ``gm``'s parameters and buffers (floating ones in ``dtype``; on the meta device,
    or under ``autocast`` on the CPU, where CPU autocast applies), parameters with their
    ``requires_grad``."""
    state = {}
    for k, v in list(gm.named_parameters()) + list(gm.named_buffers()):
        mv = v.detach().to("meta")
        if mv.is_floating_point():
            mv = mv.to(dtype)
        if autocast is None:
            fv = fake_mode.from_tensor(mv)
        else:
            with fake_mode:
                fv = torch.empty_strided(mv.shape, mv.stride(), dtype=mv.dtype, device="cpu")
        if isinstance(v, nn.Parameter):
            fv.requires_grad_(v.requires_grad)
        state[k] = fv
    return state


@contextlib.contextmanager
def _cumulative_bn_momentum(gm: nn.Module) -> Iterator[None]:
    """BN with momentum=None reads float(num_batches_tracked), which fake tensors cannot answer;
    the momentum changes no shape and the fake running statistics are thrown away: momentum 0
    while a fake forward runs."""
    cumulative = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None]
    for m in cumulative:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m in cumulative:
            m.momentum = None


def _owner(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if stack:
        vals = list(stack.values())
        path = vals[-1][0] if isinstance(vals[-1], tuple) else str(vals[-1])
        return path
    if n.op == "call_module":
        return str(n.target).rsplit(".", 1)[0] if "." in str(n.target) else ""
    return ""


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Runner(nn.Module):
    """Runs a traced graph through an ``fx.Interpreter`` subclass (so ``functional_call`` can
    substitute fake parameters)."""

    def __init__(self, g: fx.GraphModule, interp):
        super().__init__()
        self.g = g
        self.interp = interp

    def forward(self, x):
        return self.interp(self.g).run(x)


def _memory_profile(gm: fx.GraphModule, fake_mode, state: Dict[str, torch.Tensor], input_shape, dtype,
                    param_keys: set, autocast: Optional[torch.dtype] = None) -> Dict[str, dict]:
    """Per-node memory events of one plain training step (forward, loss, backward), simulated.

    Runs the traced graph under ``fake_mode`` with storage accounting (the same tracker the
    executor's measurements use): marks before and after every node in forward, and a pre-hook
    on each node's gradient function in backward, so each node's allocations are attributed to it.
    The input batch does not require grad (as in training).  With ``autocast`` the forward and
    the loss run under CPU autocast in that dtype, the backward after it (as users write it).
    Returns the Node profile fields.
    """
    from torch.func import functional_call

    prof: Dict[str, dict] = {}
    # storage key -> (node whose output it is, weak reference to that storage): a key is the
    # StorageImpl's address, which a later storage reuses once this one is freed, so an entry
    # counts only while its storage lives (else a saved temporary made at a reused address would
    # be taken for an old node's output, depending on the allocator's history)
    producer: Dict[int, Tuple[str, weakref.ref]] = {}

    def producer_of(t: torch.Tensor) -> Optional[str]:
        hit = producer.get(_storage_key(t))
        return hit[0] if hit is not None and hit[1]() is not None else None

    def set_producer(t: torch.Tensor, name: str) -> None:
        producer[_storage_key(t)] = (name, weakref.ref(t.untyped_storage()))
    seen: set = set()
    current = {"node": None}
    hooked: set = set()
    tracker = _SpanTracker()

    def rec(name):
        return prof.setdefault(name, {"alias": False, "saves": [], "also_saves": [], "extra_saved": 0,
                                      "extra_fixed": 0, "extra_input": 0, "fwd_work": 0, "bwd_peak": 0,
                                      "bwd_net": 0})

    def pack(t):
        key = _storage_key(t)
        if key in param_keys:
            return t
        if key in seen:
            r = rec(current["node"])
            prod = producer_of(t)
            if prod not in (None, "__input__") and prod not in r["saves"] and prod not in r["also_saves"]:
                r["also_saves"].append(prod)
            return t
        seen.add(key)
        r = rec(current["node"])
        prod = producer_of(t)
        if prod is None:
            r["extra_saved"] += t.untyped_storage().nbytes()
            if autocast is not None and tuple(t.shape) in current["param_shapes"]:
                r["extra_fixed"] += t.untyped_storage().nbytes()  # a cast copy of a parameter
            elif autocast is not None and tuple(t.shape) in current["input_shapes"]:
                r["extra_input"] += t.untyped_storage().nbytes()  # a cast copy of an input
        elif prod != "__input__" and prod not in r["saves"]:
            r["saves"].append(prod)
        return t

    def hook_for(name):
        def pre(grad_outputs):
            tracker.mark(("bwd", name))
        return pre

    class _Interp(fx.Interpreter):
        def run_node(self, n):
            current["node"] = n.name
            current["param_shapes"] = ({tuple(p.shape) for p in gm.get_submodule(n.target).parameters()}
                                       if n.op == "call_module" else set())
            in_tensors = [a for a in tree_flatten([self.env.get(u) for u in n.all_input_nodes])[0]
                          if isinstance(a, torch.Tensor)]
            ins = {_storage_key(a) for a in in_tensors}
            current["input_shapes"] = {tuple(a.shape) for a in in_tensors}
            tracker.mark(("pre", n.name))
            out = super().run_node(n)
            tracker.mark(("post", n.name))
            if isinstance(out, torch.Tensor):
                key = _storage_key(out)
                r = rec(n.name)
                r["alias"] = key in ins
                if not r["alias"]:
                    set_producer(out, n.name)
                fn = out.grad_fn
                if fn is not None and fn not in hooked and n.op != "placeholder":
                    hooked.add(fn)
                    fn.register_prehook(hook_for(n.name))
            return out

    runner = _Runner(gm, _Interp)
    device = "meta" if autocast is None else "cpu"
    with fake_mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        x = torch.empty(input_shape, dtype=dtype, device=device)
        set_producer(x, "__input__")
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = logits_of(functional_call(runner, {"g." + k: v for k, v in state.items()}, (x,), strict=False))
            if out.requires_grad:
                current["node"] = "output"
                if out.dim() >= 2:  # the step's loss: cross-entropy, per pixel for dense logits
                    y = synthetic_target(out.shape, device=out.device)
                    set_producer(y, "__input__")  # the batch's labels: made before the step, not by the loss
                    loss = _cross_entropy(out, y)
                else:
                    loss = out.sum()
        if out.requires_grad:
            tracker.mark(("bwd", "output"))
            loss.backward()
            tracker.mark(("end", ""))
            del loss
        del out
    timeline = [(label, live, tuple(ev)) for (label, live, _), ev in zip(tracker.timeline, tracker.spans)]
    for name, fields_ in _timeline_fields(timeline).items():
        rec(name).update(fields_)
    return prof, timeline


def _timeline_fields(timeline) -> Dict[str, Dict[str, int]]:
    """The profile fields the memory timeline of a step gives (``fwd_work``, ``bwd_peak``,
    ``bwd_net`` per node).  ``timeline``: per mark ``((kind, node), live bytes, live bytes after
    each op since the previous mark)``; the peak between two marks is the largest of the first
    mark's live bytes and those (what the tracker's running peak is)."""
    out: Dict[str, Dict[str, int]] = {}
    peak = [live for _, live, _ in timeline]
    for i in range(1, len(timeline)):
        peak[i] = max([timeline[i - 1][1], *timeline[i][2]])
    for i, ((kind, name), live, _) in enumerate(timeline):
        if kind == "post":
            out.setdefault(name, {"bwd_peak": 0, "bwd_net": 0})["fwd_work"] = max(0, peak[i] - live)
        elif kind == "bwd" and i + 1 < len(timeline):
            r = out.setdefault(name, {"bwd_peak": 0, "bwd_net": 0})
            r["bwd_peak"] += max(0, peak[i + 1] - live)
            r["bwd_net"] += timeline[i + 1][1] - live
    return out


class _SpanTracker(StorageTracker):
    """:class:`StorageTracker` that also keeps the live bytes after every op, per span between
    marks (``spans[i]``: the ops before mark ``i``): a step's peaks at another batch size follow
    from them (each is affine in the batch, a peak the largest of them)."""

    def __init__(self):
        super().__init__()
        self.spans: List[List[int]] = []
        self._span: List[int] = []

    def _record(self, label, live: int, since_mark: int) -> None:
        super()._record(label, live, since_mark)
        self.spans.append(self._span)
        self._span = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self._span.append(self.live)
        return out


# torch's messages for a map too small for a kernel, a pooling or a padding (the input's H or W)
_TOO_SMALL = ("output size is too small", "kernel size can't be greater", "calculated padded input size",
              "padding size should be less than", "input and output sizes should be greater than 0",
              "non-positive", "negative dimension")


def _failure_hint(msg: str, where: Optional[str], gm: fx.GraphModule, input_shape: Tuple[int, ...],
                  name: str) -> str:
    """What to do about a capture that failed at node ``where`` with torch's message ``msg``: the
    advice that matches the cause (only a map too small for the network asks for a larger input)."""
    low = msg.lower()
    node = next((n for n in gm.graph.nodes if n.name == where), None)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shape = ", ".join(map(str, input_shape))
    runs = f"check that the model runs on such a tensor: model(torch.randn({shape}))"
    if "more than 1 value per channel" in low:
        return "use a batch of 2 or more, or BN in eval mode"
    if node is not None and node.op == "placeholder" and inputs and node is not inputs[0]:
        args = ", ".join(n.target for n in inputs)
        return (f"{name}.forward takes {len(inputs)} inputs ({args}); lrcnn plans a model of one input tensor "
                f"(N, C, H, W): wrap it in a module whose forward takes one tensor and makes the others")
    m = next(iter(_re.findall(r"to have (\d+) channels, but got (\d+) channels", msg)), None)
    if m:
        want, got = int(m[0]), int(m[1])
        if node is not None and any(a.op == "placeholder" for a in node.all_input_nodes) and got == input_shape[1]:
            return (f"{name} takes {want} input channel(s) and the input shape has {got}: give an input shape "
                    f"({input_shape[0]}, {want}, H, W)")
        return (f"a layer takes {want} channels where the one before it makes {got}: the model's layers do not fit "
                f"together; {runs}")
    if any(t in low for t in _TOO_SMALL):
        return "use a larger --resolution"
    if "sizes of tensors must match" in low:
        return ("a concatenation joins maps of different sizes: a network that halves its map n times and "
                "doubles it back (a U-Net) needs H and W a multiple of 2^n (16 for the zoo's unet)")
    if "mat1 and mat2" in low or "same reduction dim" in low:
        return ("a Linear layer takes a fixed number of features, which a Flatten before it ties to H and W: use the "
                "input size the model was built for, or an adaptive pooling before the Flatten")
    return runs


def capture(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
            model_name: str = "", gm: Optional[fx.GraphModule] = None, amp: Optional[str] = None) -> LayerGraph:
    """Capture ``model`` at ``input_shape`` (N, C, H, W) into a :class:`LayerGraph`.

    No real memory is allocated for activations: the traced graph runs once under
    ``FakeTensorMode`` with autograd enabled.  The model's train/eval mode is respected (it
    decides, for instance, what BatchNorm saves).  ``model`` may live on the meta device.
    ``amp`` (``"bf16"`` or ``"fp16"``, float32 ``dtype``): capture mixed precision as it runs, the
    forward under ``torch.autocast`` in that dtype, so every node's output and saved bytes are
    those autocast gives (convolutions and linear layers in half precision, what follows them in
    their output's dtype, losses in float32).  Fake tensors then live on the CPU device, whose
    autocast rules are the ones applied; for the convolution, linear, norm, pooling and pointwise
    ops of a CNN, CUDA's autocast casts the same ops to the same dtypes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 4 or any(s < 1 for s in input_shape):
        raise CaptureError(f"input shape {input_shape} must be (N, C, H, W) with positive sizes")
    autocast = amp_dtype(amp, dtype)
    gm = gm if gm is not None else trace(model)
    modules = dict(gm.named_modules())
    esize = torch.empty((), dtype=dtype, device="meta").element_size()

    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    device = "meta" if autocast is None else "cpu"  # (autocast applies to CPU tensors, fake or not)
    state = _fake_state(gm, fake_mode, dtype, autocast)
    param_keys = {_storage_key(v) for v in state.values()}

    records: Dict[str, dict] = {}
    values: Dict[str, object] = {}  # the shape values (is_shape_value), by node
    seen_storages: Dict[int, str] = {}
    current = {"node": None}
    input_key: set = set()

    def pack(t):
        key = _storage_key(t)
        if key in param_keys or key in seen_storages:
            return t
        seen_storages[key] = current["node"]
        rec = records.setdefault(current["node"], {"saved": 0})
        nbytes = t.untyped_storage().nbytes()
        if key in input_key:
            rec["saved_input"] = rec.get("saved_input", 0) + nbytes
        else:
            rec["saved"] += nbytes
        return t

    class _Interp(fx.Interpreter):
        def run_node(self, n):
            current["node"] = n.name
            out = super().run_node(n)
            rec = records.setdefault(n.name, {"saved": 0})
            if isinstance(out, torch.Tensor):
                rec["shape"] = tuple(out.shape)
                rec["bytes"] = out.numel() * out.element_size()
            elif n.op == "output":  # what the loss reads: the output tensor, a dict's "out" entry
                rec["shape"] = tuple(logits_of(out).shape)
            elif is_shape_value(n, out, values):
                values[n.name] = _plain_value(out)
            return out

    from torch.func import functional_call

    runner = _Runner(gm, _Interp)
    import logging

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a too-small input is reported below, in one line
    try:
        with _cumulative_bn_momentum(gm), fake_mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            x = torch.empty(input_shape, dtype=dtype, device=device).requires_grad_(True)
            input_key.add(_storage_key(x))
            functional_call(runner, {"g." + k: v for k, v in state.items()}, (x,), strict=False)
        with _cumulative_bn_momentum(gm):
            profile, timeline = _memory_profile(gm, fake_mode, state, input_shape, dtype, param_keys, autocast)
    except LrcnnError:  # lrcnn code the model runs refused something: its own message names the fix
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = current["node"]
        hint = _failure_hint(msg, where, gm, input_shape, model_name or type(model).__name__)
        raise CaptureError(f"input shape {'x'.join(map(str, input_shape))} does not fit "
                           f"{model_name or type(model).__name__} (at node {where}: {msg}); {hint}") from None
    finally:
        fake_log.setLevel(level)

    nodes: List[Node] = []
    nodes_by: Dict[str, Node] = {}
    for n in gm.graph.nodes:
        if n.name in values:  # a number, folded into its readers: no node, no live tensor
            continue
        rec = records.get(n.name, {})
        shape = tuple(rec.get("shape", ()))
        ins = [u for u in _tensor_args(n) if u not in values]
        in_shapes = [nodes_by[u].shape for u in ins if u in nodes_by]
        mod = None
        if n.op == "placeholder":
            info = _ops.OpInfo("input", _ops.INPUT, IDENTITY, True)
            target = "input"
        elif n.op == "output":
            info = _ops.OpInfo("output", _ops.OUTPUT, None, False, "graph output")
            target = "output"
            shape = tuple(rec["shape"]) if "shape" in rec else (nodes[-1].shape if nodes else ())
        elif n.op == "call_module":
            mod = modules[n.target]
            info = _ops.classify_module(mod)
            target = str(n.target)
        elif n.op in ("call_function", "call_method"):
            info = _ops.classify_function(n.target, n.args, n.kwargs)
            target = getattr(n.target, "__name__", str(n.target))
        else:  # get_attr
            info = _ops.OpInfo("get_attr", _ops.GLOBAL, None, False, "attribute access")
            target = str(n.target)
        if n.op in ("call_module", "call_function", "call_method"):  # (shapes: a size given at the call)
            info = _ops.refine(info, in_shapes, shape, extra_inputs=n.op == "call_module" and (len(n.args) > 1
                                                                                             or bool(n.kwargs)))
        rowwise, reason, geom = info.rowwise, info.reason, info.geom
        # Row-local only between maps of equal height (no broadcasting of global vectors).
        if info.kind in (_ops.JOIN, _ops.POINTWISE, _ops.NORM, _ops.SPATIAL) and rowwise:
            if len(shape) != 4 or any(len(s) != 4 for s in in_shapes):
                rowwise, reason = False, "not a 4-D feature map"
            elif info.kind != _ops.SPATIAL and any(s[2] != shape[2] for s in in_shapes):
                rowwise, reason, geom = False, "broadcasts a global value over rows", None
        fl = _ops.flops(info.op, mod, in_shapes, shape) if n.op not in ("placeholder", "output") else (0, 0)
        # the parameters the node reads: its module's (a parametrization's originals included),
        # or the one a get_attr node reads; frozen ones (requires_grad False) get no gradient
        params = list(mod.parameters()) if mod is not None else []
        if n.op == "get_attr" and isinstance(fetch_attr(gm, str(n.target)), nn.Parameter):
            params = [fetch_attr(gm, str(n.target))]
        pbytes = sum(p.numel() for p in params) * esize
        gbytes = sum(p.numel() for p in params if p.requires_grad) * esize
        node = Node(
            name=n.name, op=info.op, kind=info.kind, target=target, module=_owner(n), inputs=ins,
            shape=shape, out_bytes=int(rec.get("bytes", 0)) if n.op != "output" else 0,
            saved_bytes=int(rec.get("saved", 0)), flops_fwd=int(fl[0]), flops_bwd=int(fl[1]),
            geom=geom, rowwise=rowwise, reason=reason, param_bytes=int(pbytes), grad_bytes=int(gbytes),
            groups=int(getattr(mod, "groups", 1)) if info.op in ("conv2d", "conv_transpose2d") else 1,
            param_tensors=len(params),
            batch_stats=bool(isinstance(mod, nn.modules.batchnorm._BatchNorm)
                             and (mod.training or not mod.track_running_stats)),
            **profile.get(n.name, {}),
        )
        node.needs_grad = n.op != "placeholder" and (gbytes > 0 or any(nodes_by[u].needs_grad for u in ins
                                                                          if u in nodes_by))
        nodes.append(node)
        nodes_by[node.name] = node

    graph = LayerGraph(nodes, input_shape, _dtype_name(dtype), model_name or type(model).__name__,
                       training=model.training, amp=amp, values=values)
    rg = graph.row_graph()
    cs = cumulative_strides(rg)
    rf = receptive_fields(rg)
    beyond: set = set()  # nodes at or after a global op: they see the whole input
    for node in graph.nodes:
        if node.geom is None or any(u in beyond for u in node.inputs):
            beyond.add(node.name)
            node.receptive_field = input_shape[2]
            node.cum_stride = max((graph[u].cum_stride for u in node.inputs), default=1)
        else:  # (a whole number of rows, or a fraction of one after up-sampling)
            c = cs.get(node.name, 1)
            node.cum_stride = int(c) if c == int(c) else float(c)
            node.receptive_field = min(rf.get(node.name, 1), input_shape[2] + 2 * 10**6)
    graph.buffer_bytes = sum(b.numel() * (esize if b.is_floating_point() else b.element_size())
                             for b in gm.buffers())
    graph.saved_input_bytes = sum(r.get("saved_input", 0) for r in records.values())
    graph.memory_timeline = timeline  # (graph_at_batch derives the peaks at other batches from it)
    return graph


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Silence torch's fake-tensor logger, which logs a full traceback when a meta kernel rejects
    a shape (e.g. a resolution too small for the network); the CLI reports that as one line."""
    names = ("torch._subclasses.fake_tensor",)
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, lvl in saved:
            lg.setLevel(lvl)


def build_and_capture(name: str, batch: int, resolution: Optional[Tuple[int, int]] = None,
                      dtype: str = "float32", bn: str = "train", weights: Optional[str] = None,
                      num_classes: Optional[int] = None, real: bool = False, amp: Optional[str] = None):
    """Build a zoo model and capture it (under autocast with ``amp``).  Returns ``(model, graph)``.

    The model lives on the meta device unless ``weights`` is given or ``real`` (then on the CPU
    in ``dtype``, random weights unless ``weights``).  The model is in training mode with
    BatchNorm in ``bn`` mode (:func:`lrcnn.models.set_bn_mode`).
    """
    tdtype = parse_dtype(dtype)
    model = get_model(name, num_classes=num_classes, weights=weights,
                      device=None if (weights is not None or real) else "meta").to(tdtype)
    set_bn_mode(model, bn)
    if resolution is None:
        r = default_resolution(name)
        resolution = (r, r)
    h, w = resolution
    with quiet_torch_logs():
        graph = capture(model, (batch, 3, h, w), tdtype, model_name=name, amp=amp)
    return model, graph
