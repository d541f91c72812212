"""The cost model: predicted memory and time of a plan, per segment and per phase.

Everything is computed from the captured :class:`~models.capture.LayerGraph` (shapes, bytes,
FLOPs, row geometry and the per-node memory profile capture records) and a
:class:`DeviceProfile`; nothing runs on a device.  The planner's ILP consumes the per-segment
numbers (:meth:`CostModel.segment`) and composes them exactly as :meth:`CostModel.compose` does:

* ``fixed``: always live: parameters, buffers, optimizer state, the input batch and its labels
  (one class index per sample, or per pixel of dense logits);
* forward of segment *k*:  ``fixed + sum(keep[j] for j < k) + fwd_peak[k]``;
* the loss (cross-entropy, per pixel for dense logits): ``fixed + sum(keep) + loss`` at the end of
  the forward (the logits are the last segment's kept output; ``loss``: what the cross-entropy
  keeps, its log-softmax map), and its backward on top of that; with ``loss_in_rows`` (plan
  ``training.loss_in_rows``: the last segment, in rows, evaluates the loss strip by strip) no such
  phase: each strip's share of the loss (its logits rows, their log-softmax and per-position
  losses, the loss's backward) is part of that strip's peaks, and the segment keeps no logits map
  and back-propagates no logits gradient;
* backward of segment *k*: ``fixed + sum(keep[j] for j < k) + sum(grad[j] for j > k) + bwd_peak[k]``;
* optimizer step: ``fixed + sum(grad) + optimizer transient``.

``keep`` is what a segment leaves live from its forward until its backward (stored activations,
its output, 2PS boundary rows), ``fwd_peak``/``bwd_peak`` its peaks above that baseline, ``grad``
its parameter-gradient bytes (live from its backward until the optimizer step).

Tensors that pass over a segment (made before it, read after it: ``LayerGraph.passing``, see
:mod:`lrcnn.planner.plan`) are counted once, in the keep of the segment that made them (its
output); their gradients, made by a later reader's backward, are on the segment's ``bwd_peak``
(:meth:`CostModel.passing_grad_bytes`: a concatenation's whole output gradient while a slice of it
waits).  At a bypass boundary, a plain store segment whose input nothing saves or reads later
frees it in its forward: off its ``keep`` and ``bwd_peak`` (:meth:`CostModel.input_freed_bytes`);
a store segment's output that nothing saves is gone by its backward: off its ``bwd_peak``
(:meth:`CostModel.output_dead_bytes`).

How each mode is modelled (mirrors :mod:`executor`):

* ``store``: the capture's own per-node profile of a plain step (what each node saves, its
  in-call work, and, in backward, its peak and net change of live bytes);
* ``checkpoint``: a no-grad forward (values freed after their last use; only the output is
  kept); in backward a store-mode recompute followed by the store backward;
* ``rows``: per strip, the rows every node computes (the executor's own
  :func:`lrcnn.models.geometry.strip_schedule`), bytes scaled by rows, each tensor a strip makes
  followed separately (new rows, 2PS concatenated bands, border strips' padded copies); forward
  keeps the output map (and, for 2PS, the carried boundary rows); backward holds the input
  gradient map, the output gradient, the parameter-gradient sums of the strips done so far, and
  one strip's recompute + backward (2PS: plus the gradient carried from the strip below, which
  holds the whole band gradient of every carried node; a node reading part of an input band makes
  a gradient of the whole band).  Training-mode BN (statistics and gradient constants by strip
  sweeps): its strip backward's temporaries, and per backward level a gradient-constant sweep
  (the level's BN rows held, no parameter or input gradients).

Time is a sum over the nodes each mode runs, scaled by the rows it computes (halo redundancy of
OverL, recompute of checkpoint and rows, BN sweeps), plus the optimizer step.  Per node, with a
profile from ``planner calibrate``: the fit of its time class (:func:`lrcnn.models.ops.time_class`:
dense / depthwise convolution, linear, BN with known statistics, BN computing its batch
statistics, activation, pooling, other maps), ``a + b*work + c*bytes``, measured with cold caches
(as a layer runs in a step) and, for the second and later row strips through a layer, with warm
ones; with a datasheet profile: a roofline, ``max(FLOPs / (peak FLOP/s * efficiency), bytes /
bandwidth)`` plus a per-op launch cost (a BN computing batch statistics reads its input twice).
A train-mode BN computes its batch statistics when run plainly or checkpointed (forward and the
checkpoint's recompute); a store recompute and a row strip apply statistics already known.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from lrcnn.errors import LrcnnError
from lrcnn.models import ops as _ops
from lrcnn.models.capture import compute_dtype
from lrcnn.models.loss import target_bytes
from lrcnn.models.geometry import (bn_cover, bn_levels, default_bounds, full_map_schedule, input_rows, max_strips,
                                   ResizeGeom, segment_ancestors, strip_schedule)
from lrcnn.planner.files import check_input_file
from lrcnn.planner.plan import OPTIMIZERS, Plan, PlanError, Segment

__all__ = ["DeviceProfile", "PROFILES", "load_profile", "SegmentCost", "BNRowCost", "CostModel", "STATE_COPIES",
           "CostError", "SPLIT_SHARE", "CUDA_CONTEXT_BYTES", "ALLOCATOR_RESERVE", "ALLOCATOR_RESERVE_BYTES"]

ROWS_BATCH_STATS = True  # the executor runs batch-statistics BN inside row segments (exactly)
# A training-mode BN on a half-precision (autocast) map in row strips works in float32, as
# BatchNorm does, but on whole bands (executor.rows.bn_normalise, _BNStrip.backward): float32
# temporaries beyond the captured BN's, in bands of its output (an element 2 bytes, float32 4):
BN_HALF_FWD = 2   # the normalised band in float32 before it is rounded
BN_HALF_BWD = 2   # xhat and a product (or the input gradient) in float32: 3 bands where the captured BN backward makes 1

#: A unit (a run of nodes between two cut points) holding at least this share of the step's saved
#: activation bytes is split at its bypass boundaries (:meth:`CostModel._split`)
SPLIT_SHARE = 0.5

STATE_COPIES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}  # optimizer state: copies of the parameters
assert tuple(STATE_COPIES) == OPTIMIZERS  # (one list of names: the plan format's)


class CostError(LrcnnError, ValueError):
    """Bad input to the cost model (unknown profile, optimizer, unreadable profile file)."""


# ------------------------------------------------------------------------------------------------
# device profiles

@dataclass
class DeviceProfile:
    """What the time and memory model needs to know about a device.

    ``flops``: peak FLOP/s per dtype name; ``efficiency``: the fraction of peak dense convolutions
    reach; ``bandwidth``: memory bytes/s; ``launch_s``: fixed cost per op call; ``memory``: device
    bytes; ``alloc_round``: allocation granularity (the CUDA caching allocator rounds to 512 B);
    ``workspace``: bytes reserved for library workspaces (cuDNN/cuBLAS) during a step.
    """

    name: str
    flops: Dict[str, float]
    bandwidth: float
    memory: int
    efficiency: float = 0.6
    launch_s: float = 5e-6
    alloc_round: int = 1
    workspace: int = 0
    kind: str = "cuda"
    measured: bool = False
    # measured per op class ('conv', 'map') and direction ('fwd', 'bwd'): [s per call, s per
    # FLOP, s per byte] (``planner calibrate``); when present they replace the roofline
    op_costs: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)

    def flops_for(self, dtype: str) -> float:
        return self.flops.get(dtype) or self.flops.get("float32") or next(iter(self.flops.values()))

    @property
    def device_memory(self) -> Optional[int]:
        """The device's memory in bytes, or ``None`` when the profile leaves it unknown (0)."""
        m = self.memory
        return int(m) if isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 else None

    @property
    def usable_memory(self) -> Optional[int]:
        """The largest budget worth planning on this device (``None``: unknown).  On a GPU a budget
        covers the bytes the caching allocator reserves for the step (:meth:`reserved_for`); the
        CUDA context (:data:`CUDA_CONTEXT_BYTES`) is not in it and must stay free beside it."""
        m = self.device_memory
        if m is None or self.kind != "cuda":
            return m
        return m - CUDA_CONTEXT_BYTES

    def reserved_for(self, peak: float) -> int:
        """The device bytes a step of ``peak`` allocated bytes needs: on a GPU the caching
        allocator's reserved peak, ``peak`` plus :data:`ALLOCATOR_RESERVE` of it plus
        :data:`ALLOCATOR_RESERVE_BYTES`; on the CPU ``peak`` itself."""
        if self.kind != "cuda":
            return int(math.ceil(peak))
        return int(math.ceil(peak * (1 + ALLOCATOR_RESERVE))) + ALLOCATOR_RESERVE_BYTES

    def allocatable(self, budget: float) -> int:
        """The largest allocated peak whose :meth:`reserved_for` fits ``budget`` bytes (negative
        when not even an empty step fits)."""
        if self.kind != "cuda":
            return int(budget)
        a = int((budget - ALLOCATOR_RESERVE_BYTES) / (1 + ALLOCATOR_RESERVE))
        while a > 0 and self.reserved_for(a) > budget:  # (float rounding, both ways)
            a -= 1
        while self.reserved_for(a + 1) <= budget:
            a += 1
        return a

    @property
    def datasheet(self) -> bool:
        """Times predicted from a GPU's datasheet (peak FLOP/s, bandwidth), never calibrated on a
        GPU (``planner calibrate --device cuda`` measures one)."""
        return self.kind == "cuda" and not self.measured

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        """Refuse a field the cost model cannot use (a string, zero, negative, NaN), naming it:
        a hand-edited profile file fails here, not as a traceback deep in a solve."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def bad(field: str, want: str, v) -> CostError:
            return CostError(f"field {field!r} must be {want} (it is {v!r})")

        if not isinstance(self.name, str):
            raise bad("name", "a string", self.name)
        if not isinstance(self.flops, dict) or not self.flops:
            raise bad("flops", "an object of peak FLOP/s per dtype such as {\"float32\": 1e11}", self.flops)
        for k, v in self.flops.items():
            if not number(v) or v <= 0:
                raise bad(f"flops.{k}", "a positive number of FLOP/s", v)
        for f, want, ok in (
                ("bandwidth", "a positive number of bytes per second", lambda v: number(v) and v > 0),
                ("memory", "a whole number of bytes, 0 or more", lambda v: number(v) and v >= 0 and v == int(v)),
                ("efficiency", "a fraction of peak FLOP/s above 0, at most 1", lambda v: number(v) and 0 < v <= 1),
                ("launch_s", "seconds per op call, 0 or more", lambda v: number(v) and v >= 0),
                ("alloc_round", "a whole number of bytes, 1 or more", lambda v: number(v) and v >= 1 and v == int(v)),
                ("workspace", "a whole number of bytes, 0 or more", lambda v: number(v) and v >= 0 and v == int(v)),
                ("kind", "'cuda' or 'cpu'", lambda v: v in ("cuda", "cpu")),
                ("measured", "true or false", lambda v: isinstance(v, bool))):
            if not ok(getattr(self, f)):
                raise bad(f, want, getattr(self, f))
        if not isinstance(self.op_costs, dict):
            raise bad("op_costs", "an object of fitted costs (as 'planner calibrate' writes it)", self.op_costs)
        for cls, fits in self.op_costs.items():
            if not isinstance(fits, dict):
                raise bad(f"op_costs.{cls}", "an object of fits such as {\"fwd\": [a, b, c]}", fits)
            for k, fit in fits.items():
                if not (isinstance(fit, (list, tuple)) and len(fit) == 3 and all(number(x) for x in fit)):
                    raise bad(f"op_costs.{cls}.{k}", "a list of three numbers [s per call, s per work, s per byte]",
                              fit)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceProfile":
        need = {"name", "flops", "bandwidth", "memory"}
        if not isinstance(d, dict) or not need <= set(d):
            missing = sorted(need - set(d)) if isinstance(d, dict) else sorted(need)
            raise CostError(f"a device profile needs the fields {sorted(need)} "
                            f"({'missing ' + ', '.join(missing) if isinstance(d, dict) else 'not a JSON object'})")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


GB = 10**9
#: What a CUDA process holds outside the caching allocator, which no budget covers: the CUDA
#: context with cuBLAS and cuDNN loaded (about 0.5-1 GiB); a budget on a GPU profile leaves this
#: much of the device free (:attr:`DeviceProfile.usable_memory`).
CUDA_CONTEXT_BYTES = 2**30
#: What PyTorch's caching allocator reserves above the step's allocated peak, kept inside a budget
#: on a GPU profile (:meth:`DeviceProfile.reserved_for`): a share of the peak (free blocks between
#: live ones at the peak) ...
ALLOCATOR_RESERVE = 0.10
#: ... plus a fixed amount, about three of the large pool's 20 MiB pages (its partly used last page
#: and the holes at the peak, which dominate small plans).  Derived from the allocator model
#: (:mod:`lrcnn.models.allocator`, expandable segments, which lrcnn's CUDA runs use) on the
#: simulated steps of real plans (``python -m lrcnn.analysis.bench.reserve``,
#: bench/results/allocator-reserve.md: reserved above allocated up to 8% on large plans, up to
#: 42 MiB on small ones); not yet measured on a GPU.
ALLOCATOR_RESERVE_BYTES = 64 * 2**20
# Datasheet peaks (dense, no sparsity).  Tensor-core rates are used for float32 as TF32 on
# A100/H100/H200 (PyTorch's cuDNN convolutions allow TF32 by default).
PROFILES: Dict[str, DeviceProfile] = {
    "cpu": DeviceProfile("cpu", {"float32": 1.0e11, "float64": 5.0e10, "bfloat16": 5.0e10,
                                 "float16": 2.5e10}, 1.5e10, 24 * 2**30, efficiency=0.5,
                         launch_s=2e-5, kind="cpu"),
    "v100": DeviceProfile("v100", {"float32": 15.7e12, "float16": 125e12, "bfloat16": 15.7e12,
                                   "float64": 7.8e12}, 900 * GB, 32 * 2**30, alloc_round=512,
                          workspace=256 * 2**20),
    "a100": DeviceProfile("a100", {"float32": 156e12, "float16": 312e12, "bfloat16": 312e12,
                                   "float64": 19.5e12}, 2039 * GB, 80 * 2**30, efficiency=0.45,
                          alloc_round=512, workspace=256 * 2**20),
    "h100": DeviceProfile("h100", {"float32": 495e12, "float16": 989e12, "bfloat16": 989e12,
                                   "float64": 67e12}, 3350 * GB, 80 * 2**30, efficiency=0.4,
                          alloc_round=512, workspace=256 * 2**20),
    "h200": DeviceProfile("h200", {"float32": 495e12, "float16": 989e12, "bfloat16": 989e12,
                                   "float64": 67e12}, 4800 * GB, 141 * GB, efficiency=0.4,
                          alloc_round=512, workspace=256 * 2**20),
    "rtx4090": DeviceProfile("rtx4090", {"float32": 82.6e12, "float16": 165e12, "bfloat16": 165e12,
                                         "float64": 1.3e12}, 1008 * GB, 24 * 2**30,
                             alloc_round=512, workspace=256 * 2**20),
}


def load_profile(profile: Union[str, DeviceProfile, None]) -> DeviceProfile:
    """A built-in profile by name, or a JSON file written by ``planner calibrate``."""
    if profile is None:
        return PROFILES["cpu"]
    if isinstance(profile, DeviceProfile):
        return profile
    if profile in PROFILES:
        return PROFILES[profile]
    if not isinstance(profile, (str, os.PathLike)):
        raise CostError(f"device profile {profile!r}: give a profile name ({', '.join(PROFILES)}), a JSON file "
                        f"written by 'planner calibrate' or a DeviceProfile")
    if os.path.exists(profile) or os.fspath(profile).lower().endswith(".json") or os.sep in os.fspath(profile):
        check_input_file(profile, "device profile", "give the JSON file 'planner calibrate' wrote", CostError)
        try:
            with open(profile, encoding="utf-8") as f:
                return DeviceProfile.from_dict(json.load(f))
        except UnicodeDecodeError as e:  # a binary file
            raise CostError(f"cannot read device profile {profile!r}: not UTF-8 text (byte {e.start}: {e.reason}); "
                            f"give the JSON file 'planner calibrate' wrote, or re-run 'planner calibrate'") from None
        except (OSError, json.JSONDecodeError) as e:
            raise CostError(f"cannot read device profile {profile!r} ({e}); re-run 'planner calibrate'") from None
        except (CostError, TypeError) as e:
            raise CostError(f"device profile {profile!r} is malformed: {e}; fix the file or re-run "
                            f"'planner calibrate'") from None
    raise CostError(f"unknown device profile {profile!r}: use one of {', '.join(PROFILES)} "
                    f"or a file written by 'planner calibrate'")


# ------------------------------------------------------------------------------------------------
# per-segment costs

@dataclass
class SegmentCost:
    """Cost of one segment (see the module docstring for how the fields compose)."""

    keep: int = 0
    fwd_peak: int = 0
    bwd_peak: int = 0
    grad_bytes: int = 0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    supported: bool = True
    why: str = ""
    detail: Dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BNRowCost:
    """The extra work and memory of a row segment's training-mode BatchNorm handling for one step,
    as the cost model prices it (:meth:`CostModel.bn_cost`; the executor's ``RowSegment.bn_sweeps``
    and ``bn_rows`` count what a step did).

    * ``strategy``: the segment's ``options.bn`` (``sweeps`` or ``layerwise``);
    * ``stat_passes``: per no-grad statistics pass, the rows it computes per node: ``sweeps``, one
      strip pass per forward level L (the longest chain of training-mode BNs on a path through the
      segment) through the ancestors of that level's BNs; ``layerwise`` or one strip: one pass
      through every BN and its ancestors.  ``stat_sweeps`` is their number, ``stat_rows`` the rows
      per node summed over them;
    * ``grad_sweeps``: L again (backward levels), each a strip-wise recompute of every node with
      autograd plus the backward below the level's BNs: ``grad_rows[n] = L * computed_rows(n)``;
    * ``transient_bytes``: ``layerwise``: the peak of its one full-map pass (its tensors as a strip
      makes them); ``sweeps``: 0 beyond a forward strip's own;
    * ``state_bytes``: 4 per-channel vectors per BN (mean, invstd, the two gradient constants, in
      float32 at least) kept from forward to backward.

    Its fields read by name, or as ``cost["stat_sweeps"]``."""

    strategy: str
    stat_passes: Tuple[Dict[str, int], ...]
    grad_sweeps: int
    grad_rows: Dict[str, int]
    transient_bytes: int
    state_bytes: int

    @property
    def stat_sweeps(self) -> int:
        return len(self.stat_passes)

    @property
    def stat_rows(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for rows in self.stat_passes:
            for n, r in rows.items():
                out[n] = out.get(n, 0) + r
        return out

    def __getitem__(self, key: str):
        return getattr(self, key)


@dataclass(frozen=True)
class _StripCost:
    """What one strip of a row segment costs on its own (:meth:`CostModel._rows`; relative bytes).

    ``fwd_peak``: its no-grad forward walk's peak; ``carry``: the 2PS boundary rows it hands to the
    next strip; ``rec_peak`` / ``rec_keep``: its backward's store-mode recompute, peak and what
    stays live; ``bwd_peak`` / ``bwd_net``: its backward, peak and net change; ``pending``: the
    gradients pending from the strip below (2PS); ``const_peak``: the peak of its gradient-constant
    sweeps (training-mode BN); ``fwd_s`` / ``bwd_s``: its forward and recompute + backward seconds.
    """

    fwd_peak: int
    carry: int
    rec_peak: int
    rec_keep: int
    bwd_peak: int
    bwd_net: int
    pending: int
    const_peak: int
    fwd_s: float
    bwd_s: float


@dataclass(frozen=True)
class _BNStructure:
    """The training-mode BatchNorms of a row segment (:meth:`CostModel._bn_structure`).

    ``by``: the segment's nodes by name; ``anc``: each node's ancestors within the segment;
    ``bns``: the BNs that normalise with batch statistics, in order; ``fwd_levels`` /
    ``bwd_levels``: their forward and backward levels (:func:`models.geometry.bn_levels`, as the
    executor sweeps them); ``cover``: the nodes whose every row must be computed."""

    by: Dict[str, object]
    anc: Dict[str, set]
    bns: List[str]
    fwd_levels: List[List[str]]
    bwd_levels: List[List[str]]
    cover: List[str]


class _StripNode:
    """A tensor of one strip, as :meth:`CostModel._walk` reads a node (see ``_strip_graph``)."""

    __slots__ = ("name", "inputs", "saves", "extra_saved", "extra_fixed", "fwd_work", "alias")

    def __init__(self, name: str, inputs: List[str], saves: Sequence[str] = (), extra_saved: int = 0,
                 fwd_work: int = 0, extra_fixed: int = 0):
        self.name, self.inputs, self.saves = name, inputs, list(saves)
        self.extra_saved, self.fwd_work, self.alias = extra_saved, fwd_work, False
        self.extra_fixed = extra_fixed


class CostModel:
    """Predicts memory and time of plans for one captured graph.

    ``optimizer``: sgd | momentum | adam | adamw (its state is part of the fixed bytes);
    ``profile``: a :class:`DeviceProfile` or its name / file; ``compiled``: price plans for
    :func:`lrcnn.executor.compiled.compile_plan` (``torch.compile``): a store segment's recomputed
    BN / ReLU / add nodes run inside the backward's fused pointwise kernels that read their inputs
    anyway, so their recompute costs no time (memory is still predicted for eager execution).
    ``loss_in_rows``: price segments (:meth:`segment`, :meth:`compose`) as a plan whose last
    segment, a rows segment ending at the logits, evaluates the per-pixel loss inside its strips
    (plan ``training.loss_in_rows``; ``apply_plan(..., loss=...)``); :meth:`predict` of a
    :class:`Plan` follows the plan's own ``training.loss_in_rows``.
    """

    def __init__(self, graph, optimizer: str = "sgd", profile: Union[str, DeviceProfile, None] = "cpu",
                 compiled: bool = False, loss_in_rows: bool = False):
        if optimizer not in OPTIMIZERS:
            raise CostError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        self.graph = graph
        self.optimizer = optimizer
        self.profile = load_profile(profile)
        self.compiled = bool(compiled)
        self.loss_in_rows = bool(loss_in_rows)
        self.rg = graph.row_graph()
        self._cache: Dict[tuple, SegmentCost] = {}
        self._time_terms: Dict[tuple, tuple] = {}  # _time's per-node terms
        self._consumers = graph.consumers()
        self._cuts = set(graph.cut_points())
        nodes = graph.nodes
        self._esize = max(1, nodes[0].out_bytes // max(1, math.prod(nodes[0].shape)))
        # the dtype convolutions run in: the graph's, or under autocast (graph.amp) the half one
        self._compute_dtype = compute_dtype(graph.dtype, graph.amp)
        # storage owner of every node (in-place/view results share their input's storage)
        self._owner: Dict[str, str] = {}
        for n in nodes:
            self._owner[n.name] = self._owner.get(n.inputs[0], n.inputs[0]) if (n.alias and n.inputs) else n.name

    # -- fixed memory ---------------------------------------------------------------------------
    def _round(self, b: float) -> int:
        r = self.profile.alloc_round
        b = int(math.ceil(b))
        return b if r <= 1 else -(-b // r) * r

    @property
    def param_bytes(self) -> int:
        return self.graph.param_bytes

    def fixed_breakdown(self) -> Dict[str, int]:
        g = self.graph
        out = g.output_node
        batch = g.input_shape[0]
        return {
            "params": self.param_bytes,
            "buffers": getattr(g, "buffer_bytes", 0),
            "optimizer": STATE_COPIES[self.optimizer] * self.graph.grad_bytes,  # trainable only
            # the batch and its int64 class indices (one per sample, or per pixel of dense logits),
            # the loss's value (a scalar the step keeps to its end) and its gradient (a scalar
            # backward() holds while it runs; counted throughout)
            "input": (g.input_node.out_bytes + (target_bytes(out.shape) if len(out.shape) >= 2 else 8 * batch)
                      + 2 * self._round(self._esize)),
            "workspace": self.profile.workspace,
        }

    def loss_bytes(self) -> int:
        """Bytes the loss keeps from its forward until its backward (the cross-entropy's log-softmax
        of the logits: a map as large as the logits of a dense model), on top of the logits (the last
        segment's output) at the end of the forward; freed by the loss's backward."""
        return self.graph.output_node.extra_saved

    def fixed_bytes(self) -> int:
        """Bytes live during the whole step, whatever the plan."""
        return sum(self.fixed_breakdown().values())

    def optimizer_peak(self) -> int:
        """Transient bytes of ``optimizer.step()`` beyond the gradients and the state."""
        if self.optimizer in ("adam", "adamw"):
            biggest = max((n.grad_bytes for n in self.graph.nodes), default=0)
            # foreach (CUDA): one params-sized list for the denominators; single-tensor loop
            # (CPU): sqrt() and its division alive together for the largest parameter
            return self.graph.grad_bytes if self.profile.kind == "cuda" else 2 * biggest
        return 0

    def _last_model_node(self):
        return self.graph.nodes[-2]

    def _logits_freed(self) -> int:
        """Bytes of the logits (the last segment's output, in its ``keep``) when no op saves them for
        backward: then they die as the loss's forward returns (the cross-entropy keeps its own
        log-softmax of them), before the loss's backward; else 0."""
        last = self._last_model_node()
        if last.alias or any(last.name in (n.saves + n.also_saves) for n in self.graph.nodes):
            return 0
        return self._out(last)

    # -- units ------------------------------------------------------------------------------------
    def units(self) -> List[Tuple[str, str]]:
        """(first, last) node of every unit: the runs between consecutive cut points, where a run
        holds at least :data:`SPLIT_SHARE` of the step's saved activation bytes split further at
        its bypass boundaries (:meth:`_split`)."""
        hit = self.__dict__.get("_units")
        if hit is not None:
            return list(hit)
        g = self.graph
        cuts = self._cuts
        runs, start = [], None
        for i, n in enumerate(g.nodes[1:-1], 1):
            if start is None:
                start = i
            if n.name in cuts:
                runs.append((start, i))
                start = None
        if start is not None:
            runs.append((start, len(g.nodes) - 2))
        total = sum(n.saved_bytes for n in g.nodes)
        units, of_run = [], []
        for r, (a, b) in enumerate(runs):
            pieces = self._split(a, b, total)
            units.extend(pieces)
            of_run.extend([r] * len(pieces))
        self._units = [(g.nodes[a].name, g.nodes[b].name) for a, b in units]
        self._unit_runs = of_run
        return list(self._units)

    def unit_runs(self) -> List[int]:
        """Per unit (:meth:`units`), the index of the run between two cut points it lies in: the
        same for the pieces of a split run, else one run per unit."""
        self.units()
        return list(self._unit_runs)

    def _split(self, a: int, b: int, total: int) -> List[Tuple[int, int]]:
        """The unit ``a..b`` (node indices), split at its bypass boundaries where it pays.

        A run of nodes between two cut points has no place where one tensor alone is live, but
        may have places where, besides one tensor it made, only tensors made before the run are
        live: they pass over the rest of it (LR-ASPP's stride-8 feature over the whole stride-16
        backbone, a U-Net skip over the levels below it; equally a residual block's identity over
        its branch).  The run is split there only when it holds at least :data:`SPLIT_SHARE` of
        the step's saved activation bytes ``total`` (no plan of whole units gets below that share
        of the plain step's activations), and each piece again by the same rule against the run
        it lies in (a piece holding most of it; LR-ASPP's residual blocks hold a sixth at most and
        the zoo U-Net's next level 0.45: they stay whole.  Finer is not always better: a
        checkpoint spans at most ``max_ckpt_units`` units, and the U-Net's smallest plan is
        smaller with its lower levels in one unit).  Units of the classification zoo hold far
        less (at most ~0.3 at 224x224) and stay whole, so their solve times do not grow.

        Every piece has one tensor read after it, its last node's
        (:meth:`~lrcnn.models.capture.LayerGraph.segment_refusal`'s second condition); whether a
        range of pieces may be a checkpoint, rows or recompute segment is checked per range (a
        piece that reads a passing tensor runs plainly, as store)."""
        g = self.graph
        saved = sum(n.saved_bytes for n in g.nodes[a:b + 1])
        if b <= a or total <= 0 or saved < SPLIT_SHARE * total:
            return [(a, b)]
        last_read = g.read_indices()[0]
        pieces, start, reach = [], a, -1
        for k in range(a, b):
            # a boundary after k: nothing made in this run before k is read after k (what is
            # live there besides k's output was made before the run: it passes over the rest)
            if reach <= k:
                pieces.append((start, k))
                start = k + 1
            reach = max(reach, last_read[k])
        pieces.append((start, b))
        if len(pieces) == 1:
            return pieces
        out: List[Tuple[int, int]] = []
        for p, q in pieces:
            out.extend(self._split(p, q, saved))
        return out

    # -- node-level pieces ------------------------------------------------------------------------
    def _out(self, n, f: float = 1.0) -> int:
        return 0 if n.alias else self._round(n.out_bytes * f)

    def _grads(self, nodes) -> int:
        return sum(self._round(n.grad_bytes) for n in nodes if n.grad_bytes)  # frozen: none

    def _saved_value(self, n, q: str) -> str:
        """The value (a node name) node ``n`` saves of the plain step's storage ``q`` (the capture
        names saved storages by their owner), where ``n`` runs out of place (a row strip, or next
        to a recompute set): its own output when it saves the storage it shares in place in the
        plain step, else the input that holds ``q`` (``q`` may own an in-place input)."""
        if q == n.name or (n.alias and self._owner[n.name] == q):
            return n.name
        return q if q in n.inputs else next((v for v in n.inputs if self._owner.get(v) == q), q)

    def _walk(self, nodes, scale: Dict[str, float], store: bool,
              sizes: Optional[Dict[str, int]] = None, keep_output: bool = True,
              storage: Optional[Tuple[Dict[str, str], set]] = None, keep: Sequence[str] = ()) -> Tuple[int, int]:
        """Forward liveness over ``nodes`` (a segment): (peak, live at the end), relative.

        The segment input is not counted (it belongs to the segment before).  ``store``: values
        that autograd saves stay live; otherwise everything but the segment output is freed after
        its last use.  ``keep_output``: the segment output stays live even if nobody saves it
        (it is the next segment's input).  ``scale``: fraction of each node's rows computed.
        ``sizes``: bytes of each node's output, for the tensors of a row strip
        (:meth:`_strip_graph`: every node has its own storage there).  ``storage``: (owner of
        each node's storage, the storages autograd saves) when they differ from the plain
        step's, with ``sizes`` 0 for a node that shares its owner's storage (a recompute set:
        :meth:`_recompute_effect`).  ``keep``: values that stay live anyway (autograd roots of a
        row strip's backward), as if saved.
        """
        return self._walk_run(self._walk_plan(nodes, scale, sizes, keep_output, storage), store, keep)

    def _walk_plan(self, nodes, scale: Dict[str, float], sizes: Optional[Dict[str, int]] = None,
                   keep_output: bool = True, storage: Optional[Tuple[Dict[str, str], set]] = None):
        """What :meth:`_walk` follows, whatever ``store`` and ``keep``: per node, the bytes its call
        peaks at above the live ones, the bytes of its output and of what it keeps besides, and
        the values (with their bytes) whose last use it is; and the values the nodes save.  A row
        strip's forward, recompute and gradient-constant sweeps walk one plan."""
        names = [n.name for n in nodes]
        last = names[-1]
        owner = self._owner if sizes is None else {n: n for n in names}
        if storage is not None:
            owner = storage[0]
        last_use: Dict[str, int] = {}
        for i, n in enumerate(nodes):
            for u in n.inputs:
                last_use[owner.get(u, u)] = i
            last_use[owner[n.name]] = max(last_use.get(owner[n.name], -1), i)
        # values saved by the segment's own ops (its output may also be saved by the next one)
        saved = set()
        for n in nodes:
            for p in n.saves:
                if sizes is None:
                    saved.add(self._owner.get(p, p))
                else:
                    saved.add(n.name if (n.alias and self._owner[n.name] == p) else p)
        if storage is not None:
            saved = set(storage[1])
        steps = []
        size: Dict[str, int] = {}
        rnd = self._round
        for i, n in enumerate(nodes):
            f = scale.get(n.name, 1.0)
            o = owner[n.name]
            new = self._out(n, f) if sizes is None else sizes[n.name]
            # what the op keeps besides its output (BN statistics, pooling indices, autocast's
            # half-precision weight copy) exists as it returns, saved (store) or not
            # (a parameter's cast copy is whole in every strip: extra_fixed is not scaled)
            fixed = n.extra_fixed
            extra = rnd((n.extra_saved - fixed) * f) + rnd(fixed)
            top = new + extra + rnd(n.fwd_work * f)
            if new:
                size[o] = size.get(o, 0) + new
            if not keep_output and i == len(nodes) - 1:
                last_use[owner[last]] = i  # freed at once unless saved
            frees = []
            for key in {owner.get(u, u) for u in n.inputs} | {o}:
                if key not in size or last_use.get(key) != i or (keep_output and key == owner[last]):
                    continue
                frees.append((key, size.pop(key)))
            steps.append((top, new, extra, frees))
        return steps, saved

    @staticmethod
    def _walk_run(plan, store: bool, keep: Sequence[str] = ()) -> Tuple[int, int]:
        """(peak, live at the end) of a :meth:`_walk_plan` with or without autograd saving."""
        steps, saved = plan
        if keep:
            saved = saved | set(keep)
        live, peak = 0, 0
        for top, new, extra, frees in steps:
            if live + top > peak:
                peak = live + top
            live += new + extra if store else new
            for key, b in frees:
                if not (store and key in saved):
                    live -= b
        return peak, live

    def _store_backward(self, nodes, scale: Dict[str, float], retain: Optional[Dict[str, int]] = None,
                        extra: Optional[Dict[str, int]] = None,
                        partial: Optional[Dict[str, list]] = None, params: bool = True) -> Tuple[int, int]:
        """Backward of a store run, last node first: (peak, net), relative to its start.

        ``retain``: per node, bytes of its output's gradient that stay live after its backward
        (a 2PS strip's carried rows: their gradient is an output of the strip's backward).
        ``extra``: per node, transient bytes its backward makes beyond the captured profile.
        ``partial``: per node, ``(input, band bytes, bytes beyond the captured gradient)`` for
        each input band it reads only part of (:meth:`_partial_reads`): the slice's backward makes
        a gradient of the whole band, live until the input's gradient is complete.
        ``params=False``: no parameter gradients are made (a BN gradient-constant sweep)."""
        run, peak = 0, 0
        release: Dict[str, int] = {}
        for n in reversed(nodes):
            f = scale.get(n.name, 1.0)
            if not f:  # (a strip that computes no rows of the node)
                continue
            run -= release.pop(n.name, 0)  # its gradient is complete: the bands summed into it
            pg = self._round(n.grad_bytes) if n.grad_bytes else 0
            act_peak = (n.bwd_peak - pg) * f + pg if n.bwd_peak > pg else n.bwd_peak
            act_net = (n.bwd_net - pg) * f + pg
            if not params:
                act_peak, act_net = max(0, act_peak - pg), act_net - pg
            peak = max(peak, run + int(act_peak) + (extra.get(n.name, 0) if extra else 0))
            run += int(act_net) + (retain.get(n.name, 0) if retain else 0)
            for u, band, more in (partial.get(n.name, ()) if partial else ()):
                peak = max(peak, run + band)  # the zero band, next to the rows' gradient
                run += more
                release[u] = release.get(u, 0) + more
        # bands of inputs the walk never reaches (the segment input's: the first node's gradient
        # is summed into it) leave with the walk's result
        return peak, run - sum(release.values())

    def _partial_reads(self, g, nodes, by, strip, sizes, source: Optional[str] = None) -> Dict[str, list]:
        """Inputs a strip's nodes read only part of (executor.strips.Band.rows slices a band).

        Per node, ``(input, bytes of the input's band, bytes the slice's backward adds)``: the
        gradient of a slice is a zero tensor the size of the whole band with the rows' gradient
        copied in.  A pointwise or join op's captured backward hands its output gradient on
        (no new bytes), so the whole band is new; a spatial op's captured backward already makes
        the gradient of the rows it reads.  ``source``: the segment input, when the strip's
        backward makes the gradient of its input band (the rows it sliced from the input map)."""

        out: Dict[str, list] = {}
        for n in nodes:
            r = strip[n.name]
            if not r.computed:
                continue
            for u in dict.fromkeys(n.inputs):
                ru = strip[u]
                if u == source:  # the strip's input band: the rows sliced from the input map
                    b0, key = ru.lo, None
                elif u not in by or not ru.computed:
                    continue
                else:
                    c0, c1 = ru.carried
                    b0 = c0 if c1 > c0 else ru.start
                    key = u + "#cat" if (c1 > c0 and u + "#cat" in sizes) else u
                if n.kind == _ops.SPATIAL and n.geom is not None:
                    ir = input_rows(n.geom, r.start, r.hi, g[u].height)
                    lo, hi = ir.lo, ir.hi
                else:
                    lo, hi = r.start, r.hi
                if lo <= b0 and hi >= ru.hi:
                    continue  # the whole band: no slice
                row = g[u].out_bytes / max(1, g[u].height)
                band = sizes[key] if key is not None else self._round(row * (ru.hi - b0))
                read = self._round(row * max(0, hi - lo)) if n.kind == _ops.SPATIAL else 0
                out.setdefault(n.name, []).append((u, band, max(0, band - read)))
        return out

    def _time(self, n, f: float = 1.0, backward: bool = False, warm: bool = False,
              batch_stats: bool = False) -> float:
        """Seconds for ``f`` of node ``n``'s rows, forward or backward; ``warm``: right after the
        same op ran on other rows (row strips after a segment's first), its weights in cache;
        ``batch_stats``: a train-mode BN that computes its batch statistics here (run plainly or
        checkpointed; a store recompute and a row strip apply statistics already known).

        With a calibrated profile: the fit of the node's time class (``planner calibrate``),
        ``a + b*work + c*bytes`` (work: FLOPs for convolutions and linear layers, output elements
        otherwise); with a datasheet profile: a roofline, max(FLOPs / peak, bytes / bandwidth)
        plus a per-call cost."""
        p = self.profile
        if n.kind in (_ops.INPUT, _ops.OUTPUT) or (n.alias and not n.flops_fwd) or f <= 0:
            return 0.0
        flops = (n.flops_bwd if backward else n.flops_fwd) * f
        stats = batch_stats and n.batch_stats
        key = (n.name, backward, warm, stats)
        hit = self._time_terms.get(key)
        if hit is None:  # (what does not depend on f: the candidates ask for many row shares)
            ins = sum(self.graph[u].out_bytes for u in n.inputs)
            hit = self._time_terms[key] = (ins, self._fit(_ops.time_class(n.op, n.groups, stats), backward, warm))
        ins, fit = hit
        moved = (n.out_bytes + ins) * f * (2 if backward else 1) + n.param_bytes * (2 if backward else 1)
        if stats and not backward:
            moved += ins * f  # the statistics read the input once more
        if fit:
            work = flops if n.op in ("conv2d", "conv_transpose2d", "linear") else \
                math.prod(n.shape) * f * (2 if backward else 1)
            return fit[0] + fit[1] * work + fit[2] * moved
        t = max(flops / (p.flops_for(self._compute_dtype) * p.efficiency), moved / p.bandwidth)
        return t + p.launch_s * (2 if backward else 1)

    def _fit(self, cls: str, backward: bool, warm: bool = False) -> Optional[List[float]]:
        """The profile's fitted costs for a time class; profiles calibrated before the classes
        were split have only ``conv`` and ``map``, and no warm fits; profiles calibrated before
        ``bn_stats`` price a BN computing its statistics by its ``bn`` fit."""
        costs = self.profile.op_costs
        key = "bwd" if backward else "fwd"
        older = {"conv": (), "dwconv": ("conv",), "linear": ("conv",), "bn_stats": ("bn", "map")}.get(cls, ("map",))
        for c in (cls, *older):
            fits = costs.get(c, {})
            fit = (fits.get(key + "_warm") if warm else None) or fits.get(key)
            if fit:
                return fit
        return None

    def optimizer_time(self) -> float:
        """Seconds of ``zero_grad`` + ``step``: calibrated per optimizer (per step, per parameter
        tensor, per byte), else a bandwidth estimate (parameters, gradients and state read and
        written once)."""
        fit = self.profile.op_costs.get("optimizer", {}).get(self.optimizer)
        if fit:
            tensors = sum(n.param_tensors for n in self.graph.nodes)
            return fit[0] + fit[1] * tensors + fit[2] * self.graph.grad_bytes
        return (STATE_COPIES[self.optimizer] + 2) * 2 * self.graph.grad_bytes / self.profile.bandwidth

    # -- segments ---------------------------------------------------------------------------------
    def segment(self, seg: Segment, loss_in_rows: Optional[bool] = None) -> SegmentCost:
        """Cost of one segment (cached by its fields).  ``loss_in_rows``: this model's setting
        unless given (a rows segment that makes the logits then evaluates the loss in its strips)."""
        loss_in_rows = self.loss_in_rows if loss_in_rows is None else loss_in_rows
        # (the loss evaluated in the strips of a rows segment that makes the logits)
        loss = bool(loss_in_rows) and seg.mode == "rows" and seg.last == self._last_model_node().name
        key = (seg.first, seg.last, seg.mode, seg.policy, seg.strips, tuple(seg.bounds or ()),
               tuple(sorted(seg.recompute)), tuple(sorted((seg.options or {}).items())), loss)
        hit = self._cache.get(key)
        if hit is None:
            nodes = self.graph.span(seg.first, seg.last)
            if not any(n.needs_grad for n in nodes):
                # frozen and upstream of every trainable parameter: autograd records nothing and
                # every mode runs a plain forward (row strips a little less transient: an upper bound)
                hit = self._store(nodes, set())
            elif seg.mode == "rows" and (seg.options or {}).get("bn") == "layerwise":
                base = Segment(seg.first, seg.last, "rows", seg.policy, seg.strips, seg.bounds)
                hit = self._layerwise(seg, nodes, self.segment(base, loss))  # (its passing gradients included)
                self._cache[key] = hit
                return hit
            elif seg.mode == "rows":
                hit = self._rows(seg, nodes, loss)
            elif seg.mode == "checkpoint":
                hit = self._checkpoint(nodes)
            else:
                hit = self._store(nodes, set(seg.recompute))
            hit = self._passing(seg, hit)
            self._cache[key] = hit
        return hit

    def passing_grad_bytes(self, first: str, last: str) -> int:
        """Bytes of the gradients of the tensors that pass over ``first..last``
        (:meth:`~lrcnn.models.capture.LayerGraph.passing`): a reader after the segment made each
        in its backward, and it lives until the tensor's producer, before the segment, takes it:
        through the segment's whole backward.  0 where ``last`` is a cut point."""
        g = self.graph
        if last in self._cuts:
            return 0
        b = g.index(last)
        total, joins = 0, set()
        for v in g.passing(first, last):
            if not g[v].needs_grad or g[v].kind == _ops.INPUT:
                continue
            after = {r for r in self._consumers[v] if g.index(r) > b}
            if len(after) == 1 and g[next(iter(after))].op == "cat":
                joins |= after  # its gradient is a slice of the join's
            else:
                total += self._round(g[v].out_bytes)
        # a concatenation's backward hands each input a slice of its output's gradient, which
        # stays live whole while any slice does (the slice of ``last``, if one, is the
        # segment's own output gradient, counted as such)
        for r in joins:
            total += self._round(g[r].out_bytes) - (self._round(g[last].out_bytes) if last in g[r].inputs else 0)
        return total

    def input_freed_bytes(self, seg: Segment) -> int:
        """Bytes of a plain store segment's input that its forward frees, at a bypass boundary
        (the segment starts or ends where a tensor passes): the input is counted in the keep of
        the segment that made it, but no node saves it and nothing after this segment reads it,
        so it is freed as this segment's forward ends (a U-Net's up-sampled map, read only by the
        concatenation that joins it to its skip: ``cat`` saves no input).  Segments between two
        cut points are priced as before (0)."""
        g = self.graph
        if seg.mode != "store" or seg.recompute:
            return 0
        a = g.index(seg.first)
        src = g.nodes[a - 1]
        if a < 2 or (src.name in self._cuts and seg.last in self._cuts) or src.alias:
            return 0
        last_read, _, owner = g.read_indices()
        k = a - 1
        if last_read[k] > g.index(seg.last) or any(owner[i] == k for i in range(a, len(g.nodes))):
            return 0  # read after the segment, or its storage lives on in a view / in-place result
        if self._is_saved(src.name):
            return 0  # saved for a backward
        return self._out(src)

    def _is_saved(self, name: str) -> bool:
        """Whether any node's autograd keeps the storage of ``name``'s output for the backward."""
        saved = self.__dict__.get("_saved_owners")
        if saved is None:
            g = self.graph
            saved = self._saved_owners = {self._owner.get(q, q) for n in g.nodes for q in n.saves + n.also_saves}
        return self._owner.get(name, name) in saved

    def output_dead_bytes(self, seg: Segment) -> int:
        """Bytes of a store segment's output that its backward does not find live, at a bypass
        boundary: no node saves it, so it was freed in the forward after its last reader (a
        U-Net's up-sampled map, read only by the concatenation that joins it to its skip), but
        the segment's keep, which its backward peak starts from, holds it.  0 elsewhere."""
        g = self.graph
        if seg.mode != "store":
            return 0
        a, b = g.index(seg.first), g.index(seg.last)
        last = g.nodes[b]
        if (g.nodes[a - 1].name in self._cuts and last.name in self._cuts) or last.alias or b >= len(g.nodes) - 2:
            return 0
        owner = g.read_indices()[2]
        if any(owner[i] == b for i in range(b + 1, len(g.nodes))) or self._is_saved(last.name):
            return 0
        return self._out(last)

    def _passing(self, seg: Segment, cost: SegmentCost) -> SegmentCost:
        """``cost`` with the gradients of the tensors passing over ``seg`` on its backward peak
        (the tensors themselves are in the keep of the segments that made them), less its input
        where its forward frees it (:meth:`input_freed_bytes`: off its keep, and off its backward
        peak, which is relative to what the segments before it keep), and less its output where
        its backward does not find it (:meth:`output_dead_bytes`, off its backward peak)."""
        if not cost.supported:
            return cost
        pg = self.passing_grad_bytes(seg.first, seg.last)
        freed = min(self.input_freed_bytes(seg), cost.keep)
        dead = self.output_dead_bytes(seg)
        if not pg and not freed and not dead:
            return cost
        return replace(cost, keep=cost.keep - freed, bwd_peak=max(0, cost.bwd_peak + pg - freed - dead),
                       detail={**cost.detail, "passing_grad": pg, "input_freed": freed, "output_dead": dead})

    def _store(self, nodes, recompute: set) -> SegmentCost:
        extra: Dict[str, int] = {}
        retain: Dict[str, int] = {}
        fwd_s = sum(self._time(n, batch_stats=True) for n in nodes)
        bwd_s = sum(self._time(n, backward=True, batch_stats=True) for n in nodes)
        if recompute:
            sizes, storage, extra, retain, times = self._recompute_effect(nodes, recompute)
            fpk, keep = self._walk(nodes, {}, store=True, sizes=sizes, storage=storage)
            # a recomputed train-mode BN applies the statistics its forward saved (executor.program);
            # compiled, the recompute is fused into the backward kernels (executor.compiled)
            if not self.compiled:
                bwd_s += sum(times[n.name] * self._time(n) for n in nodes if n.name in times)
        else:
            fpk, keep = self._walk(nodes, {}, store=True)
        bpk, _ = self._store_backward(nodes, {}, retain=retain, extra=extra)
        gout = self._out(nodes[-1]) if not nodes[-1].alias else self._round(nodes[-1].out_bytes)
        return SegmentCost(keep=keep, fwd_peak=fpk, bwd_peak=keep + gout + bpk,
                           grad_bytes=self._grads(nodes), fwd_s=fwd_s, bwd_s=bwd_s,
                           detail={"saved": keep})

    def _recompute_effect(self, nodes, recompute: set):
        """What a store segment's ``recompute`` set changes, as the executor runs it
        (``executor.program``: nodes that produce or read a recomputed value run out of place; a
        saved tensor that is a recomputed node's output is replaced by a recipe that holds the
        node's inputs (recipes, or the tensors themselves); a backward that unpacks it recomputes
        it, and the recipe's own recomputed inputs, right then).

        Returns ``(sizes, storage, extra, retain, times)``: ``sizes`` and ``storage`` for
        :meth:`_walk` (each node's new bytes, storage owners, saved storages); ``extra`` per node,
        bytes its backward materialises on top of the captured profile; ``retain`` per node,
        bytes its backward no longer frees (a dropped tensor is freed in the forward pass
        already) or frees in addition (a tensor a recipe held); ``times`` per recomputed node,
        how often the backward recomputes it (:meth:`_saved_value`: which value a save is)."""
        names = {n.name for n in nodes}
        by = {n.name: n for n in nodes}
        touches = {n.name for n in nodes if n.name in recompute or any(u in recompute for u in n.inputs)}
        own: Dict[str, str] = {}  # storage owner when the touching nodes run out of place
        for n in nodes:
            if n.alias and n.inputs and n.name not in touches:
                own[n.name] = own.get(n.inputs[0], self._owner.get(n.inputs[0], n.inputs[0]))
            else:
                own[n.name] = n.name

        def size(o: str) -> int:
            return self._round(by[o].out_bytes) if o in by else 0

        def leaves(t: str) -> set:
            out = set()
            for u in by[t].inputs:
                out |= leaves(u) if u in recompute else {own.get(u, u)}
            return out

        mat_cache: Dict[str, int] = {}

        def mat_peak(t: str) -> int:
            """Bytes live while value ``t`` is recomputed (its recomputed inputs first)."""
            if t not in mat_cache:
                held, pk = 0, 0
                for u in dict.fromkeys(by[t].inputs):
                    if u in recompute:
                        pk = max(pk, held + mat_peak(u))
                        held += size(u)
                n = by[t]
                mat_cache[t] = max(pk, held + size(t) + self._round(n.fwd_work))
            return mat_cache[t]

        def recomputed(t: str, times: Dict[str, int]) -> None:
            times[t] = times.get(t, 0) + 1
            for u in dict.fromkeys(by[t].inputs):
                if u in recompute:
                    recomputed(u, times)

        plain_kept: Dict[str, str] = {}  # storage -> its first saver (freed after its backward)
        kept: Dict[str, str] = {}
        extra: Dict[str, int] = {}
        retain: Dict[str, int] = {}
        times: Dict[str, int] = {}
        for m in nodes:
            dropped = []
            for p in dict.fromkeys(m.saves + m.also_saves):
                o = self._owner.get(p, p)
                if o in names:
                    plain_kept.setdefault(o, m.name)
                t = self._saved_value(m, p)
                if t in recompute:
                    dropped.append(t)
                    for leaf in leaves(t):
                        if leaf in names:
                            kept.setdefault(leaf, m.name)
                else:
                    o2 = own.get(t, self._owner.get(t, t))
                    if o2 in names:
                        kept.setdefault(o2, m.name)
            if dropped:
                held, pk = 0, 0
                for t in dict.fromkeys(dropped):
                    pk = max(pk, held + mat_peak(t))
                    held += size(t)
                    recomputed(t, times)
                extra[m.name] = max(pk, held)
        for o, first in plain_kept.items():
            if o not in kept:  # freed in the forward pass now: its first saver frees nothing
                retain[first] = retain.get(first, 0) + size(o)
        for o, first in kept.items():
            if o not in plain_kept:  # held by a recipe (or an out-of-place copy), freed with it
                retain[first] = retain.get(first, 0) - size(o)
        sizes = {n.name: (size(n.name) if own[n.name] == n.name else 0) for n in nodes}
        return sizes, (own, set(kept)), extra, retain, times

    def _checkpoint(self, nodes) -> SegmentCost:
        fpk, out_keep = self._walk(nodes, {}, store=False)
        # the recompute (in backward) keeps only what the segment's ops save; the forward's
        # output is no longer live by then (the next segment's backward released it)
        rec_nodes, trimmed = self._recomputed(nodes)
        rec_pk, rec_keep = self._walk(rec_nodes, {}, store=True, keep_output=trimmed)
        bpk, _ = self._store_backward(nodes, {})
        gout = self._round(nodes[-1].out_bytes)
        fwd_s = sum(self._time(n, batch_stats=True) for n in nodes)
        bwd_s = fwd_s + sum(self._time(n, backward=True, batch_stats=True) for n in nodes)
        bwd = gout + max(rec_pk, rec_keep + bpk)
        return SegmentCost(keep=out_keep, fwd_peak=fpk, bwd_peak=bwd, grad_bytes=self._grads(nodes),
                           fwd_s=fwd_s, bwd_s=bwd_s, detail={"recompute_saved": rec_keep})

    @staticmethod
    def _recomputed(nodes):
        """The nodes a non-reentrant checkpoint recomputes: it stops as soon as the last saved
        tensor is packed, and autograd packs an op's inputs before running the op.  Returns the
        nodes and whether the last one's output stays live (saved by the op after it)."""
        j = max((i for i, n in enumerate(nodes) if n.saves or n.extra_saved), default=0)
        n = nodes[j]
        only_inputs = not n.extra_saved and all(p in n.inputs for p in n.saves)
        if only_inputs and j > 0:  # node j's inputs are packed, its output never made
            return nodes[:j], True
        return nodes[:j + 1], False

    def _rows(self, seg: Segment, nodes, loss: bool = False) -> SegmentCost:
        """A row segment's cost.  ``loss``: it evaluates the per-pixel loss in its strips (it is
        the last segment and makes the logits: :class:`lrcnn.executor.rows.RowLoss`)."""
        g = self.graph
        why = ""
        for n in nodes:
            if not n.rowwise:
                why = f"node {n.name} ({n.op}) cannot run in rows: {n.reason}"
                break
            if n.batch_stats and not ROWS_BATCH_STATS:
                why = f"node {n.name}: train-mode BatchNorm in row segments is not supported yet"
                break
        if why:
            return SegmentCost(supported=False, why=why, keep=1 << 62, fwd_peak=1 << 62, bwd_peak=1 << 62)
        source = g.source_of(seg.first).name
        names = [n.name for n in nodes]
        out = names[-1]
        bs = self._bn_structure(nodes)
        by, anc, bns = bs.by, bs.anc, bs.bns
        blevels = bs.bwd_levels
        levels = len(bs.fwd_levels)
        sched = self._row_schedule(seg, names, bs.cover)
        src = g[source]
        need_gx = g.index(seg.first) > 1  # (the executor's: the segment input requires grad)
        out_full = self._round(by[out].out_bytes)
        # the output map the forward assembles and keeps, and its gradient: none with the loss inside
        out_map = 0 if loss else out_full
        lo_node = g.output_node
        carries_total = 0
        fwd_peak = 0
        strip_bwd = 0
        fwd_s = bwd_s = 0.0
        p = self.profile
        # parameter gradients: strips run their backward last to first; the first strip that
        # reaches a parameter hands over its gradient, the second adds into a new tensor (the
        # sum), later ones add in place.  Per strip: the sums live before it, and the parameters
        # it reaches for the first time after that
        pgrad = {n: self._round(by[n].grad_bytes) for n in names if by[n].grad_bytes}
        seen: Dict[str, int] = {}
        acc_before: List[int] = [0] * sched.strips
        acc_new: List[int] = [0] * sched.strips
        for i in reversed(range(sched.strips)):
            acc_before[i] = sum(pgrad[n] for n in seen)
            reach = [n for n in pgrad if sched.rows[i][n].computed]
            acc_new[i] = max((pgrad[n] for n in reach if seen.get(n) == 1), default=0)
            for n in reach:
                seen[n] = seen.get(n, 0) + 1
        # per backward level (executor.rows.RowSegment.backward): its target BNs, the nodes whose
        # gradient a 2PS sweep carries (no BN with unknown constants below them), and the nodes
        # its backward runs through (below the targets)
        const_sweeps = []
        for lv, targets in enumerate(blevels):
            known = set().union(*blevels[:lv])
            carry_nodes = {n for n in names if all(b in known for b in bns if n in anc[b])}
            below_t = [n for n in nodes if n.name not in targets and any(t in anc[n.name] for t in targets)]
            const_sweeps.append((targets, carry_nodes, below_t))
        strip_const = 0
        memo: Dict[tuple, _StripCost] = {}

        def strip_costs(i: int, strip) -> _StripCost:
            """What strip ``i`` costs on its own (:class:`_StripCost`)."""
            comp = {n: strip[n].computed / max(1, by[n].height) for n in names}
            band = {n: (strip[n].hi - strip[n].lo) / max(1, by[n].height) for n in names}
            # (a node that computes no rows in this strip neither saves nor back-propagates)
            mem = {n: band[n] if strip[n].computed else 0.0 for n in names}
            sgraph, sizes = self._strip_graph(g, nodes, by, strip)
            walk = self._walk_plan(sgraph, mem, sizes=sizes)
            # forward (no grad): bands live until their last use; output rows copied into the map
            pk, fend = self._walk_run(walk, store=False)
            # the loss inside the strip (executor.rows.RowLoss) on the output rows it finishes: a
            # share of the captured cross-entropy's log-softmax and of its backward, and the
            # per-position losses (one value per logits row position, in the logits' dtype)
            oa, ob = sched.out[i]
            lsm = lmap = lb_peak = lb_net = 0
            if loss and ob > oa and strip[out].computed:
                f = (ob - oa) / max(1, by[out].height)
                lsm = self._round(lo_node.extra_saved * f)
                lmap = self._round(by[out].out_bytes / max(1, by[out].shape[1]) * f)
                lb_peak, lb_net = int(lo_node.bwd_peak * f), int(lo_node.bwd_net * f)
                pk = max(pk, fend + lsm + lmap)
            carry = 0
            if seg.policy == "2ps" and i + 1 < sched.strips:
                nxt = sched.rows[i + 1]
                carry = sum(self._round(by[n].out_bytes * (nxt[n].carried[1] - nxt[n].carried[0])
                                        / max(1, by[n].height)) for n in names)
            # backward: the strip's store-mode recompute, then its backward.  2PS (strips run
            # bottom to top): the gradients of the rows the strip below carried are autograd
            # roots on this strip's new rows, and this strip's carried rows are leaves whose
            # gradients (views of their whole band's gradient) are kept for the strip above
            roots, leaves, below = (), {}, {}
            pend = 0
            if seg.policy == "2ps":
                leaves = self._carry_grads(by, sched, i)
                if i + 1 < sched.strips:
                    below = self._carry_grads(by, sched, i + 1)
                    pend = sum(below.values())
                    roots = [n for n in below if strip[n].computed]
            # (the same tensors as the forward's; ``keep`` adds the roots to what stays live)
            rpk, rkeep = self._walk_run(walk, store=True, keep=roots)
            # (the loss's forward after the recompute: it saves the log-softmax rows)
            rpk, rkeep = max(rpk, rkeep + lsm + lmap), rkeep + lsm
            # training-mode BN in strips (executor.rows._BNStrip, an autograd root through a
            # scalar token): its backward holds xhat next to the input gradient (one band of the
            # rows it computes; the constant part of the rows it owns is made in place on xhat),
            # where the captured BN backward makes the input gradient only
            bnx = {b: sizes[b] * (1 + BN_HALF_BWD * self._half_bn(by[b])) for b in bns}
            # (only the last sweep makes the gradient of the strip's input band)
            part_gx = self._partial_reads(g, nodes, by, strip, sizes, source if need_gx else None)
            part = {n: [e for e in v if e[0] != source] for n, v in part_gx.items()}
            # the segment output's rows are the strip's autograd root and their gradient a view
            # of the output gradient map: both live through the strip's whole backward, where the
            # captured profile frees the output's incoming gradient (and its output, if its own
            # op saved it) after the output node's backward
            # (with the loss inside: the gradient of the rows is the loss backward's own tensor,
            # which the output node's backward frees as the captured profile does)
            if ob > oa and strip[out].computed:
                saved_self = any(self._owner.get(q, q) == self._owner[out] for q in by[out].saves)
                rows_b = self._round(by[out].out_bytes / max(1, by[out].height) * (ob - oa))
                leaves = dict(leaves)
                leaves[out] = (leaves.get(out, 0) + (0 if loss else rows_b)
                               + (min(rows_b, sizes[out]) if saved_self else 0))
            bpk, bnet = self._store_backward(nodes, mem, retain=leaves, extra=bnx, partial=part_gx)
            # the loss's backward runs first (from the strip's loss sum to its logits rows)
            bpk, bnet = max(lb_peak, lb_net + bpk), lb_net + bnet
            # the gradient-constant sweeps before it (executor.rows.RowSegment.backward), one per
            # backward level: the same recompute, with the level's target BNs' input and output
            # rows held; the backward runs only below the targets (their dy is the result), makes
            # no parameter gradients and no input gradient map; 2PS carries only the gradients
            # of nodes with no unknown BN below them
            const = 0
            for targets, carry_nodes, below_t in const_sweeps:
                leaves_c = {n: v for n, v in leaves.items() if n in carry_nodes}
                below_c = {n: v for n, v in below.items() if n in carry_nodes}
                roots_c = [n for n in below_c if strip[n].computed]
                held = [t for t in targets if strip[t].computed]
                cpk, ckeep = self._walk_run(walk, store=True, keep=roots_c + held)
                cpk, ckeep = max(cpk, ckeep + lsm + lmap), ckeep + lsm
                cbpk, _ = self._store_backward(below_t, mem, retain=leaves_c, extra=bnx, partial=part,
                                               params=False)
                cbpk = max(lb_peak, lb_net + cbpk)
                const = max(const, sum(below_c.values()) + max(cpk, ckeep + cbpk))
            # the first strip through a layer finds its weights cold, later strips warm
            w = i > 0
            f_s = sum(self._time(by[n], comp[n], warm=w) for n in names)
            b_s = sum(self._time(by[n], band[n], warm=w) + self._time(by[n], band[n], backward=True, warm=w)
                      for n in names)
            return _StripCost(fwd_peak=pk, carry=carry, rec_peak=rpk, rec_keep=rkeep, bwd_peak=bpk, bwd_net=bnet,
                              pending=pend, const_peak=const, fwd_s=f_s, bwd_s=b_s)

        kept, recon = self._carries_kept(by, sched) if seg.policy == "2ps" else ([0] * sched.strips,) * 2
        for i, strip in enumerate(sched.rows):
            # strips alike in every relative row position cost the same (interior strips)
            key = self._strip_key(nodes, by, sched, i)
            c = memo.get(key)
            if c is None:
                c = memo[key] = strip_costs(i, strip)
            # (forward: the rows carried into the next strip are a new band; the rows of it no
            # earlier strip kept stay for the backward)
            fwd_peak = max(fwd_peak, out_map + carries_total + c.fwd_peak + c.carry)
            carries_total += kept[i]
            strip_const = max(strip_const, recon[i] + c.const_peak)
            # during the strip's backward, then while its parameter gradients are summed
            strip_bwd = max(strip_bwd, acc_before[i] + recon[i] + c.pending + max(c.rec_peak, c.rec_keep + c.bwd_peak),
                            acc_before[i] + recon[i] + c.rec_keep + c.bwd_net + acc_new[i])
            fwd_s += c.fwd_s
            bwd_s += c.bwd_s
        bn_s, bn_state, stat_s = 0.0, 0, 0.0
        if levels:
            passes, _ = self._bn_stat_passes(seg, bs, sched, layerwise=False)
            for rows in passes:  # statistics by strip sweeps (one per level)
                stat_s += sum(self._time(by[n], r / max(1, by[n].height)) for n, r in rows.items())
            bn_s = stat_s + levels * bwd_s  # one gradient-constant sweep per level: recompute + backward
            bn_state = self._bn_state(bs)
        grads = self._grads(nodes)
        gx = self._round(src.out_bytes) if need_gx else 0
        gy = out_map  # (with the loss inside: a scalar)
        keep = out_map + carries_total + bn_state
        bwd_peak = carries_total + bn_state + gy + max(gx + strip_bwd, strip_const)
        return SegmentCost(keep=keep, fwd_peak=fwd_peak + bn_state, bwd_peak=bwd_peak, grad_bytes=grads,
                           fwd_s=fwd_s + p.launch_s * sched.strips,
                           bwd_s=bwd_s + bn_s + p.launch_s * sched.strips * (1 + levels),
                           detail={"strips": sched.strips, "carries": carries_total, "bn_levels": levels,
                                   "bn_extra_s": bn_s, "bn_stat_s": stat_s, "out_full": out_map,
                                   "bn_state": bn_state, "strip_bwd": strip_bwd, "loss_in_rows": int(loss)})

    @staticmethod
    def _half_bn(n) -> int:
        """1 for a node whose output is half precision (2 bytes an element; under autocast), else 0:
        executor.rows normalises and differentiates such a BatchNorm's rows in float32."""
        return int(n.out_bytes == 2 * math.prod(n.shape)) if n.batch_stats else 0

    def _strip_key(self, nodes, by, sched, i: int) -> tuple:
        """Every row position strip ``i``'s costs depend on, relative to the strip itself: per
        node its computed, needed and carried rows, per edge where the node's rows (or the input
        rows its window reads, border padding included) lie in its input's, the same of the next
        two strips against the strip before them (2PS carries), the output rows, and whether the
        strip is the first (cold weights).  Two strips with equal keys cost the same
        (:meth:`_rows` prices one and reuses it)."""

        parts: List = [i > 0]
        for k in range(i, min(i + 3, sched.strips) if sched.policy == "2ps" else i + 1):
            rows = sched.rows[k]
            nxt = sched.rows[k + 1] if k + 1 < sched.strips else None
            for n in nodes:
                r = rows[n.name]
                b = r.start
                parts.append((r.hi - b, r.lo - b))
                if nxt is not None:
                    q = nxt[n.name]
                    parts.append((q.lo - b, min(q.start, q.hi) - b))
                for u in n.inputs:
                    ru = rows[u]
                    # (the segment input: where the rows read lie in the strip's input band)
                    base, top = (ru.start, ()) if u in by else (ru.lo, (ru.hi - ru.lo,))
                    if n.kind == _ops.SPATIAL and n.geom is not None:
                        ir = input_rows(n.geom, r.start, r.hi, self.graph[u].height)
                        parts.append((ir.lo - base, ir.hi - base, ir.pad_top, ir.pad_bottom) + top)
                    else:
                        parts.append((r.start - base, r.hi - base) + top)
        rows = sched.rows[i]
        oa, ob = sched.out[i]
        last = nodes[-1].name
        parts.append((oa - rows[last].start, ob - rows[last].start))
        return tuple(parts)

    def _bn_structure(self, nodes) -> _BNStructure:
        """Training-mode BNs of a row segment (:class:`_BNStructure`)."""
        by = {n.name: n for n in nodes}
        names = [n.name for n in nodes]
        anc = segment_ancestors(names, {n.name: n.inputs for n in nodes})
        bns = [n.name for n in nodes if n.batch_stats]
        fwd, bwd = bn_levels(bns, anc)
        return _BNStructure(by=by, anc=anc, bns=bns, fwd_levels=fwd, bwd_levels=bwd,
                            cover=bn_cover(names, bns, anc) if bns else [])

    def _row_schedule(self, seg: Segment, names: List[str], cover: Sequence[str]):
        """The strip schedule of row segment ``seg`` (its nodes ``names``), as the executor builds
        it: the plan's bounds, or its strip count (at most the segment's maximum) split evenly."""
        source = self.graph.source_of(seg.first).name
        if seg.bounds:
            bounds = list(seg.bounds)
        else:
            count = min(seg.strips, max_strips(self.rg, source, names[-1], seg.policy))
            bounds = default_bounds(self.rg, source, names[-1], seg.policy, count)
        return strip_schedule(self.rg, source, names, bounds, seg.policy, cover)

    def _bn_stat_passes(self, seg: Segment, bs: _BNStructure, sched=None,
                        layerwise: bool = False) -> Tuple[Tuple[Dict[str, int], ...], int]:
        """The no-grad statistics passes of a row segment's training-mode BNs (as
        ``executor.rows.RowSegment._statistics`` runs them): per pass the rows it computes per node
        (nodes that compute none left out), and the bytes the passes hold beyond a forward strip's.

        Strip sweeps (``sched``: the segment's strip schedule): one pass per forward level through
        the ancestors of that level's BNs; with one strip, one pass through every BN and its
        ancestors; no transient.  ``layerwise``: one pass over the whole map (the executor's
        one-strip OverL schedule), its tensors as a strip makes them, border padding copies of
        spatial ops' inputs included: the peak of that pass is its transient."""
        if not bs.bns:
            return (), 0
        names = list(bs.by)
        if layerwise:
            g = self.graph
            one = full_map_schedule(self.rg, g.source_of(seg.first).name, names, bs.cover)
            sgraph, sizes = self._strip_graph(g, [bs.by[n] for n in bs.cover], bs.by, one.rows[0])
            pk, _ = self._walk(sgraph, {}, store=False, sizes=sizes)
            return ({n: one.computed_rows(n) for n in bs.cover if one.computed_rows(n)},), pk
        if sched.strips == 1:
            actives = [set(bs.cover)]
        else:
            actives = [set().union(*(bs.anc[b] for b in lv)) for lv in bs.fwd_levels]
        computed = {n: sched.computed_rows(n) for n in names}
        return tuple({n: computed[n] for n in names if n in active and computed[n]} for active in actives), 0

    def _bn_state(self, bs: _BNStructure) -> int:
        """Bytes a row segment keeps from forward to backward for its training-mode BNs: 4
        per-channel vectors each (statistics in float32 at least, as executor.rows keeps them for
        half-precision maps)."""
        return sum(4 * self._round(bs.by[b].shape[1] * max(4, self._esize)) for b in bs.bns)

    def bn_cost(self, seg: Segment) -> BNRowCost:
        """The extra sweeps, rows per node and bytes of row segment ``seg``'s training-mode
        BatchNorm handling for one step, at the captured shape (:class:`BNRowCost`); the time and
        memory :meth:`segment` predicts for it are built from the same passes and bytes."""
        if seg.mode != "rows":
            raise CostError(f"segment {seg.first}..{seg.last}: bn_cost prices row segments, not {seg.mode!r}")
        nodes = self.graph.span(seg.first, seg.last)
        bs = self._bn_structure(nodes)
        strategy = (seg.options or {}).get("bn", "sweeps")
        if not bs.bns:
            return BNRowCost(strategy=strategy, stat_passes=(), grad_sweeps=0, grad_rows={}, transient_bytes=0,
                             state_bytes=0)
        sched = self._row_schedule(seg, list(bs.by), bs.cover)
        passes, transient = self._bn_stat_passes(seg, bs, sched, layerwise=strategy == "layerwise")
        levels = len(bs.bwd_levels)
        grad_rows = {n: levels * sched.computed_rows(n) for n in bs.by if sched.computed_rows(n)}
        return BNRowCost(strategy=strategy, stat_passes=passes, grad_sweeps=levels, grad_rows=grad_rows,
                         transient_bytes=int(transient), state_bytes=self._bn_state(bs))

    def _layerwise(self, seg: Segment, nodes, base: SegmentCost) -> SegmentCost:
        """The ``options.bn = layerwise`` variant of a row segment: one full-map no-grad pass
        finds every BN's statistics (faster than per-level strip sweeps, but the largest live set
        of full maps is a forward transient)."""
        bs = self._bn_structure(nodes)
        if not bs.bns or not base.supported:
            return base
        (rows,), pk = self._bn_stat_passes(seg, bs, layerwise=True)
        stat_s = sum(self._time(bs.by[n], r / max(1, bs.by[n].height)) for n, r in rows.items())
        d = dict(base.detail)
        # (the pass runs before the segment's first strip: the output map does not exist yet)
        return SegmentCost(keep=base.keep, fwd_peak=max(base.fwd_peak, pk + d["bn_state"]),
                           bwd_peak=base.bwd_peak, grad_bytes=base.grad_bytes, fwd_s=base.fwd_s,
                           bwd_s=base.bwd_s - d["bn_stat_s"] + stat_s, detail={**d, "bn_stat_s": stat_s})

    def _carries_kept(self, by, sched) -> Tuple[List[int], List[int]]:
        """2PS: per strip, the bytes of the carried rows its forward keeps for the backward (the
        rows carried into the next strip that no earlier strip kept: executor.rows.Carries keeps
        each row once), and the bytes its backward makes to hand the strip its carried rows
        again (a concatenation, where they span rows kept by two or more strips)."""
        kept, recon = [0] * sched.strips, [0] * sched.strips
        done: Dict[str, int] = {}
        starts: Dict[str, List[int]] = {}
        for i in range(sched.strips):
            for n, r in sched.rows[i].items():
                c0, c1 = r.carried
                if c1 <= c0 or n not in by:
                    continue
                row = by[n].out_bytes / max(1, by[n].height)
                new0 = max(c0, done.get(n, c0))
                if new0 < c1:
                    starts.setdefault(n, []).append(new0)
                    done[n] = c1
                    if i > 0:
                        kept[i - 1] += self._round(row * (c1 - new0))
                if sum(1 for a in starts.get(n, ()) if c0 < a < c1) or (new0 > c0 and new0 < c1):
                    recon[i] += self._round(row * (c1 - c0))
        return kept, recon

    def _carry_grads(self, by, sched, i: int) -> Dict[str, int]:
        """2PS backward of strip ``i``: bytes the gradient of each carried node's rows holds.

        The gradient of carried rows is a view of the gradient of the node's whole band (the
        carried rows concatenated with the new ones), so it holds that band's bytes, unless the
        executor adds the strip below's pending gradient to it (then it is a compact copy)."""
        out: Dict[str, int] = {}
        strip = sched.rows[i]
        below = sched.rows[i + 1] if i + 1 < sched.strips else None
        for n, r in strip.items():
            c0, c1 = r.carried
            if c1 <= c0 or n not in by:
                continue
            row = by[n].out_bytes / max(1, by[n].height)
            rows = r.hi - c0
            if below is not None:
                b0, b1 = below[n].carried
                if b1 > b0 and max(b0, c0) < min(b1, c1):
                    rows = c1 - c0
            out[n] = self._round(row * rows)
        return out

    def _strip_graph(self, g, nodes, by, strip):
        """The tensors one strip makes, as a graph :meth:`_walk` follows (with its ``sizes``).

        Per node: its newly computed rows (named as the node); for a 2PS node with carried rows
        the band its consumers read, the carried rows concatenated with the new ones
        (``node#cat``); for a spatial op on a border strip the padded copy of its input it reads
        (``node#pad``, before the node).  What each op saves is mapped onto these tensors the way
        the executor's strip ops make them: an op saves the band (or padded copy) it read, and an
        op that saves its own output (ReLU, in place in the full model) saves its new rows.
        The same graph serves a strip's forward, recompute and gradient-constant sweeps (what
        each keeps live besides: :meth:`_walk`'s ``keep``).  Returns (the graph, ``sizes``).
        """

        out: List[_StripNode] = []
        sizes: Dict[str, int] = {}
        band_key: Dict[str, str] = {}
        for n in nodes:
            name = n.name
            r = strip[name]
            row = n.out_bytes / max(1, n.height)
            ins = [band_key.get(u, u) for u in n.inputs]
            pad = None
            if n.kind == _ops.SPATIAL and n.geom is not None and r.computed:
                u = g[n.inputs[0]]
                ir = input_rows(n.geom, r.start, r.hi, u.height)
                if ir.pad_top or ir.pad_bottom:  # border strip: the op reads a padded copy
                    pad = name + "#pad"
                    sizes[pad] = self._round(u.out_bytes / max(1, u.height)
                                             * (ir.hi - ir.lo + ir.pad_top + ir.pad_bottom))
                    out.append(_StripNode(pad, [ins[0]]))
                    # the band it copied stays live until the op has run (the executor drops its
                    # strip's values after each node, not inside the op)
                    ins = [pad] + ins[1:] + [ins[0]]
            saves = []
            for q in n.saves + n.also_saves:
                u = self._saved_value(n, q)
                if u == name:
                    saves.append(name)  # its own output (out of place in a strip)
                else:
                    saves.append(pad if (pad is not None and u == n.inputs[0]) else band_key.get(u, u))
            extra, fixed = n.extra_saved, n.extra_fixed
            if n.extra_input:  # (a cast copy of the input: the band it read, pad rows included)
                spatial = n.kind == _ops.SPATIAL and n.geom is not None and r.computed  # (ir made above)
                in_rows = ir.hi - ir.lo + ir.pad_top + ir.pad_bottom if spatial else r.hi - r.lo
                share = self._round(n.extra_input * in_rows / max(1, g[n.inputs[0]].height))
                extra, fixed = extra - n.extra_input + share, fixed + share
            if n.alias and extra:  # an in-place op keeps a copy of its input; out of place, the input
                saves.append(band_key.get(n.inputs[0], n.inputs[0]))
                extra = 0
            # a half-precision map's BN normalises its rows in float32 (one float32 temporary)
            work = n.fwd_work + (n.out_bytes * BN_HALF_FWD * self._half_bn(n) if n.batch_stats else 0)
            if isinstance(n.geom, ResizeGeom) and r.computed:
                # executor.strips interpolates a band along H first (its rows at the input's width:
                # one band, bilinear three: the two taps and their sum) and then along W
                u = g[n.inputs[0]]
                work += self._round(u.out_bytes / max(1, u.height) * r.computed * (3 if n.geom.mode == "bilinear" else 1))
            out.append(_StripNode(name, ins, saves, extra, work, fixed if extra else 0))
            sizes[name] = self._round(row * r.computed) if r.computed else 0
            c0, c1 = r.carried
            if c1 > c0 and r.computed:  # 2PS: carried rows concatenated with the new ones
                cat = name + "#cat"
                sizes[cat] = self._round(row * (r.hi - c0))
                out.append(_StripNode(cat, [name]))
                band_key[name] = cat
        return out, sizes

    # -- composition ------------------------------------------------------------------------------
    def compose(self, costs: Sequence[SegmentCost]) -> Dict[str, float]:
        """Phase peaks (absolute bytes) and step time of segments covering the whole graph."""
        fixed = self.fixed_bytes()
        grads = [c.grad_bytes for c in costs]
        total_grad = sum(grads)
        fwd = bwd = 0
        kept = 0
        later = total_grad
        for c in costs:
            later -= c.grad_bytes
            fwd = max(fwd, kept + c.fwd_peak)
            bwd = max(bwd, kept + later + c.bwd_peak)
            kept += c.keep
        out = self.graph.output_node
        loss = self.loss_bytes()
        if not (costs and costs[-1].detail.get("loss_in_rows")):  # (else: inside the last segment's strips)
            fwd = max(fwd, kept + loss)  # the loss's forward, on the logits kept
            # the loss's own backward, before the model's: the logits, which no op saved, are gone
            bwd = max(bwd, kept - self._logits_freed() + loss + out.bwd_peak)
        phases = {"forward": fixed + fwd, "backward": fixed + bwd,
                  "optimizer": fixed + total_grad + self.optimizer_peak()}
        opt_s = self.optimizer_time()
        phases["peak"] = max(phases["forward"], phases["backward"], phases["optimizer"])
        phases["time_s"] = sum(c.fwd_s + c.bwd_s for c in costs) + opt_s
        return phases

    def cover(self, segments: Sequence[Segment]) -> List[Segment]:
        """The plan's segments plus store segments for every node no segment covers."""
        g = self.graph
        out: List[Segment] = []
        pos = 1
        for s in sorted(segments, key=lambda s: g.index(s.first)):
            a = g.index(s.first)
            if a > pos:
                out.extend(self._gap(pos, a - 1))
            out.append(s)
            pos = g.index(s.last) + 1
        if pos < len(g.nodes) - 1:
            out.extend(self._gap(pos, len(g.nodes) - 2))
        return out

    def _gap(self, a: int, b: int) -> List[Segment]:
        """Store segments over nodes ``a..b`` (indices) that no plan segment covers: one, unless
        more than one tensor it makes is read after it (a tensor passing over the plan segment
        that follows); then pieces each of which leaves one tensor (its last node's) to the nodes
        after it, as :meth:`_walk` prices a segment (it frees any other tensor after its last use
        inside)."""
        g = self.graph
        last_read = g.read_indices()[0]
        if max(last_read[a:b], default=-1) <= b:
            return [Segment(g.nodes[a].name, g.nodes[b].name, "store")]
        pieces, start, reach = [], a, -1  # (reach: the last read of what this piece made so far)
        for k in range(a, b):
            if reach <= k:  # the piece start..k leaves k's output only
                pieces.append([start, k, reach])
                start, reach = k + 1, -1
            else:
                reach = max(reach, last_read[k])
        pieces.append([start, b, reach])
        merged = [pieces[0]]  # as few pieces as keep the rule
        for p, q, r in pieces[1:]:
            prev = merged[-1]
            # merged with the piece before, what that piece made must not be read after q
            if max(prev[2], last_read[prev[1]]) <= q:
                merged[-1] = [prev[0], q, max(prev[2], last_read[prev[1]], r)]
            else:
                merged.append([p, q, r])
        return [Segment(g.nodes[p].name, g.nodes[q].name, "store") for p, q, _ in merged]

    def predict(self, plan: Union[Plan, Sequence[Segment]]) -> dict:
        """The ``predicted`` block of a plan: peak, phases, per-segment costs, breakdown, time."""
        segs = plan.segments if isinstance(plan, Plan) else list(plan)
        inside = bool(plan.training.get("loss_in_rows")) if isinstance(plan, Plan) else self.loss_in_rows
        full = self.cover(segs)
        costs = [self.segment(s, inside) for s in full]
        bad = [(s, c) for s, c in zip(full, costs) if not c.supported]
        if bad:
            s, c = bad[0]
            raise PlanError(f"segment {s.first}..{s.last}: {c.why}")
        ph = self.compose(costs)
        fb = self.fixed_breakdown()
        plan_idx = {(s.first, s.last): i for i, s in enumerate(segs)}
        seg_rows = []
        fixed, kept, later = self.fixed_bytes(), 0, sum(c.grad_bytes for c in costs)
        for s, c in zip(full, costs):
            later -= c.grad_bytes
            if (s.first, s.last) in plan_idx:
                # absolute peaks while the segment runs (what a measurement of its window sees)
                seg_rows.append({"index": plan_idx[(s.first, s.last)], "first": s.first, "last": s.last,
                                 "mode": s.mode, "keep": int(c.keep),
                                 "forward_peak": int(fixed + kept + c.fwd_peak),
                                 "backward_peak": int(fixed + kept + later + c.bwd_peak),
                                 "grad_bytes": int(c.grad_bytes), "forward_s": c.fwd_s, "backward_s": c.bwd_s})
            kept += c.keep
        acts = int(max(ph["forward"], ph["backward"]) - sum(fb.values()))
        return {
            "peak_bytes": int(ph["peak"]), "reserved_bytes": self.profile.reserved_for(ph["peak"]),
            "time_s": float(ph["time_s"]), "device_profile": self.profile.name,
            "phases": {k: int(ph[k]) for k in ("forward", "backward", "optimizer")},
            "segments": seg_rows,
            "breakdown": {"params": fb["params"] + fb["buffers"], "grads": sum(c.grad_bytes for c in costs),
                          "optimizer": fb["optimizer"], "input": fb["input"],
                          "activations": acts, "workspace": fb["workspace"]},
        }


def check_profile(profile: str) -> None:
    """Load ``profile`` once to check it; an unknown name or a broken file is one :class:`CostError`."""
    try:
        load_profile(profile)
    except (LrcnnError, OSError):  # CostError: already one line naming the fix
        raise
    except Exception as e:  # KeyError and friends: one line
        text = " ".join(str(e).split()) or type(e).__name__
        raise CostError(f"unknown device profile {profile!r} ({text}); give a profile name or a JSON file") from None
