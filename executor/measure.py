"""Measure one training step of a model, with or without a plan, real or simulated (fake tensors).

``step_memory`` is what benchmarks and tests call: it builds the inputs, runs forward, loss and
backward under :func:`lrcnn.models.memory.measure_step` and returns the :class:`MemoryReport`
(phases ``forward``, ``backward``).  Peak = new live tensor bytes during the step: activations,
parameter gradients and transients; parameters and the input batch existed before and are not
counted.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lrcnn.errors import UsageError
from lrcnn.models import memory
from lrcnn.models.capture import amp_dtype
from lrcnn.models.loss import cross_entropy, synthetic_target
from lrcnn.planner.plan import OPTIMIZERS


def _classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 10


def _target(model: nn.Module, input_shape: Sequence[int], device,
            logits_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The class-index target of a step of ``model``: per pixel for dense logits (``logits_shape``
    when given, else a planned module's captured output, ``model.graph``), else one class per
    sample."""
    graph = getattr(model, "graph", None)
    if logits_shape is None and graph is not None:
        logits_shape = graph.output_node.shape
    if logits_shape is not None and len(logits_shape) > 2:
        return synthetic_target(logits_shape, device=device)
    return torch.randint(0, _classes(model), (input_shape[0],), device=device)


def step_memory(model: nn.Module, input_shape: Sequence[int], fake: bool = True,
                dtype: torch.dtype = torch.float32, device: Optional[str] = None,
                input_grad: bool = False) -> memory.MemoryReport:
    """Peak memory of one training step of ``model`` (a plain model or ``apply_plan``'s result).

    ``fake=True`` runs the very same code under ``FakeTensorMode`` (no real memory, any size);
    ``fake=False`` runs it for real on ``device`` (CPU: storage accounting; CUDA: allocator stats).
    """
    model.zero_grad(set_to_none=True)
    if fake:
        if device is None:  # a model built on the meta device is simulated on "meta"
            first = next(iter(model.parameters()), None)
            device = "meta" if first is not None and first.is_meta else None
        with memory.fake_mode():
            state = memory.fake_state(model)
            x = torch.randn(*input_shape, dtype=dtype, device=device)
            y = _target(model, input_shape, device)
            if input_grad:
                x.requires_grad_(True)

            def step():
                out = torch.func.functional_call(model, state, (x,))
                loss = cross_entropy(out, y)
                memory.mark("forward")
                loss.backward()
                memory.mark("backward")

            return memory.measure_step(step, device=device)
    x = torch.randn(*input_shape, dtype=dtype, device=device, requires_grad=input_grad)
    y = _target(model, input_shape, device)

    def step():
        out = model(x)
        loss = cross_entropy(out, y)
        memory.mark("forward")
        loss.backward()
        memory.mark("backward")

    try:
        return memory.measure_step(step, device=device)
    finally:
        model.zero_grad(set_to_none=True)


DEFAULT_LR = {"sgd": 0.01, "momentum": 0.01, "adam": 1e-3, "adamw": 1e-3}


