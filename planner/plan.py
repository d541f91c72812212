"""The plan format: one JSON document that says how to train a model (``lrcnn.plan/1``).

A plan is an ordered list of segments over the captured graph.  Each segment is a contiguous run
of nodes ``first..last`` that reads one tensor made before it, its *input* (the output of the node
just before ``first``), and of whose tensors only ``last``'s output is read after it
(:meth:`~lrcnn.models.capture.LayerGraph.segment_refusal`).  Older tensors, and the input itself,
may *pass over* a segment: made before it and read after it (LR-ASPP's stride-8 feature over the
stride-16 backbone, a U-Net skip over the levels below it, a residual block's identity over its
branch); they stay live in the executor while the segment runs, in forward and backward, and
their gradients (made by the later readers' backward) live through the segment's backward.
Segments between two cut points (places where one tensor alone crosses) are always legal.  The
planner's units split only a run that holds most of the step's saved bytes at such places
(``planner.cost.CostModel.units``).  Each segment has a mode:

* ``store``      plain autograd; optionally a ``recompute`` set of cheap nodes (activations, BN, add:
                 ``models.ops.recomputable``) whose outputs are dropped after forward and recomputed
                 when backward needs them;
* ``checkpoint`` keep only the segment input, recompute the segment in backward;
* ``rows``       row-centric: run in horizontal strips (``policy`` ``2ps`` or ``overl``), either
                 ``strips`` (a count, split evenly) or explicit ``bounds``.  OverL strips split the
                 segment's *output* rows (each strip recomputes its halo); 2PS strips split the
                 segment's *input* rows (each strip reads that band and every layer advances as
                 far as it can, carrying the few rows the next strip shares).  ``options.bn``:
                 how training-mode BatchNorm statistics are found: ``"sweeps"`` (default; one
                 strip pass per BN level) or ``"layerwise"`` (one full-map pass); see
                 ``planner.cost.CostModel.bn_cost`` for what each costs.

Nodes not covered by any segment run as ``store``.  ``training`` says how the step runs:
``optimizer``, ``bn`` (BatchNorm mode), ``num_classes``, ``world_size`` and ``amp`` (``"bf16"`` or
``"fp16"``: captured, priced and run under ``torch.autocast`` in that dtype over float32
parameters; absent: no autocast) and ``amp_rows`` (true: row segments may be trained under
autocast, accepting gradients that differ from plain autocast at half-precision rounding; else
``apply_plan`` refuses that) and ``loss_in_rows`` (true: a dense model's per-pixel loss is
evaluated inside the last segment, a rows segment ending at the logits, strip by strip:
``apply_plan(model, plan, loss=pixel_cross_entropy)`` and ``m(x, target)``; the cost model prices
the step without the full logits, their gradient and the loss's log-softmax map).  Hand-written
plans are made with
:meth:`Plan.build`::

    plan = Plan.build(graph, [
        Segment("conv1", "layer2", "rows", policy="2ps", strips=8),
        Segment("layer3", "layer4", "checkpoint"),
    ])
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Dict, List, Optional, Sequence

from lrcnn.errors import LrcnnError
from lrcnn.models.capture import AMP_DTYPES as _AMP, build_and_capture
from lrcnn.models.geometry import check_bounds
from lrcnn.models.zoo import BN_MODES, DTYPES, list_models
from lrcnn.planner.files import check_input_file, write_json_atomic

SCHEMA = "lrcnn.plan/1"
MODES = ("store", "checkpoint", "rows")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")  # training.optimizer: what the cost model prices and run builds
AMP_DTYPES = tuple(_AMP)  # training.amp: the autocast dtypes capture knows
POLICIES = ("2ps", "overl")
BN_STRATEGIES = ("sweeps", "layerwise")  # rows options.bn: how training-mode BN statistics are found


class PlanError(LrcnnError, ValueError):
    """A plan that cannot be used as is; the message says what does not match and what to do."""


@dataclass
class Segment:
    """One segment of a plan (node names, or module paths when building by hand)."""

    first: str
    last: str
    mode: str = "store"
    policy: Optional[str] = None        # rows: "2ps" | "overl"
    strips: Optional[int] = None        # rows: strip count (even split of the output rows)
    bounds: Optional[List[int]] = None  # rows: explicit strip bounds on the output rows
    recompute: List[str] = field(default_factory=list)  # store/checkpoint: nodes to recompute
    options: Dict[str, Any] = field(default_factory=dict)  # mode-specific extras (e.g. BN strategy)

    def validate_fields(self, where: str = "") -> None:
        w = f"{where}: " if where else ""
        if self.mode not in MODES:
            raise PlanError(f"{w}mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "rows":
            if self.policy not in POLICIES:
                raise PlanError(f"{w}rows segment needs policy '2ps' or 'overl', got {self.policy!r}")
            if self.strips is None and not self.bounds:
                raise PlanError(f"{w}rows segment needs 'strips' (a count) or 'bounds'")
            if self.strips is not None and (not isinstance(self.strips, int) or isinstance(self.strips, bool)
                                            or self.strips < 1):
                raise PlanError(f"{w}strips must be a positive integer, got {self.strips!r}")
        elif self.policy is not None or self.strips is not None or self.bounds:
            raise PlanError(f"{w}policy/strips/bounds are only meaningful for rows segments")
        if not isinstance(self.options, dict):
            raise PlanError(f"{w}options must be an object, got {type(self.options).__name__}")
        if not isinstance(self.recompute, list) or not all(isinstance(r, str) for r in self.recompute):
            raise PlanError(f"{w}recompute must be a list of node names, got {self.recompute!r}")
        if self.bounds is not None and (not isinstance(self.bounds, list) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in self.bounds)):
            raise PlanError(f"{w}bounds must be a list of row indices, got {self.bounds!r}")
        if "bn" in self.options:
            if self.mode != "rows":
                raise PlanError(f"{w}options.bn (training-mode BatchNorm strategy) is only meaningful for rows segments")
            if self.options["bn"] not in BN_STRATEGIES:
                raise PlanError(f"{w}options.bn {self.options['bn']!r} is not one of {', '.join(BN_STRATEGIES)} "
                                f"(training-mode BatchNorm statistics: strip sweeps, or one layer-wise pass)")

    def to_dict(self) -> dict:
        d = {"first": self.first, "last": self.last, "mode": self.mode}
        for k in ("policy", "strips", "bounds", "recompute", "options"):
            v = getattr(self, k)
            if v not in (None, [], {}):
                d[k] = list(v) if isinstance(v, list) else (dict(v) if isinstance(v, dict) else v)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "Segment":
        known = {"first", "last", "mode", "policy", "strips", "bounds", "recompute", "options"}
        extra = set(d) - known
        if extra:
            raise PlanError(f"{where}: unknown segment field(s) {sorted(extra)}")
        if "first" not in d or "last" not in d:
            raise PlanError(f"{where}: a segment needs 'first' and 'last' node names")
        seg = cls(**{k: d[k] for k in known if k in d})
        seg.validate_fields(where)
        return seg


@dataclass
class Plan:
    """A training plan for one model at one input shape."""

    model: str
    fingerprint: str
    input_shape: List[int]
    dtype: str = "float32"
    training: Dict[str, Any] = field(default_factory=lambda: {"optimizer": "sgd", "bn": "eval"})
    budget_bytes: Optional[int] = None
    segments: List[Segment] = field(default_factory=list)
    predicted: Dict[str, Any] = field(default_factory=dict)
    solver: Dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, graph, segments: Sequence[Segment], model: Optional[str] = None,
              training: Optional[Dict[str, Any]] = None, budget_bytes: Optional[int] = None) -> "Plan":
        """A hand-written plan: segments may name nodes or module paths (resolved here)."""
        segs = []
        for i, s in enumerate(segments):
            try:
                first = graph.resolve(s.first, "first")
                last = graph.resolve(s.last, "last")
            except KeyError as e:
                raise PlanError(f"segment {i}: {e.args[0]}") from None
            segs.append(Segment(first, last, s.mode, s.policy, s.strips,
                                list(s.bounds) if s.bounds else None, list(s.recompute), dict(s.options)))
        train = dict(training or {"optimizer": "sgd", "bn": "train" if graph.training else "eval"})
        if getattr(graph, "amp", None):
            train["amp"] = graph.amp  # mixed precision the graph was captured (and priced) under
        out_shape = graph.output_node.shape
        if len(out_shape) in (2, 4):  # classifier, dense model: the model is rebuilt with this many classes
            train.setdefault("num_classes", int(out_shape[1]))
        plan = cls(model=model or graph.model_name, fingerprint=graph.fingerprint(),
                   input_shape=list(graph.input_shape), dtype=graph.dtype,
                   training=train, budget_bytes=budget_bytes, segments=segs)
        plan.validate(graph)
        return plan

    # -- validation ---------------------------------------------------------------------------
    def validate(self, graph) -> None:
        """Check the plan against a captured graph; PlanError says exactly what does not match."""
        if self.schema != SCHEMA:
            raise PlanError(f"plan schema {self.schema!r} is not {SCHEMA!r}; re-create the plan with this version of lrcnn")
        if list(graph.input_shape) != list(self.input_shape) or graph.dtype != self.dtype:
            raise PlanError(f"plan is for input {tuple(self.input_shape)} {self.dtype}, the model was captured at "
                            f"{tuple(graph.input_shape)} {graph.dtype}")
        amp, captured = self.training.get("amp"), getattr(graph, "amp", None)
        if amp != captured:
            raise PlanError(f"plan is for {'--amp ' + amp if amp else 'no autocast'}, the model was captured "
                            f"{'under --amp ' + captured if captured else 'without autocast'}: capture and "
                            f"apply it with the plan's amp (apply_plan does), or solve again")
        fp = graph.fingerprint()
        if fp != self.fingerprint:
            raise PlanError(f"plan fingerprint {self.fingerprint} does not match the model's graph ({fp}): "
                            f"the plan was made for a different model or input shape; re-run 'planner solve'")
        prev_end = -1
        for i, s in enumerate(self.segments):
            where = f"segment {i} ({s.first}..{s.last})"
            s.validate_fields(where)
            for ref in (s.first, s.last):
                if ref not in graph.by_name:
                    raise PlanError(f"{where}: node {ref!r} is not in the graph")
            a, b = graph.index(s.first), graph.index(s.last)
            if b < a:
                raise PlanError(f"{where}: first node comes after last node")
            if a <= prev_end:
                raise PlanError(f"{where}: overlaps the previous segment")
            prev_end = b
            if graph.nodes[a].kind in ("input", "output") or graph.nodes[b].kind == "output":
                raise PlanError(f"{where}: segments cover model nodes, not the graph input/output")
            why = graph.segment_refusal(s.first, s.last)
            if why:
                raise PlanError(f"{where}: {why}")
            if s.mode == "rows":
                self._check_strips(graph, s, where)
            for r in s.recompute:
                if r not in graph.by_name or not (a <= graph.index(r) <= b):
                    raise PlanError(f"{where}: recompute node {r!r} is not inside the segment")
        if self.training.get("loss_in_rows"):
            self._check_loss_in_rows(graph)

    def _check_loss_in_rows(self, graph) -> None:
        """``training.loss_in_rows``: the last segment is a rows segment ending at the node whose
        output is the model's dense logits (the only tensor the output reads)."""
        out = graph.output_node
        logits = graph.nodes[-2].name
        last = max(self.segments, key=lambda s: graph.index(s.last), default=None)
        fix = "set training.loss_in_rows to false, or end the plan in a rows segment at the logits"
        if len(out.shape) != 4 or out.inputs != [logits]:
            raise PlanError(f"plan training.loss_in_rows: the model's output ({', '.join(out.inputs)}, shape "
                            f"{tuple(out.shape)}) is not one dense (N, C, H, W) logits map; {fix}")
        if last is None or last.mode != "rows" or last.last != logits:
            what = f"segment {last.first}..{last.last} ({last.mode})" if last else "no segment"
            raise PlanError(f"plan training.loss_in_rows: the logits {logits!r} must be made by the last segment "
                            f"in rows mode, the plan ends with {what}; {fix}")

    @staticmethod
    def _check_strips(graph, s: Segment, where: str) -> None:
        source = graph.source_of(s.first)
        rows = source.height if s.policy == "2ps" else graph[s.last].height
        what = "input" if s.policy == "2ps" else "output"
        if s.bounds:
            try:
                check_bounds(s.bounds, rows)
            except ValueError as e:
                raise PlanError(f"{where}: {e} ({s.policy} bounds split the segment's {what} rows)") from None
            if s.strips is not None and s.strips != len(s.bounds) - 1:
                raise PlanError(f"{where}: strips={s.strips} but bounds make {len(s.bounds) - 1} strips")
        elif not 1 <= s.strips <= rows:
            raise PlanError(f"{where}: {s.strips} strips do not fit: this {s.policy} segment takes 1..{rows} "
                            f"strips here (its {what} has {rows} rows)")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "model": self.model, "fingerprint": self.fingerprint,
            "input_shape": list(self.input_shape), "dtype": self.dtype, "training": dict(self.training),
            "budget_bytes": self.budget_bytes, "segments": [s.to_dict() for s in self.segments],
            "predicted": dict(self.predicted), "solver": dict(self.solver),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError("a plan must be a JSON object")
        schema = d.get("schema")
        if schema != SCHEMA:
            raise PlanError(f"plan schema {schema!r} is not {SCHEMA!r}; re-create the plan with this version of lrcnn")
        for k in ("model", "fingerprint", "input_shape", "segments"):
            if k not in d:
                raise PlanError(f"plan is missing the field {k!r}")
        shape = d["input_shape"]
        if not (isinstance(shape, list) and len(shape) == 4
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise PlanError(f"plan input_shape {shape!r} must be four positive integers [N, C, H, W]")
        if not isinstance(d["model"], str) or not d["model"]:
            raise PlanError(f"plan model {d['model']!r} must be a model name (see 'planner models')")
        if not isinstance(d["fingerprint"], str):
            raise PlanError(f"plan fingerprint {d['fingerprint']!r} must be a string")
        dtype = d.get("dtype", "float32")
        if dtype not in DTYPES:
            raise PlanError(f"plan dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        for k in ("training", "predicted", "solver"):
            if d.get(k) is not None and not isinstance(d[k], dict):
                raise PlanError(f"plan field {k!r} must be an object, got {type(d[k]).__name__}")
        training = d.get("training") or {}
        if "bn" in training and training["bn"] not in BN_MODES:
            raise PlanError(f"plan training.bn {training['bn']!r} is not one of {', '.join(BN_MODES)}")
        nc = training.get("num_classes")
        if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
            raise PlanError(f"plan training.num_classes {nc!r} must be a positive integer")
        opt = training.get("optimizer")
        if opt is not None and opt not in OPTIMIZERS:
            raise PlanError(f"plan training.optimizer {opt!r} is not one of {', '.join(OPTIMIZERS)}")
        for k, lo, hi in (("lr", 0.0, None), ("momentum", 0.0, 1.0), ("weight_decay", 0.0, None)):
            v = training.get(k)
            if v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v != float("inf")
            ok = ok and (v > lo if k == "lr" else v >= lo) and (hi is None or v < hi)
            if not ok:
                bound = "a positive number" if k == "lr" else f"a number in [{lo:g}, {hi:g})" if hi else "a number >= 0"
                raise PlanError(f"plan training.{k} {v!r} must be {bound}")
        amp = training.get("amp")
        if amp is not None and amp not in AMP_DTYPES:
            raise PlanError(f"plan training.amp {amp!r} is not one of {', '.join(AMP_DTYPES)} (or absent: no autocast)")
        if amp is not None and dtype != "float32":
            raise PlanError(f"plan training.amp {amp!r} needs float32 parameters, the plan's dtype is {dtype}")
        if not isinstance(training.get("amp_rows", False), bool):
            raise PlanError(f"plan training.amp_rows {training['amp_rows']!r} must be true or false")
        if not isinstance(training.get("loss_in_rows", False), bool):
            raise PlanError(f"plan training.loss_in_rows {training['loss_in_rows']!r} must be true or false")
        ws = training.get("world_size")  # DDP processes the plan was made for; input_shape[0] is per rank
        if ws is not None and (not isinstance(ws, int) or isinstance(ws, bool) or ws < 1):
            raise PlanError(f"plan training.world_size {ws!r} must be a positive integer (the number of "
                            f"DDP processes; input_shape[0] is the batch of each)")
        b = d.get("budget_bytes")
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b <= 0):
            raise PlanError(f"plan budget_bytes {b!r} must be a positive integer or null")
        if not isinstance(d["segments"], list) or not all(isinstance(x, dict) for x in d["segments"]):
            raise PlanError("plan segments must be a list of objects")
        segs = [Segment.from_dict(s, f"segment {i}") for i, s in enumerate(d["segments"])]
        return cls(model=d["model"], fingerprint=d["fingerprint"], input_shape=list(d["input_shape"]),
                   dtype=d.get("dtype", "float32"), training=dict(d.get("training") or {}),
                   budget_bytes=d.get("budget_bytes"), segments=segs,
                   predicted=dict(d.get("predicted") or {}), solver=dict(d.get("solver") or {}), schema=schema)

    def save(self, path: str) -> None:
        """Write the plan as JSON (atomically: no half-written file on failure)."""
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str, graph=None) -> "Plan":
        """Read a plan; with ``graph`` also check schema, fingerprint and segments against it."""
        check_input_file(path, "plan", "give a JSON plan written by 'planner solve'", PlanError)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise PlanError(f"cannot read plan {path!r}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan {path!r} is not valid JSON (line {e.lineno}: {e.msg})") from None
        except UnicodeDecodeError as e:  # a binary file
            raise PlanError(f"plan {path!r} is not a text file (byte {e.start}: {e.reason}); give a JSON plan "
                            f"written by 'planner solve'") from None
        plan = cls.from_dict(d)
        if graph is not None:
            plan.validate(graph)
        return plan


