"""Peak memory of a training step: one measurement API for benchmarks, the runner and the tests.

Three methods, one report (:class:`MemoryReport`), chosen by :func:`measure_step`:

* ``'storage'`` (CPU, or any device when asked): :class:`StorageTracker`, a ``TorchDispatchMode``
  that accounts tensor storages the way torch's ``MemTracker`` does -- after every aten op it
  registers each output's *new* untyped storage (weak reference + ``nbytes()``) and subtracts it
  again when the storage is freed.  Not RSS, not tracemalloc: allocator caching and the memory of
  kernel-internal scratch buffers are invisible, exactly like ``MemTracker``.
* ``'cuda'``: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` around the step,
  relative to what was allocated before it, and the step's ``max_memory_reserved``.

Reserved bytes (what a CUDA OOM depends on) off CUDA: with ``measure_step(..., reserved=True)``
the tracker records the step's allocation sequence and :mod:`lrcnn.models.allocator` replays it
through a model of PyTorch's CUDA caching allocator (``MemoryReport.reserved_method == 'model'``).
* ``'fake'``: the storage tracker running on top of an active ``FakeTensorMode`` -- the peak of a
  full-size step without the memory (see :func:`fake_mode` and :func:`fake_state`).

Per-phase peaks: the step function calls the module-level :func:`mark` (``mark("forward")`` after
the forward pass, ``mark("backward")`` after backward, ...); it forwards to the active measurement
and is a no-op when none is active, so instrumented code costs nothing in normal runs.

Example::

    def step():
        loss = model(x).sum(); memory.mark("forward")
        loss.backward();       memory.mark("backward")
    rep = memory.measure_step(step)            # CPU: storage accounting
    rep.peak_bytes, rep.phase_peaks()          # {'forward': ..., 'backward': ..., 'end': ...}

Fake (simulated) step::

    with memory.fake_mode():
        params = memory.fake_state(model)      # fake copies of parameters and buffers
        x = torch.randn(256, 3, 224, 224)      # fake: created inside the mode
        step = lambda: torch.func.functional_call(model, params, (x,)).sum().backward()
        rep = memory.measure_step(step)        # rep.method == 'fake'
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lrcnn.errors import StateError
from lrcnn.models.allocator import expandable_segments, FREE, replay

__all__ = ["MemoryReport", "StorageTracker", "CompiledStorageTracker", "measure_step", "mark", "measuring", "fake_mode", "fake_state"]

Entry = Tuple[str, int, int]  # (label, live bytes, peak bytes since the previous mark)

_ACTIVE: List["Meter"] = []  # measurements in progress, innermost last (what mark() talks to)


@dataclass
class MemoryReport:
    """Memory of one measured step.

    All byte counts except ``baseline_bytes`` are *new* bytes above the start of the step.

    Attributes:
        peak_bytes: peak of live bytes during the step, minus ``baseline_bytes``.
        baseline_bytes: bytes counted before the step started (CUDA: ``memory_allocated()``;
            storage/fake: the storages passed as ``track_existing``, 0 by default).
        timeline: ``(label, live_bytes, peak_bytes)`` per :func:`mark` call, the peak being the
            peak since the previous mark; :func:`measure_step` closes it with an ``'end'`` entry.
        device: the device measured (for ``'fake'``: the label the caller gave, default ``cpu``).
        method: ``'storage'``, ``'cuda'`` or ``'fake'``.
        reserved_bytes: absolute peak of the CUDA caching allocator's *reserved* bytes during the
            step, what a CUDA out-of-memory error depends on: measured
            (``torch.cuda.max_memory_reserved``, ``reserved_method == 'cuda'``) or modeled from the
            recorded allocation sequence (:mod:`lrcnn.models.allocator`, ``'model'``, when
            :func:`measure_step` is asked for it); ``None`` when neither.
        reserved_method: ``'cuda'``, ``'model'`` or ``''``.
        modeled_reserved_bytes: the modeled reserved peak (``reserved=True``; on CUDA beside the
            measured one, from the same step's storages), else ``None``.  The model follows the
            allocator settings lrcnn's CUDA runs use here
            (:func:`lrcnn.models.allocator.expandable_segments`).
        events, existing_events: the recorded allocation sequence (with ``reserved=True``; see
            :attr:`StorageTracker.events`), else ``None`` and 0.
    """

    peak_bytes: int
    baseline_bytes: int
    timeline: List[Entry] = field(default_factory=list)
    device: str = "cpu"
    method: str = "storage"
    reserved_bytes: Optional[int] = None
    reserved_method: str = ""
    modeled_reserved_bytes: Optional[int] = None
    events: Optional[List[Tuple[int, int]]] = field(default=None, repr=False)
    existing_events: int = 0

    def phase_peaks(self) -> Dict[str, int]:
        """Peak bytes per phase label (the maximum when a label is marked more than once)."""
        out: Dict[str, int] = {}
        for label, _, peak in self.timeline:
            out[label] = max(out.get(label, peak), peak)
        return out

    @property
    def absolute_peak(self) -> int:
        """Peak of all counted bytes, the pre-existing ones (``baseline_bytes``) included."""
        return self.baseline_bytes + self.peak_bytes

    def absolute_phase_peaks(self, phases: Sequence[str] = ("forward", "backward", "optimizer")) -> Dict[str, int]:
        """Absolute peak (``baseline_bytes`` included) per phase of a step.

        Every timeline interval belongs to the first of ``phases`` marked at or after it (marks
        made inside a phase, e.g. per strip, refine it without splitting it); intervals after the
        last phase mark are ``'end'``.
        """
        out: Dict[str, int] = {}
        pending = 0
        for label, _, peak in self.timeline:
            pending = max(pending, peak)
            if label in phases or label == "end":
                out[label] = max(out.get(label, 0), pending + self.baseline_bytes)
                pending = 0
        return out


class Meter:
    """Common state of a measurement: absolute ``live``/``peak``/``baseline`` bytes and marks."""

    def __init__(self) -> None:
        self.live = 0
        self.baseline = 0        # bytes counted at entry
        self.timeline: List[Entry] = []
        self._since_mark = 0     # peak since the previous mark
        self._peak = 0           # peak before the previous mark

    @property
    def peak(self) -> int:
        """Peak bytes since entry (CUDA: as of the last mark)."""
        return max(self._peak, self._since_mark)

    def _start(self, baseline: int) -> None:
        self.live = self.baseline = self._since_mark = self._peak = baseline
        self.timeline = []
        _ACTIVE.append(self)

    def _stop(self) -> None:
        _ACTIVE.remove(self)

    def _record(self, label: str, live: int, since_mark: int) -> None:
        self.timeline.append((label, live, since_mark))
        self._peak = max(self._peak, since_mark)
        self._since_mark = live

    def mark(self, label: str) -> None:
        """Append ``(label, live, peak since previous mark)`` to :attr:`timeline`."""
        self._record(label, self.live, self._since_mark)

    def report(self, device: str, method: str) -> MemoryReport:
        """The measurement so far as a :class:`MemoryReport` (bytes relative to the baseline)."""
        b = self.baseline
        return MemoryReport(self.peak - b, b,
                            [(lab, live - b, peak - b) for lab, live, peak in self.timeline],
                            device, method)


def _storages(objs) -> Iterable[torch.UntypedStorage]:
    """Untyped storages of the tensors (and storages) among ``objs`` (flattened pytree)."""
    for o in tree_flatten(objs)[0]:
        if isinstance(o, torch.Tensor):
            try:
                yield o.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse / opaque tensors: no storage
                continue
        elif isinstance(o, torch.UntypedStorage):
            yield o


class StorageTracker(Meter, TorchDispatchMode):
    """Storage accounting of every tensor allocated while the mode is active.

    After each aten op, every output storage that is neither already tracked nor shared with an
    input of the op (views, in-place and ``out=`` ops reuse their input's storage) is a new
    allocation: it is added to :attr:`live` with its ``nbytes()`` and a weak reference removes it
    again when the storage is freed.  Storages are keyed by their ``StorageImpl`` (``_cdata``), so
    views and in-place results are never counted twice; a tracked storage that changes size
    (``Tensor.resize_``) is re-counted.  Works unchanged on FakeTensors (their meta storages have
    ``nbytes``): with a ``FakeTensorMode`` active, entered before or after the tracker (torch keeps
    the fake mode below user modes), the tracker sees every op first and counts fake storages.

    Storages that existed before entry (parameters, the input batch, optimizer state) are not
    counted unless passed in ``track_existing`` (tensors, or modules for their parameters, buffers
    and existing ``.grad``); their bytes form :attr:`baseline` and start :attr:`live`.  Parameter
    gradients made during the step are new storages and *are* counted: autograd runs CPU backward
    on the calling thread under the mode, and ``AccumulateGrad`` either steals the incoming
    gradient (already counted where it was computed) or copies/accumulates it with an op the mode
    sees (tested).  On CUDA the engine's device threads run with the caller's thread-local state,
    the dispatch-mode stack included, as ``MemTracker`` also relies on.

    Not seen: memory a kernel allocates and frees internally, allocator rounding and caching
    (``record=True`` keeps the allocation sequence, :attr:`events`, so that
    :mod:`lrcnn.models.allocator` can model them), and ``UntypedStorage.resize_`` called directly
    on a storage (FSDP-style; ``MemTracker`` monkey-patches it, this tracker does not).

    Attributes (absolute bytes): :attr:`live`, :attr:`peak` (overall), :attr:`baseline`,
    :attr:`timeline` (``(label, live, peak since previous mark)`` per :meth:`mark`).  On exit the
    numbers freeze (later frees no longer change them) and :meth:`tracks` answers ``False``.
    """

    def __init__(self, track_existing: Iterable[Union[torch.Tensor, nn.Module]] = (),
                 record: bool = False) -> None:
        Meter.__init__(self)
        TorchDispatchMode.__init__(self)
        self._existing = list(track_existing)
        self._sizes: Dict[int, Tuple[int, weakref.ref]] = {}  # _cdata -> (nbytes, weakref)
        #: with ``record=True``: the allocation sequence, ``(id, nbytes)`` per new storage and
        #: ``(id, FREE)`` per freed one (ids count up from 0), for :mod:`lrcnn.models.allocator`;
        #: the first :attr:`existing_events` are the storages counted at entry
        self.events: Optional[List[Tuple[int, int]]] = [] if record else None
        self.existing_events = 0
        self._ids: Dict[int, int] = {}  # _cdata -> id in events
        self._next_id = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    def _log_alloc(self, key: int, n: int) -> None:
        """Append the allocation of storage ``key`` (``n`` bytes) to :attr:`events`."""
        old = self._ids.get(key)
        self._ids[key] = self._next_id
        self.events.append((self._next_id, n))
        self._next_id += 1
        if old is not None:  # a resize: the new block is allocated before the old one is freed
            self.events.append((old, FREE))

    def _track(self, st: torch.UntypedStorage) -> None:
        key, n = st._cdata, st.nbytes()
        self._sizes[key] = (n, weakref.ref(st, partial(self._freed, key)))
        self.live += n
        self._since_mark = max(self._since_mark, self.live)
        if self.events is not None:
            self._log_alloc(key, n)

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._sizes.get(key)
        if entry is not None and entry[1] is ref:
            del self._sizes[key]
            self.live -= entry[0]
            if self.events is not None:
                self.events.append((self._ids.pop(key), FREE))

    def tracks(self, t: Union[torch.Tensor, torch.UntypedStorage]) -> bool:
        """Whether the storage of ``t`` is counted in :attr:`live`."""
        st = t.untyped_storage() if isinstance(t, torch.Tensor) else t
        return st._cdata in self._sizes

    # -- mode ----------------------------------------------------------------------------------
    def __enter__(self) -> "StorageTracker":
        self._sizes.clear()
        objs: list = []
        for o in self._existing:
            if isinstance(o, nn.Module):
                objs += [(p, p.grad) for p in o.parameters()] + list(o.buffers())
            else:
                objs.append(o)
        self.live = 0
        if self.events is not None:
            self.events, self._ids, self._next_id = [], {}, 0
        for st in _storages(objs):
            if st._cdata not in self._sizes:
                self._track(st)
        self.existing_events = len(self.events) if self.events is not None else 0
        self._start(self.live)
        return TorchDispatchMode.__enter__(self)

    def __exit__(self, *exc) -> None:
        TorchDispatchMode.__exit__(self, *exc)
        self._stop()
        self._sizes.clear()  # drops the weak references, so their callbacks never run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for st in _storages(out):
            key = st._cdata
            entry = self._sizes.get(key)
            if entry is not None:  # view / in-place on a tracked storage: count a resize only
                if st.nbytes() != entry[0]:
                    self.live += st.nbytes() - entry[0]
                    self._sizes[key] = (st.nbytes(), entry[1])
                    self._since_mark = max(self._since_mark, self.live)
                    if self.events is not None:
                        self._log_alloc(key, st.nbytes())
                continue
            if inputs is None:
                inputs = {s._cdata for s in _storages((args, kwargs))}
            if key not in inputs:  # not an alias of an (untracked, pre-existing) input: new
                self._track(st)
        return out


class CompiledStorageTracker(StorageTracker):
    """:class:`StorageTracker` that stays on while ``torch.compile``-d code runs.

    With any other dispatch mode active, Dynamo does not compile and the step runs eagerly; this
    one declares ``ignore_compile_internals``, so the compiled artifact runs and the tracker sees
    the ATen ops it executes.  It sees what a backend runs op by op (``aot_eager`` style backends:
    the real forward/backward partition, decomposed), not the buffers Inductor's generated
    kernels allocate themselves.
    """

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


class _CudaMeter(Meter):
    """``max_memory_allocated`` around a step; each mark reads and resets the peak, and keeps the
    step's peak of ``max_memory_reserved`` (:attr:`reserved_peak`, absolute)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.reserved_peak = 0

    def mark(self, label: str) -> None:
        torch.cuda.synchronize(self.device)
        self.live = torch.cuda.memory_allocated(self.device)
        self._record(label, self.live, torch.cuda.max_memory_allocated(self.device))
        self.reserved_peak = max(self.reserved_peak, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def __enter__(self) -> "_CudaMeter":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.reserved_peak = torch.cuda.memory_reserved(self.device)
        self._start(torch.cuda.memory_allocated(self.device))
        return self

    def report(self, device: str, method: str) -> MemoryReport:
        rep = super().report(device, method)
        rep.reserved_bytes, rep.reserved_method = int(self.reserved_peak), "cuda"
        return rep

    def __exit__(self, *exc) -> None:
        self._stop()


def measuring() -> bool:
    """Whether a measurement is active (instrumented code may skip its bookkeeping otherwise)."""
    return bool(_ACTIVE)


def mark(label: str) -> None:
    """Record a timeline entry in the innermost active measurement; no-op when none is active."""
    if _ACTIVE:
        _ACTIVE[-1].mark(label)


def measure_step(step_fn: Callable[[], object], device: Union[str, torch.device, None] = None,
                 warmup: int = 0,
                 track_existing: Iterable[Union[torch.Tensor, nn.Module]] = (),
                 compiled: bool = False, reserved: bool = False) -> MemoryReport:
    """Run ``step_fn()`` once under the right measurement and report its peak memory.

    ``step_fn`` does one training step (forward, loss, backward, maybe the optimizer step) and
    may call :func:`mark` between phases.  It runs ``warmup`` times unmeasured first (lazy state
    such as optimizer moments or cuDNN workspaces then belongs to the baseline, not the step).

    Method: ``'fake'`` when a ``FakeTensorMode`` is active (see :func:`fake_mode`; ``device``
    then only labels the report), ``'cuda'`` when ``device`` is a CUDA device (allocator
    statistics; ``track_existing`` serves only the sequence ``reserved=True`` records), else
    ``'storage'`` (:class:`StorageTracker`).
    The report's timeline ends with an ``'end'`` entry covering the rest of the step.
    ``compiled``: the step runs ``torch.compile``-d code; on the CPU use
    :class:`CompiledStorageTracker` (CUDA allocator statistics see compiled code anyway).

    Reserved bytes (:attr:`MemoryReport.reserved_bytes`): measured on CUDA always; with
    ``reserved=True`` a tracker also records the step's allocation sequence and
    :func:`lrcnn.models.allocator.replay` models the caching allocator on it (steady state: the
    step replayed after one warm-up replay): :attr:`MemoryReport.modeled_reserved_bytes`, and
    ``reserved_bytes`` for ``'storage'``/``'fake'``.
    """
    device = torch.device(device if device is not None else "cpu")
    fake = active_fake_mode() is not None
    for _ in range(warmup):
        step_fn()
    gc.collect()
    tracker = CompiledStorageTracker if compiled else StorageTracker
    recorder = None
    if device.type == "cuda" and not fake:
        meter: Meter = _CudaMeter(device)
        method = "cuda"
        if reserved:  # the storage sequence beside the allocator's own statistics (it sees no marks:
            recorder = tracker(track_existing, record=True)  # the CUDA meter, entered last, gets them)
    else:
        meter, method = tracker(track_existing, record=reserved), ("fake" if fake else "storage")
        recorder = meter if reserved else None
    with contextlib.ExitStack() as stack:
        if recorder is not None and recorder is not meter:
            stack.enter_context(recorder)
        with meter:
            step_fn()
            meter.mark("end")
    rep = meter.report(str(device), method)
    if recorder is not None:
        rep.events, rep.existing_events = recorder.events, recorder.existing_events
        rep.modeled_reserved_bytes = replay(rep.events, rep.existing_events,
                                            expandable_segments=expandable_segments()).reserved
        if rep.reserved_bytes is None:
            rep.reserved_bytes, rep.reserved_method = rep.modeled_reserved_bytes, "model"
    return rep


def fake_mode(**kwargs) -> FakeTensorMode:
    """A ``FakeTensorMode`` context (kwargs are passed on): tensors made inside are fake."""
    return FakeTensorMode(**kwargs)


def constant_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a constant made from Python values) as a fake tensor of ``like``'s fake mode when
    ``like`` is fake (some ops refuse a real tensor beside fake ones), else ``t`` itself."""
    mode = getattr(like, "fake_mode", None)
    if mode is None or getattr(t, "fake_mode", None) is mode:
        return t
    return mode.from_tensor(t)


def fake_state(module: nn.Module, mode: Optional[FakeTensorMode] = None,
               device: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Fake copies of ``module``'s parameters and buffers, for ``torch.func.functional_call``.

    Parameters stay leaves with their ``requires_grad``, so backward fills their ``.grad`` as in
    a real step.  An existing ``.grad`` is carried over (fake) like the rest of the state, so the
    fake step then accumulates into it in place, as the real one would: call
    ``module.zero_grad(set_to_none=True)`` first to simulate a step that creates the gradients.
    ``mode`` defaults to the active fake mode (call inside ``with fake_mode():``).  ``device``: make
    the fake copies on this device instead of the module's (a model on the meta device simulated
    under CPU autocast, which applies to CPU tensors only; ``.grad`` is then not carried over).
    """
    mode = mode or active_fake_mode()
    if mode is None:
        raise StateError("fake_state needs a FakeTensorMode: call it inside `with fake_mode():` or pass mode=")

    def fake(t: torch.Tensor) -> torch.Tensor:
        if device is None or t.device == torch.device(device):
            return mode.from_tensor(t)  # a leaf with the same requires_grad
        with mode:
            f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        return f.requires_grad_(t.requires_grad)
    return {name: fake(t) for name, t in list(module.named_parameters()) + list(module.named_buffers())}
