"""A benchmark case (a model at a batch and size, on a device) and a method run on it: one
step measured for peak memory and time, and checked for exactness against plain PyTorch."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from lrcnn.analysis.bench import BENCH_BN
from lrcnn.errors import LrcnnError
from lrcnn.executor.measure import make_optimizer, opt_state, train_step
from lrcnn.models import get_model, memory, set_bn_mode
from lrcnn.models.loss import cross_entropy, logits_of, synthetic_target
from lrcnn.models.zoo import model_task


EXACT_RTOL = {"float32": 1e-5, "float64": 1e-10}  # the project's bars (norm-wise relative)


OPTIMIZER = "momentum"  # SGD with momentum, at its default learning rate
CLASSES = 1000  # every classification case's model classifies into ImageNet's classes (a tiny test net too)
# a dense (segmentation) case's model keeps the zoo's classes (unet 2, torchvision's 21, tiny nets 3)
# and its target is a class index per pixel



class BenchError(LrcnnError, ValueError):
    """Bad benchmark input: the message names the problem and the fix."""


@dataclass
class Method:
    """One benchmarked configuration: ``forward(x)`` computes the model's logits its own way."""

    method: str
    setting: str
    forward: Optional[Callable] = None
    memory_forward: Optional[Callable] = None  # what the memory step runs, if not ``forward``
    compiled: bool = False
    budget_bytes: float = math.nan
    predicted_peak_bytes: float = math.nan
    note: str = ""
    setup: Optional[Callable[[], None]] = None  # called before each use (compile settings)


@dataclass
class Case:
    name: str
    model_name: str
    batch: int
    resolution: int
    device: torch.device
    dtype: str = "float32"
    bn: str = "train"  # one of BENCH_BN
    model: nn.Module = field(repr=False, default=None)
    x: torch.Tensor = field(repr=False, default=None)
    y: torch.Tensor = field(repr=False, default=None)
    state0: Dict[str, torch.Tensor] = field(repr=False, default=None)
    reference: Tuple = field(repr=False, default=None)
    noise: Dict[str, float] = field(repr=False, default_factory=dict)  # plain's own float32 spread
    logits_shape: Tuple[int, ...] = ()  # the model's logits at the case's input (dense: (N, C, H, W))

    @property
    def dense(self) -> bool:
        """Whether the model predicts a class per pixel (the target is a per-pixel mask)."""
        return len(self.logits_shape) > 2

    @property
    def noise_floor(self) -> float:
        """The largest entry of ``noise`` (see :func:`noise_errs`)."""
        return max(self.noise.values(), default=0.0)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, 3, self.resolution, self.resolution)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_case(name: str, model_name: str, batch: int, resolution: int, device: torch.device,
              dtype: str = "float32", seed: int = 0, bn: str = "train") -> Case:
    """The real model (random weights; BatchNorm in ``bn`` mode, one of :data:`BENCH_BN`), a fixed
    batch and the plain reference.  A classification model predicts :data:`CLASSES` classes, one
    index per sample its target; a dense model (``models.zoo.model_task``: segmentation) keeps its
    zoo classes and its target is a mask of class indices, one per pixel of its logits
    (:func:`lrcnn.models.loss.cross_entropy` on the tensor or ``{"out": ...}`` output)."""
    if bn not in BENCH_BN:
        raise BenchError(f"BatchNorm mode {bn!r} is not one of {', '.join(BENCH_BN)}")
    torch.manual_seed(seed)
    dense = model_task(model_name) == "segmentation"
    model = get_model(model_name, num_classes=None if dense else CLASSES)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    set_bn_mode(model, "train" if bn == "train" else "eval")
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)
    case = Case(name, model_name, batch, resolution, device, dtype, bn, model)
    case.x = torch.randn(*case.shape, device=device, dtype=getattr(torch, dtype))
    case.logits_shape = logits_shape(model, case.shape, dtype) if dense else (batch, CLASSES)
    if dense:
        case.y = synthetic_target(case.logits_shape, torch.Generator().manual_seed(seed), device=device)
    else:
        case.y = torch.randint(0, CLASSES, (batch,), device=device)
    case.state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    case.reference = _one_step(case, model)
    if dtype == "float32":
        case.noise = noise_errs(case)
    return case


def logits_shape(model: nn.Module, shape, dtype: str = "float32") -> Tuple[int, ...]:
    """The shape of ``model``'s logits (:func:`lrcnn.models.loss.logits_of`) for an input of
    ``shape``: one forward under ``FakeTensorMode`` (no memory, no running statistic moved)."""
    with memory.fake_mode():
        state = memory.fake_state(model)
        x = torch.empty(*shape, dtype=getattr(torch, dtype), device=next(iter(state.values())).device)
        with torch.no_grad():
            out = torch.func.functional_call(model, state, (x,))
        return tuple(int(v) for v in logits_of(out).shape)


NOISE_FACTOR = 10  # one perturbed run samples plain PyTorch's spread; allow an order of magnitude


def noise_errs(case: "Case") -> Dict[str, float]:
    """:func:`rel_errs` of plain PyTorch run with oneDNN and cuDNN off (other, equally valid
    convolution algorithms) against plain PyTorch: the float32 rounding spread of each tensor."""
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
        return rel_errs(case, case.model)