def precision(dtype: str, amp: Optional[str]) -> str:
    """``float32``, or ``float32 + autocast bf16`` for a mixed-precision graph or plan."""
    return f"{dtype} + autocast {amp}" if amp else dtype


def plan_model(plan, real: bool = False, num_classes: Optional[int] = None):
    """The plan's zoo model (meta device, or ``real``: CPU with random weights) in the plan's
    dtype and BN mode, and its capture at the plan's input shape, checked against the plan
    (schema, fingerprint, segments).  Returns ``(model, graph)``; PlanError says what differs."""
    n, c, h, w = plan.input_shape
    names = list_models()
    if plan.model not in names and (plan.model != plan.model.lower() or not get_close_matches(plan.model, names)):
        # solve(my_module, ...) names the plan after the module's class (a zoo name's typo: unknown model, below)
        raise PlanError(f"the plan's model {plan.model!r} is not one of 'planner models': a plan of a custom "
                        f"nn.Module, which the command line cannot rebuild; use it in Python with your own model: "
                        f"from lrcnn import Plan, apply_plan; planned = apply_plan(your_model, Plan.load('plan.json')) "
                        f"(a hand-edited model name: fix it to one of 'planner models')")
    if c != 3:  # every zoo model takes RGB input
        raise PlanError(f"plan input_shape {list(plan.input_shape)} has {c} channel(s), {plan.model} takes 3; "
                        f"re-create the plan for this model")
    model, graph = build_and_capture(plan.model, n, (h, w), plan.dtype, plan.training.get("bn", "train"),
                                     None, num_classes or plan.training.get("num_classes"), real=real,
                                     amp=plan.training.get("amp"))
    plan.validate(graph)
    return model, graph
