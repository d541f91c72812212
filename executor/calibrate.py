"""``planner calibrate``: measure this machine's throughput and write a device profile.

The cost model prices each node by its time class (:func:`lrcnn.models.ops.time_class`: dense and
depthwise convolutions, linear layers, BN, activations, pooling, other element-wise maps).  This
module times forward and backward of each class over layer shapes of the kind CNN trunks are made
of and fits ``seconds = a + b*work + c*bytes`` per class and direction (work: FLOPs for
convolutions and linear layers, elements otherwise), once with caches flushed before each call
(a layer inside a training step) and once in a tight loop (row strips after a segment's first),
plus each optimizer's ``zero_grad`` + ``step`` per parameter tensor and byte.  It also records the
datasheet-style numbers (FLOP/s of 3x3 convolutions, bandwidth, per-call cost) that a roofline
uses.  The result is saved as JSON that ``--device-profile FILE`` reads; measured rates are what
ops achieve, so the profile's ``efficiency`` is 1.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from lrcnn.errors import UsageError
from lrcnn.executor.measure import make_optimizer
from lrcnn.models.ops import TIME_CLASSES, time_class
from lrcnn.planner.cost import DeviceProfile
from lrcnn.planner.files import write_json_atomic
from lrcnn.planner.plan import OPTIMIZERS

__all__ = ["calibrate", "save_profile"]


FLUSH_BYTES = 64 * 2**20  # larger than the last-level cache of the machines we plan for


def _timer(device: torch.device, cold: bool = False) -> Callable[[Callable[[], object], int], float]:
    """A median-of-``reps`` timer; ``cold`` writes a buffer larger than the caches before each
    call, as a training step does between two uses of a layer (an op timed in a tight loop finds
    its weights and inputs in cache and runs up to 1.5x faster than it does inside a model)."""
    flush = torch.empty(FLUSH_BYTES // 4, device=device) if cold else None

    def run(fn, reps: int) -> float:
        fn()  # warm-up (allocator, kernels, cuDNN algorithm choice)
        samples = []
        for _ in range(reps):
            if flush is not None:
                flush.fill_(1.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)
    return run


def _conv_rate(device, dtype, timeit, quick: bool) -> float:
    """FLOP/s of forward+backward of typical 3x3 convolutions."""
    n = 2 if quick else 8
    shapes = [(n, 64, 56, 56, 64), (n, 128, 28, 28, 128), (n, 256, 14, 14, 256)]
    rates = []
    for b, c, h, w, k in shapes:
        x = torch.randn(b, c, h, w, device=device, dtype=dtype, requires_grad=True)
        wt = torch.randn(k, c, 3, 3, device=device, dtype=dtype, requires_grad=True)

        def step():
            y = F.conv2d(x, wt, padding=1)
            y.backward(torch.ones_like(y))
        flops = 3 * 2 * b * k * h * w * c * 9  # forward + grad input + grad weight
        rates.append(flops / timeit(step, 3 if quick else 5))
    return statistics.median(rates)


def _bandwidth(device, dtype, timeit, quick: bool) -> float:
    """Bytes/s of a large out-of-place element-wise op (one read, one write)."""
    numel = (8 if quick else 32) * 2**20
    x = torch.randn(numel, device=device, dtype=dtype)
    t = timeit(lambda: torch.relu(x), 5)
    return 2 * numel * x.element_size() / t


def _launch(device, dtype, timeit) -> float:
    x = torch.randn(8, device=device, dtype=dtype)

    def ops():
        for _ in range(100):
            torch.relu(x)
    return timeit(ops, 5) / 100


def _fit(samples) -> List[float]:
    """Non-negative least squares ``t = a + b*work + c*bytes`` over (work, bytes, t) samples.

    Residuals are weighted by ``1/sqrt(t)``: a plain fit is ruled by the slowest ops (small ones
    come out several times off), a relative fit by the many fast ones (the sum, which is what a
    step's time is, comes out low); this weighting sits between the two."""
    import numpy as np

    t = np.array([max(s[2], 1e-9) for s in samples])
    w = 1.0 / np.sqrt(t)
    A = np.array([[1.0, f, b] for f, b, _ in samples]) * w[:, None]
    y = t * w
    scale = A.max(axis=0)
    scale[scale == 0] = 1.0
    active = [0, 1, 2]
    coef = np.zeros(3)
    for _ in range(3):  # drop negative coefficients and refit (tiny NNLS)
        sol, *_ = np.linalg.lstsq(A[:, active] / scale[active], y, rcond=None)
        coef[:] = 0
        coef[active] = sol / scale[active]
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            break
        active = [i for i in active if i not in neg]
    return [float(max(0.0, v)) for v in coef]


# Layer shapes of the kind CNN trunks are made of, small and mid-sized (the row strips the planner
# makes are small): (batch, in channels, height = width, out channels, kernel, stride, groups).
_CONVS = [(2, 3, 64, 64, 7, 2, 1), (2, 3, 64, 32, 3, 2, 1), (2, 64, 32, 64, 3, 1, 1),
          (2, 128, 16, 128, 3, 1, 1), (2, 256, 8, 256, 3, 1, 1), (2, 512, 4, 512, 3, 1, 1),
          (2, 64, 64, 64, 3, 1, 1), (4, 64, 56, 64, 3, 1, 1), (4, 128, 28, 128, 3, 1, 1),
          (4, 256, 14, 256, 3, 1, 1), (2, 128, 16, 256, 3, 2, 1), (2, 64, 32, 256, 1, 1, 1),
          (2, 256, 16, 64, 1, 1, 1), (2, 512, 8, 2048, 1, 1, 1), (2, 32, 32, 192, 1, 1, 1),
          (2, 192, 16, 32, 1, 1, 1), (2, 256, 16, 512, 1, 2, 1), (4, 256, 56, 64, 1, 1, 1),
          (2, 32, 128, 32, 3, 1, 1), (8, 64, 16, 64, 3, 1, 1), (1, 64, 8, 64, 3, 1, 1)]
_DWCONVS = [(2, 32, 64, 32, 3, 1, 32), (2, 96, 32, 96, 3, 2, 96), (2, 144, 16, 144, 3, 1, 144),
            (2, 384, 8, 384, 3, 1, 384), (2, 960, 4, 960, 3, 1, 960), (4, 144, 56, 144, 3, 1, 144),
            (4, 192, 28, 192, 3, 2, 192), (2, 576, 14, 576, 3, 1, 576)]
_LINEAR = [(2, 512, 10), (2, 2048, 1000), (2, 25088, 4096), (2, 4096, 4096), (8, 1280, 10),
           (32, 2048, 1000), (8, 4096, 10)]
_MAPS = [(2, 64, 32, 32), (2, 64, 16, 16), (2, 256, 8, 8), (2, 32, 64, 64), (4, 64, 56, 56),
         (2, 512, 2, 2), (2, 1024, 4, 4), (8, 128, 28, 28)]


def _time_pair(timeit, fn, out_grad, reps: int) -> Tuple[float, float]:
    """(forward seconds, backward seconds) of ``fn`` with autograd recording, as in training."""
    tf = timeit(fn, reps)
    tb = timeit(lambda: fn().backward(out_grad), reps) - tf
    return tf, max(tb, 0.0)


def _op_costs(device, dtype, quick: bool, progress=lambda s: None) -> Dict[str, Dict[str, list]]:
    """Per op class (:data:`lrcnn.models.ops.TIME_CLASSES`), forward and backward: a fitted
    ``[seconds per call, s per unit of work, s per byte moved]``, where work is FLOPs for
    convolutions and linear layers and output elements for the others (the cost model's units).

    Two fits each: ``fwd``/``bwd`` with caches flushed before every call (an op in a training
    step, whose weights were last touched a whole pass ago) and ``fwd_warm``/``bwd_warm`` in a
    tight loop (the second and later row strips of a segment, whose weights are still cached)."""
    reps = 3 if quick else 5
    timers = {"": _timer(device, cold=True), "_warm": _timer(device)}
    samples: Dict[str, Dict[str, list]] = {c: {} for c in TIME_CLASSES}

    def add(cls, work, moved, fn, out):
        for suffix, timeit in timers.items():
            tf, tb = _time_pair(timeit, fn, torch.ones_like(out), reps)
            samples[cls].setdefault("fwd" + suffix, []).append((work, moved, tf))
            samples[cls].setdefault("bwd" + suffix, []).append((2 * work, 2 * moved, tb))

    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    progress("per-op costs: convolutions")
    convs = _CONVS[::2] if quick else _CONVS
    for b, c, h, k, ks, st, gr in convs + (_DWCONVS[::2] if quick else _DWCONVS):
        x, wt = t(b, c, h, h), t(k, c // gr, ks, ks)
        fn = (lambda x=x, wt=wt, st=st, ks=ks, gr=gr: F.conv2d(x, wt, stride=st, padding=ks // 2, groups=gr))
        y = fn()
        add(time_class("conv2d", gr), 2 * y.numel() * (c // gr) * ks * ks,
            (x.numel() + y.numel() + wt.numel()) * x.element_size(), fn, y)
    progress("per-op costs: linear layers")
    for b, i, o in (_LINEAR[::2] if quick else _LINEAR):
        x, wt = t(b, i), t(o, i)
        fn = (lambda x=x, wt=wt: F.linear(x, wt))
        y = fn()
        add("linear", 2 * y.numel() * i, (x.numel() + y.numel() + wt.numel()) * x.element_size(), fn, y)
    progress("per-op costs: element-wise maps")
    for shape in (_MAPS[::2] if quick else _MAPS):
        x, x2 = t(*shape), t(*shape)
        ch = shape[1]
        wb = [t(ch), t(ch)]
        rs = [torch.zeros(ch, device=device, dtype=dtype), torch.ones(ch, device=device, dtype=dtype)]
        ops = [("act", lambda x=x: torch.relu(x)), ("map", lambda x=x, x2=x2: x + x2),
               ("bn", lambda x=x, wb=wb, rs=rs: F.batch_norm(x, rs[0], rs[1], wb[0], wb[1], False)),
               ("bn_stats", lambda x=x, wb=wb, rs=rs: F.batch_norm(x, rs[0], rs[1], wb[0], wb[1], True)),
               ("pool", lambda x=x: F.max_pool2d(x, 3, 2, 1))]
        for cls, fn in ops:
            y = fn()
            add(cls, y.numel(), (x.numel() + y.numel()) * x.element_size(), fn, y)
    return {c: {k: _fit(v) for k, v in fits.items()} for c, fits in samples.items() if fits}


def _optimizer_costs(device, dtype, timeit, quick: bool) -> Dict[str, list]:
    """Per optimizer: ``[seconds per step, s per parameter tensor, s per parameter byte]`` of
    ``zero_grad(set_to_none=True)`` + ``step()``, fitted on many small and a few large tensors."""

    sets = [[(256,)] * 200, [(1024, 1024)] * (4 if quick else 16), [(64, 64, 3, 3)] * 64]
    out: Dict[str, list] = {}
    for name in OPTIMIZERS:
        samples = []
        for shapes in sets:
            ps = [torch.zeros(*s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
            opt = make_optimizer(ps, name)
            grads = [torch.ones_like(p) for p in ps]

            def step(ps=ps, opt=opt, grads=grads):
                opt.zero_grad(set_to_none=True)
                for p, g in zip(ps, grads):
                    p.grad = g.clone()  # backward makes fresh gradient tensors every step
                opt.step()

            clone = timeit(lambda grads=grads: [g.clone() for g in grads], 3)
            n_bytes = sum(p.numel() for p in ps) * ps[0].element_size()
            samples.append((len(ps), n_bytes, max(timeit(step, 3) - clone, 0.0)))
        out[name] = _fit(samples)
    return out


def calibrate(device: str = "cpu", dtypes=("float32",), quick: bool = False,
              progress: Callable[[str], None] = lambda s: None) -> DeviceProfile:
    """Measure the device and return a :class:`DeviceProfile` (``measured=True``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    timeit = _timer(dev)
    flops: Dict[str, float] = {}
    for name in dtypes:
        progress(f"convolutions ({name})")
        flops[name] = _conv_rate(dev, getattr(torch, name), timeit, quick)
    op_costs = _op_costs(dev, getattr(torch, dtypes[0]), quick, progress)
    progress("optimizer steps")
    op_costs["optimizer"] = _optimizer_costs(dev, getattr(torch, dtypes[0]), _timer(dev, cold=True), quick)
    progress("bandwidth")
    bw = _bandwidth(dev, torch.float32, timeit, quick)
    progress("per-op cost")
    launch = _launch(dev, torch.float32, timeit)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        mem, name, kind, rnd, ws = props.total_memory, props.name, "cuda", 512, 256 * 2**20
    else:
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            mem = 0
        name, kind, rnd, ws = f"cpu-{os.cpu_count()}core-{torch.get_num_threads()}thr", "cpu", 1, 0
    return DeviceProfile(name=name, flops=flops, bandwidth=bw, memory=int(mem), efficiency=1.0,
                         launch_s=launch, alloc_round=rnd, workspace=ws, kind=kind, measured=True,
                         op_costs=op_costs)


def save_profile(profile: DeviceProfile, path: str) -> None:
    """Write the profile as JSON, atomically."""
    write_json_atomic(profile.to_dict(), path, "device profile")