def is_exact(case: "Case", errs: Dict[str, float]) -> bool:
    """Every tensor within the project's bar or, in float32, within ``NOISE_FACTOR`` times plain
    PyTorch's own spread on that tensor (a tensor plain PyTorch reproduces to 1e-7 must match to
    the bar; one whose value is rounding-dominated, like a BN weight gradient after a sum that
    cancels, may differ as plain PyTorch differs from itself)."""
    tol = EXACT_RTOL[case.dtype]
    return all(e <= max(tol, NOISE_FACTOR * case.noise.get(k, 0.0)) for k, e in errs.items())


def _one_step(case: Case, forward: Callable) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Loss, and every parameter gradient (``grad:NAME``) and float buffer (``NAME``) after one
    forward/backward from ``state0``."""
    m = case.model
    m.load_state_dict(case.state0)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the same dropout masks for every method
    loss = cross_entropy(forward(case.x), case.y)  # (per pixel for dense logits)
    loss.backward()
    out = {f"grad:{n}": (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
           for n, p in m.named_parameters()}
    out.update({n: b.detach().clone() for n, b in m.named_buffers() if b.is_floating_point()})
    m.zero_grad(set_to_none=True)
    m.load_state_dict(case.state0)
    return float(loss.detach()), out


def _scale(name: str, ref: Dict[str, torch.Tensor]) -> float:
    """The norm a difference in ``ref[name]`` is measured against.  Its own norm, but never less
    than its natural neighbour's: some quantities are zero by the maths and plain PyTorch's value
    is rounding noise (the gradient of a BN bias whose shift the next train-mode BN removes again;
    the running mean of a BN fed zero-mean maps), so a bias gradient is also scaled by its
    layer's weight gradient and a running mean by the running standard deviation."""
    norm = lambda t: float(torch.linalg.vector_norm(t.double()))  # noqa: E731
    s = norm(ref[name])
    if name.startswith("grad:") and name.endswith(".bias"):
        w = name[:-len("bias")] + "weight"
        if w in ref:
            s = max(s, norm(ref[w]))
    elif name.endswith("running_mean"):
        v = name[:-len("running_mean")] + "running_var"
        if v in ref:
            s = max(s, norm(ref[v].clamp_min(0).sqrt()))
    return s


def rel_errs(case: Case, forward: Callable) -> Dict[str, float]:
    """Norm-wise relative difference to plain PyTorch of the loss (``loss``), every parameter
    gradient and every BN running statistic (scales: :func:`_scale`)."""
    loss, got = _one_step(case, forward)
    rloss, ref = case.reference
    errs = {"loss": abs(loss - rloss) / max(abs(rloss), 1e-30)}
    for name, r in ref.items():
        d = float(torch.linalg.vector_norm((got[name] - r).double()))
        s = _scale(name, ref)
        errs[name] = d / s if s > 0 else d
    return errs


def max_rel_err(case: Case, forward: Callable) -> float:
    """The largest of :func:`rel_errs`."""
    return max(rel_errs(case, forward).values())


def measure(case: Case, m: Method, warmup: int = 1, repeats: int = 5,
            pair: Optional[Callable] = None) -> Dict:
    """Exactness, absolute peak bytes of one step and the median step time of ``m``.

    ``pair``: plain PyTorch's forward; each timed step of ``m`` then comes right after a timed
    plain step, and ``paired_ratio`` is the median of the ratios of the pairs (on a shared
    machine the speed drifts between methods run minutes apart; a pair sees the same drift),
    ``pair_min``/``pair_max`` their range (one pair on a 2-core VM can be off by 0.3)."""
    model, dev = case.model, case.device
    if m.setup:
        m.setup()
    errs = rel_errs(case, m.forward)
    err = max(errs.values())
    model.load_state_dict(case.state0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, OPTIMIZER)
    x, y = case.x, case.y
    for _ in range(max(1, warmup)):  # optimizer state exists, compiled code is compiled
        train_step(m.forward, opt, x, y)
        if pair is not None and m.compiled:
            train_step(pair, opt, x, y)  # a compiled pair compiles outside the timing too
    mem_fwd = m.forward if m.memory_forward is None else m.memory_forward
    if m.memory_forward is not None:
        train_step(mem_fwd, opt, x, y)  # its own compilation, outside the measurement
    state = opt_state(opt)
    rep = memory.measure_step(lambda: train_step(mem_fwd, opt, x, y), device=dev,
                              track_existing=[model, state, x, y], compiled=m.compiled)
    def timed(forward) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        train_step(forward, opt, x, y)
        _sync(dev)
        return time.perf_counter() - t0

    times, ratios = [], []
    for _ in range(max(1, repeats)):
        t_plain = timed(pair) if pair is not None else None
        times.append(timed(m.forward))
        if t_plain is not None:
            ratios.append(times[-1] / t_plain)
    model.load_state_dict(case.state0)
    return {"peak_bytes": float(rep.absolute_peak), "step_bytes": float(rep.peak_bytes),
            "baseline_bytes": float(rep.baseline_bytes), "step_s": statistics.median(times),
            "paired_ratio": statistics.median(ratios) if ratios else math.nan,
            "pair_min": min(ratios, default=math.nan), "pair_max": max(ratios, default=math.nan),
            "max_rel_err": err, "exact": is_exact(case, errs), "mem_method": rep.method}
