"""``planner calibrate``: measure this machine's throughput and write a device profile.

The cost model's time is a roofline per op (:class:`planner.cost.DeviceProfile`): FLOP/s for
compute-bound ops (convolutions, linear layers), bytes/s for memory-bound ones (BN, ReLU, adds,
pooling) and a fixed cost per op call.  This module measures each on the device: a forward and
backward of mid-sized convolutions (FLOP/s, counted analytically), large element-wise ops
(bandwidth) and tiny ops (per-call cost); the result is saved as JSON that ``--device-profile
FILE`` reads.  Measured rates are what ops achieve, so the profile's ``efficiency`` is 1.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .cost import DeviceProfile
from .plan import write_json_atomic

__all__ = ["calibrate", "save_profile"]


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    def run(fn, reps: int) -> float:
        fn()  # warm-up (allocator, kernels, cuDNN algorithm choice)
        samples = []
        for _ in range(reps):
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


def _fit(samples) -> Dict[str, list]:
    """Least-squares ``t = a + b*flops + c*bytes`` (non-negative) over (flops, bytes, t) samples."""
    import numpy as np

    A = np.array([[1.0, f, b] for f, b, _ in samples])
    t = np.array([s[2] for s in samples])
    scale = A.max(axis=0)
    scale[scale == 0] = 1.0
    active = [0, 1, 2]
    coef = np.zeros(3)
    for _ in range(3):  # drop negative coefficients and refit (tiny NNLS)
        sol, *_ = np.linalg.lstsq(A[:, active] / scale[active], t, rcond=None)
        coef[:] = 0
        coef[active] = sol / scale[active]
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            break
        active = [i for i in active if i not in neg]
    return [float(max(0.0, v)) for v in coef]


def _op_costs(device, dtype, timeit, quick: bool) -> Dict[str, Dict[str, list]]:
    """Per op class (``conv``: convolutions and linear layers; ``map``: BN, activations, adds,
    pooling), forward and backward: a fitted ``[seconds per call, s per FLOP, s per byte]``."""
    n = 2 if quick else 4
    convs = [(n, 3, 64, 64, 64, 7, 2, 1), (n, 64, 32, 32, 64, 3, 1, 1), (n, 128, 16, 16, 128, 3, 1, 1),
             (n, 256, 8, 8, 256, 3, 1, 1), (n, 64, 32, 32, 256, 1, 1, 1), (n, 96, 32, 32, 96, 3, 1, 96),
             (n, 512, 4, 4, 512, 3, 1, 1), (n, 32, 64, 64, 32, 3, 1, 1)]
    reps = 3 if quick else 5
    out: Dict[str, Dict[str, list]] = {}
    fwd, bwd = [], []
    for b, c, h, w, k, ks, st, gr in convs:
        x = torch.randn(b, c, h, w, device=device, dtype=dtype, requires_grad=True)
        wt = torch.randn(k, c // gr, ks, ks, device=device, dtype=dtype, requires_grad=True)
        y = F.conv2d(x, wt, stride=st, padding=ks // 2, groups=gr)
        flops = 2 * y.numel() * (c // gr) * ks * ks
        moved = (x.numel() + y.numel() + wt.numel()) * x.element_size()
        g = torch.ones_like(y)
        tf = timeit(lambda: F.conv2d(x, wt, stride=st, padding=ks // 2, groups=gr), reps)
        tb = timeit(lambda: F.conv2d(x, wt, stride=st, padding=ks // 2, groups=gr).backward(g), reps) - tf
        fwd.append((flops, moved, tf))
        bwd.append((2 * flops, 2 * moved, max(tb, 0.0)))
    out["conv"] = {"fwd": _fit(fwd), "bwd": _fit(bwd)}
    fwd, bwd = [], []
    for shape in [(n, 64, 32, 32), (n, 64, 56, 56), (n, 256, 8, 8), (n, 32, 112, 112)]:
        x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
        ch = shape[1]
        wb = [torch.ones(ch, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
        rs = [torch.zeros(ch, device=device, dtype=dtype), torch.ones(ch, device=device, dtype=dtype)]
        ops = [lambda: torch.relu(x), lambda: x + x,
               lambda: F.batch_norm(x, rs[0], rs[1], wb[0], wb[1], False),
               lambda: F.max_pool2d(x, 3, 2, 1)]
        for op in ops:
            y = op()
            moved = (x.numel() + y.numel()) * x.element_size()
            g = torch.ones_like(y)
            tf = timeit(op, reps)
            tb = timeit(lambda: op().backward(g), reps) - tf
            fwd.append((x.numel(), moved, tf))
            bwd.append((2 * x.numel(), 2 * moved, max(tb, 0.0)))
    out["map"] = {"fwd": _fit(fwd), "bwd": _fit(bwd)}
    return out


def calibrate(device: str = "cpu", dtypes=("float32",), quick: bool = False,
              progress: Callable[[str], None] = lambda s: None) -> DeviceProfile:
    """Measure the device and return a :class:`DeviceProfile` (``measured=True``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    timeit = _timer(dev)
    flops: Dict[str, float] = {}
    for name in dtypes:
        progress(f"convolutions ({name})")
        flops[name] = _conv_rate(dev, getattr(torch, name), timeit, quick)
    progress("per-op costs")
    op_costs = _op_costs(dev, getattr(torch, dtypes[0]), timeit, quick)
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
