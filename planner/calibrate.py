"""``planner calibrate``: measure this machine's throughput and write a device profile.

The cost model's time is a roofline per op (:class:`planner.cost.DeviceProfile`): FLOP/s for
compute-bound ops (convolutions, linear layers), bytes/s for memory-bound ones (BN, ReLU, adds,
pooling) and a fixed cost per op call.  This module measures each on the device: a forward and
backward of mid-sized convolutions (FLOP/s, counted analytically), large element-wise ops
(bandwidth) and tiny ops (per-call cost); the result is saved as JSON that ``--device-profile
FILE`` reads.  Measured rates are what ops achieve, so the profile's ``efficiency`` is 1.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .cost import DeviceProfile

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
                         launch_s=launch, alloc_round=rnd, workspace=ws, kind=kind, measured=True)


def save_profile(profile: DeviceProfile, path: str) -> None:
    """Write the profile as JSON, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(profile.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