def make_optimizer(params, name: str, lr: Optional[float] = None, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer a plan's ``training.optimizer`` names (``momentum``: SGD with momentum),
    at learning rate ``lr`` (default :data:`DEFAULT_LR` of the optimizer).

    PyTorch's default implementation choice (single-tensor loops on CPU, ``foreach`` on CUDA),
    which is what the cost model's optimizer transient assumes.
    """
    params = list(params)
    if lr is None and name in DEFAULT_LR:
        lr = DEFAULT_LR[name]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def autocast(device_type: str, amp: Optional[str]):
    """``torch.autocast`` on ``device_type`` in the dtype ``amp`` names (``"bf16"``/``"fp16"``),
    a no-op context for ``amp=None``."""

    dtype = amp_dtype(amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def grad_scaler(device_type: str, amp: Optional[str]):
    """The ``torch.amp.GradScaler`` an ``amp`` step needs: one for float16 (whose gradients
    underflow without loss scaling), ``None`` for bfloat16 and float32 steps."""
    return torch.amp.GradScaler(device_type) if amp == "fp16" else None


def train_step(forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               amp: Optional[str] = None, scaler=None, loss_inside: bool = False) -> torch.Tensor:
    """One training step (cross-entropy, per pixel for dense logits: :func:`lrcnn.models.loss.cross_entropy`) marking its phases ``forward``, ``backward``,
    ``optimizer`` for :mod:`lrcnn.models.memory`; the gradients are released at the end
    (``zero_grad(set_to_none=True)``), so every step starts without them.  Returns the loss.

    ``amp``: forward and loss under :func:`autocast` in that dtype (backward and optimizer step
    outside it, as PyTorch's recipe has it); ``scaler``: a ``GradScaler`` scales the loss, unscales
    and checks the gradients before the optimizer step and updates its scale.  ``loss_inside``:
    ``forward(x, y)`` returns the loss itself (a planned module applied with ``loss=``, which
    evaluates it inside its last row segment)."""
    with autocast(x.device.type, amp):
        loss = forward(x, y) if loss_inside else cross_entropy(forward(x), y)
    memory.mark("forward")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    memory.mark("backward")
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    memory.mark("optimizer")
    return loss.detach()


def opt_state(opt: torch.optim.Optimizer) -> list:
    """The optimizer's state tensors (momentum buffers, Adam moments): pre-existing bytes of a step."""
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def train_step_memory(model: nn.Module, input_shape: Sequence[int], optimizer: str = "sgd",
                      fake: bool = True, dtype: torch.dtype = torch.float32,
                      device: Optional[str] = None, warmup: int = 1,
                      amp: Optional[str] = None, reserved: bool = False,
                      logits_shape: Optional[Sequence[int]] = None) -> memory.MemoryReport:
    """Absolute peak device bytes of one whole training step, as the cost model predicts it.

    Counts everything live: parameters, buffers, optimizer state, input batch and labels,
    activations, gradients and transients, through one :func:`train_step`.  ``warmup`` steps run first (optimizer state then exists).
    Phases in the report: ``forward`` (model + loss), ``backward``, ``optimizer``.
    ``fake=True`` runs the same code under ``FakeTensorMode`` (any size, no memory).  ``amp``: the
    step's forward and loss under autocast in that dtype (:func:`train_step`); a model on the meta
    device is then simulated with fake CPU tensors, where CPU autocast applies.  ``reserved``: also
    model the CUDA caching allocator's reserved peak on the step's allocation sequence
    (:func:`lrcnn.models.memory.measure_step`).  ``logits_shape``: the model's output shape, for a
    plain dense model (a planned one knows its own): the target is then per pixel.  A planned module
    applied with ``loss=`` is stepped as ``loss = model(x, target)`` (its loss inside its last row
    segment).
    """
    inside = getattr(model, "row_loss", None) is not None
    ctx = memory.fake_mode() if fake else None
    if ctx is not None:
        ctx.__enter__()
    try:
        if fake:
            if device is None:
                first = next(iter(model.parameters()), None)
                device = "meta" if first is not None and first.is_meta else None
            if amp is not None and device == "meta":
                device = "cpu"
            state = memory.fake_state(model, device=device if amp is not None else None)
            params = [v for v in state.values() if isinstance(v, torch.Tensor) and v.requires_grad]

            def run(x, y=None):
                return torch.func.functional_call(model, state, (x,) if y is None else (x, y))
            existing = list(state.values())
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            run = model
            existing = [model]
        opt = make_optimizer(params, optimizer)
        x = torch.randn(*input_shape, dtype=dtype, device=device)
        y = _target(model, input_shape, device, logits_shape)

        opt.zero_grad(set_to_none=True)  # gradients are made by the step, not pre-existing
        for _ in range(warmup):
            train_step(run, opt, x, y, amp, loss_inside=inside)
        return memory.measure_step(lambda: train_step(run, opt, x, y, amp, loss_inside=inside), device=device,
                                   track_existing=existing + [x, y] + opt_state(opt), reserved=reserved)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------
# One step measured for the run records: a memory timeline or mark-to-mark times
# ------------------------------------------------------------------------------------------------

class Clock(memory.Meter):
    """Time stamps at every :func:`memory.mark` (no memory): perf_counter, or CUDA events."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.cuda = device.type == "cuda"
        self.stamps: list = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def mark(self, label: str) -> None:
        self.timeline.append((label, 0, 0))
        self.stamps.append(self._now())

    def __enter__(self) -> "Clock":
        self._start(0)
        self.t0 = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def seconds(self) -> List[float]:
        """Seconds since entry at each mark."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.t0.elapsed_time(e) / 1e3 for e in self.stamps]
        return [s - self.t0 for s in self.stamps]


@dataclass
class StepMeasure:
    """Timeline of one step: ``(label, live_bytes, peak_bytes_since_previous, t_seconds)``; memory
    steps also carry the CUDA caching allocator's reserved peak (absolute): ``reserved`` (measured
    on CUDA, modeled elsewhere: ``reserved_method`` ``'cuda'`` / ``'model'``) and
    ``modeled_reserved`` (the allocator model on the step's storages, on CUDA too)."""

    entries: List[Tuple[str, float, float, float]]
    start_live: float = math.nan   # absolute live bytes at the step start (memory steps)
    reserved: float = math.nan
    modeled_reserved: float = math.nan
    reserved_method: str = ""

    def _index(self, label: str) -> Optional[int]:
        for i, e in enumerate(self.entries):
            if e[0] == label:
                return i
        return None

    def span(self, begin: Optional[str], end: str, fallback_end: Optional[str] = None):
        """``(peak, seconds)`` between the mark ``begin`` (exclusive; None = step start) and
        ``end`` (inclusive; ``fallback_end`` when ``end`` never fired); NaN when absent."""
        i = -1 if begin is None else self._index(begin)
        j = self._index(end)
        if j is None and fallback_end is not None:
            j = self._index(fallback_end)
        if i is None or j is None or j <= i:
            return math.nan, math.nan
        peak = max(e[2] for e in self.entries[i + 1: j + 1])
        t0 = 0.0 if i < 0 else self.entries[i][3]
        return peak, self.entries[j][3] - t0


def measure_memory_step(model, opt, x, y, device: torch.device, amp: Optional[str] = None,
                        scaler=None, loss_inside: bool = False) -> Tuple[StepMeasure, float, str]:
    """One step under the memory meter (absolute bytes: the pre-existing parameters, optimizer
    state and batch included), with the reserved peak (:class:`StepMeasure`).  ``amp``, ``scaler``,
    ``loss_inside``: see :func:`lrcnn.executor.measure.train_step`.  Returns (timeline, loss, method)."""
    state = opt_state(opt)
    loss = []
    t0 = time.perf_counter()
    rep = memory.measure_step(lambda: loss.append(train_step(model, opt, x, y, amp, scaler, loss_inside)), device=device,
                              track_existing=[model, state, x, y], reserved=True)
    wall = time.perf_counter() - t0  # includes the tracker's overhead: flagged tracked=True
    b = rep.baseline_bytes
    entries = [(lab, float(live + b), float(peak + b), math.nan) for lab, live, peak in rep.timeline]
    if entries:
        lab, live, peak, _ = entries[-1]
        entries[-1] = (lab, live, peak, wall)
    num = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return (StepMeasure(entries, float(b), num(rep.reserved_bytes), num(rep.modeled_reserved_bytes), rep.reserved_method),
            float(loss[0]), rep.method)


def measure_time_step(model, opt, x, y, device: torch.device, amp: Optional[str] = None,
                      scaler=None, loss_inside: bool = False) -> Tuple[StepMeasure, float]:
    clock = Clock(device)
    with clock:
        loss = train_step(model, opt, x, y, amp, scaler, loss_inside)
    secs = clock.seconds()
    entries = [(lab, math.nan, math.nan, t) for (lab, _, _), t in zip(clock.timeline, secs)]
    return StepMeasure(entries), float(loss)
