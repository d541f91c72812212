"""lrcnn against the alternatives, measured side by side in one run.

    python -m bench compare                          # every case (CPU: tens of minutes)
    python -m bench compare --case resnet50 --methods plain,checkpoint-blocks,lrcnn
    python -m bench compare --case resnet18 --batch 2 --resolution 64 --out-dir /tmp/b
    python -m bench compare --study                  # max batch / resolution under 8 GiB (simulated)
    planner bench ...                                # the same

For each case (model, batch, resolution; BatchNorm in training mode for every method) every method
runs real training steps (cross-entropy, SGD with momentum) on the same model and batch:

* ``plain``: plain PyTorch;
* ``checkpoint-blocks``: ``torch.utils.checkpoint`` (non-reentrant) around every residual block
  (ResNet), inverted-residual block (MobileNetV2) or stage (VGG);
* ``checkpoint-sqrt``: ``checkpoint_sequential`` over stem, blocks and head with sqrt(n) segments;
* ``compile``: ``torch.compile`` (Inductor) with ``torch._functorch.config.activation_memory_budget``
  at ``--compile-budgets``; its time ratio is against compiled plain (budget 1.0).  On the CPU the
  storage tracker cannot see inside Inductor's kernels, so memory is measured on the same partition
  (same decompositions, same budget) executed op by op (backend ``aot_eager_decomp_partition``):
  an upper bound on Inductor's transients, flagged in the ``note`` column.  On CUDA the allocator
  sees the real compiled step.  Compiled methods draw dropout masks from eager's generator
  (:func:`compile_settings`);
* ``rockmate``: the PyPI package, if it imports and runs here; otherwise one row saying why;
* ``lightstream``: StreamingCNN (PyPI ``lightstream``, ``pip install -e '.[bench]'``) streaming the
  case's ResNet trunk (``conv1..layer4``, eval-mode BN: it freezes normalization) in tiles of half
  the input; this run records whether it can stream that trunk on this device, and why not;
* ``lrcnn``: plans from ``planner.solve`` at a sweep of budgets from the smallest feasible one up to
  the plain step's peak, plus one plan at each alternative's measured peak (same budget, so the
  Pareto comparison is direct); ``lrcnn-checkpoint``: the same with ``policy='checkpoint'``, so the
  gain from rows is visible on its own; ``lrcnn-compile``: the same sweep solved for compilation
  (``Solver(compiled=True)``: recomputing BN / ReLU / add in a store segment is fused into the
  backward, priced free) and executed through ``torch.compile``
  (:func:`executor.compiled.compile_plan`, Inductor, activation budget 1.0: the plan decides what is
  recomputed), timed in pairs with compiled plain, its time ratio against compiled plain and its
  memory measured as for ``compile``.

Per method: absolute peak memory of one step (parameters, gradients, optimizer state, batch,
activations, transients: CUDA allocator statistics on GPU, storage accounting on CPU), median step
time over ``--repeats`` steps after warm-up, both as ratios to plain, and ``max_rel_err``: the
largest norm-wise relative difference to plain PyTorch over the loss, every parameter gradient and
the BatchNorm running statistics after one step from the same state (``exact``: within 1e-5, the
float32 bar; checkpointing recomputes train-mode BN and so updates its running statistics twice).
In float32 a full-size step is not reproducible to 1e-5 even by PyTorch itself: plain PyTorch with
its vendor convolution library switched off (oneDNN / cuDNN) differs from plain PyTorch by up to
~1e-2 on the gradients of BN weights after sums that cancel.  Each case measures that spread per
tensor (``noise``; ``noise_floor`` its largest); in float32 a method is exact when every tensor is
within the bar or within ``NOISE_FACTOR`` times plain's own spread on that tensor (shown as
``<= spread``), and the maths is checked separately in float64 (``--dtype float64``: 1e-10).

Outputs in ``--out-dir`` (default ``bench/results``): ``compare-<device>.csv``, ``.png`` (memory vs
time, Pareto front per method) and ``.md`` (the table the README includes).  ``--study`` writes
``study-<device>.csv``/``.md``: the largest batch (ResNet-50 224x224) and the largest square input
(ResNet-50 batch 1) whose step fits ``--study-budget`` (8 GiB), for plain, both checkpoint methods
(simulated: the same step under FakeTensorMode) and lrcnn (the planner's prediction, then the plan
simulated by the executor under FakeTensorMode).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from lrcnn.errors import LrcnnError
from lrcnn.executor import apply_plan
from lrcnn.models import memory
from lrcnn.executor.measure import make_optimizer, opt_state, train_step
from lrcnn.models import get_model, set_bn_mode

from lrcnn.analysis.bench import CASES

EXACT_RTOL = {"float32": 1e-5, "float64": 1e-10}  # the project's bars (norm-wise relative)
OPTIMIZER = "momentum"  # SGD with momentum, at its default learning rate
GiB = 2**30


class BenchError(LrcnnError, ValueError):
    """Bad benchmark input: the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# the alternatives, written the way a user of them would write them
# --------------------------------------------------------------------------------------------
def split_blocks(model: nn.Module) -> Tuple[nn.Module, List[nn.Module], nn.Module]:
    """``(stem, blocks, head)`` of a torchvision ResNet, VGG or MobileNetV2: running them in order
    computes exactly ``model(x)``.  The blocks are what people checkpoint: residual blocks,
    inverted-residual blocks, VGG stages (convolutions up to and including a max-pool)."""
    from torchvision.models import VGG, MobileNetV2, ResNet

    if isinstance(model, ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    elif isinstance(model, VGG):
        blocks, cur = [], []
        for m in model.features:
            cur.append(m)
            if isinstance(m, nn.MaxPool2d):
                blocks.append(nn.Sequential(*cur))
                cur = []
        if cur:
            blocks.append(nn.Sequential(*cur))
        stem = nn.Sequential()
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
    elif isinstance(model, MobileNetV2):
        feats = list(model.features)
        stem, blocks = feats[0], feats[1:-1]
        head = nn.Sequential(feats[-1], nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), model.classifier)
    else:
        raise BenchError(f"no block structure known for {type(model).__name__}: the checkpoint baselines "
                         f"cover torchvision ResNet, VGG and MobileNetV2 models")
    return stem, blocks, head


class CheckpointBlocks(nn.Module):
    """``torch.utils.checkpoint`` (non-reentrant) around every block of :func:`split_blocks`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stem, blocks, self.head = split_blocks(model)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return self.head(x)


class CheckpointSqrt(nn.Module):
    """``checkpoint_sequential`` over ``[stem, *blocks, head]`` with round(sqrt(n)) segments."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        stem, blocks, head = split_blocks(model)
        self.seq = nn.Sequential(*[m for m in (stem, *blocks, head) if not (isinstance(m, nn.Sequential) and len(m) == 0)])
        self.segments = max(1, round(math.sqrt(len(self.seq))))

    def forward(self, x):
        return checkpoint_sequential(self.seq, self.segments, x, use_reentrant=False)


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
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
    model: nn.Module = field(repr=False, default=None)
    x: torch.Tensor = field(repr=False, default=None)
    y: torch.Tensor = field(repr=False, default=None)
    state0: Dict[str, torch.Tensor] = field(repr=False, default=None)
    reference: Tuple = field(repr=False, default=None)
    noise: Dict[str, float] = field(repr=False, default_factory=dict)  # plain's own float32 spread

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
              dtype: str = "float32", seed: int = 0) -> Case:
    """The real model (random weights, train-mode BN), a fixed batch and the plain reference."""
    torch.manual_seed(seed)
    model = get_model(model_name).to(device=device, dtype=getattr(torch, dtype))
    model.train()
    set_bn_mode(model, "train")
    case = Case(name, model_name, batch, resolution, device, dtype, model)
    case.x = torch.randn(*case.shape, device=device, dtype=getattr(torch, dtype))
    case.y = torch.randint(0, 1000, (batch,), device=device)
    case.state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    case.reference = _one_step(case, model)
    if dtype == "float32":
        case.noise = noise_errs(case)
    return case


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
    loss = F.cross_entropy(forward(case.x), case.y)
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


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def compile_settings():
    """Settings for the compiled methods, restored (and Dynamo's caches dropped) on exit; each
    compiled method sets its activation-memory budget in its ``setup``.  Inductor draws random
    numbers its own way on the CPU, so a compiled dropout would drop other units than eager
    PyTorch does (MobileNetV2's classifier: gradients 0.7 relative apart); ``fallback_random``
    makes it use eager's generator, so a compiled step is the same maths and its exactness is
    judged like any other method's."""
    import torch._functorch.config as fconf
    import torch._inductor.config as iconf

    old = fconf.activation_memory_budget, iconf.fallback_random
    try:
        torch._dynamo.reset()
        iconf.fallback_random = True
        yield
    finally:
        fconf.activation_memory_budget, iconf.fallback_random = old
        torch._dynamo.reset()


def compile_methods(case: Case, budgets: Sequence[float]) -> List[Method]:
    """``torch.compile`` at each activation-memory budget (1.0 = compiled plain first).

    Each compiles its own fx trace of the model (the same modules and ops, so the same compiled
    program as ``torch.compile(model)``): Dynamo keys compiled code by the code object and does not
    guard on the budget, so compiling ``model`` itself at another budget would reuse compiled
    plain's program, and dropping the caches in between would drop compiled plain, the pair every
    other compiled method is timed against."""
    from lrcnn.models.capture import trace

    out = []
    for b in sorted(set([1.0] + [float(v) for v in budgets]), reverse=True):
        fwd, mem, note = _compiled(case, lambda **kw: torch.compile(trace(case.model), **kw))
        out.append(Method("compile", f"activation_memory_budget={b:g}", fwd, mem, compiled=True,
                          note=note, setup=_budget_setup(b)))
    return out


def _compiled(case: Case, compile_: Callable[..., Callable]) -> Tuple[Callable, Optional[Callable], str]:
    """``(forward, memory_forward, note)`` of a compiled method: ``compile_(**kwargs)`` with
    Inductor, and on the CPU again with ``aot_eager_decomp_partition`` (the same partition run op
    by op: the storage tracker cannot see inside Inductor's kernels) for the memory step."""
    if case.device.type == "cuda":
        return compile_(), None, ""
    return (compile_(), compile_(backend="aot_eager_decomp_partition"),
            "memory: same partition run op by op (CPU tracker cannot see Inductor buffers)")


def _budget_setup(budget: float) -> Callable[[], None]:
    """A compiled method's ``setup``: the activation-memory budget its partition is made with (read
    when it compiles, at its first call)."""
    def setup() -> None:
        import torch._functorch.config as fconf

        fconf.activation_memory_budget = budget
    return setup


def rockmate_status() -> str:
    """Why Rockmate cannot be benchmarked here ('' if it imports and has a device to run on)."""
    try:
        import rockmate  # noqa: F401
    except ImportError as e:
        return f"import rockmate fails: {e}".replace("\n", " ")
    except Exception as e:  # a broken install raises anything
        return f"import rockmate fails: {type(e).__name__}: {e}".replace("\n", " ")
    if not torch.cuda.is_available():
        return "rockmate imports but runs on CUDA only (it hard-codes torch.device('cuda')); no GPU here"
    return ""


def rockmate_methods(case: Case, budgets: Sequence[float]) -> List[Method]:
    why = rockmate_status()
    if why:
        return [Method("rockmate", "-", note=why)]
    import rockmate

    out = []
    for b in budgets:
        try:
            rm = rockmate.Rockmate(case.model, case.x, budget=int(b))
        except Exception as e:  # record, do not stop the suite
            out.append(Method("rockmate", f"budget={b / GiB:.2f}GiB", note=f"{type(e).__name__}: {e}"[:200]))
            continue
        out.append(Method("rockmate", f"budget={b / GiB:.2f}GiB", rm, budget_bytes=b))
    return out


def lightstream_status(case: Case) -> str:
    """Why lightstream cannot stream the case's trunk on its device ('' if it can): imports the
    package and builds a StreamingCNN over ``conv1..layer4`` (eval BN) in tiles of half the input,
    as its own ResNet example does; the first line of whatever fails."""
    try:
        from lightstream.core.constructor import StreamingConstructor
    except ImportError as e:
        return f"import lightstream fails: {e} (pip install -e '.[bench]')".replace("\n", " ")
    except Exception as e:  # a broken install raises anything
        return f"import lightstream fails: {type(e).__name__}: {e}".replace("\n", " ")
    import copy
    import contextlib
    import io

    model = copy.deepcopy(case.model).eval()
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    if not all(hasattr(model, n) for n in names):
        return f"lightstream streams ResNet-type trunks (conv1..layer4); {case.model_name} is not one"
    trunk = nn.Sequential(*[getattr(model, n) for n in names])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # (it prints its progress)
            StreamingConstructor(trunk, max(1, case.resolution // 2), verbose=False,
                                 copy_to_gpu=case.device.type == "cuda", statistics_on_cpu=True,
                                 normalize_on_gpu=False).prepare_streaming_model()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"lightstream cannot build its StreamingCNN here: {type(e).__name__}: {first}"[:300]
    return ""


def lightstream_methods(case: Case) -> List[Method]:
    why = lightstream_status(case)
    return [Method("lightstream", f"tile {case.resolution // 2}",
                   note=why or "builds on this device; its measured step is issue 26's GPU work, not written yet")]


class LrcnnPlans:
    """``planner.solve`` for one case: the captured graph and Solver reused for every budget."""

    def __init__(self, case: Case, policy: str, profile: str, compiled: bool = False) -> None:
        from lrcnn.models.capture import build_and_capture
        from lrcnn.planner.solve import Solver

        _, self.graph = build_and_capture(case.model_name, case.batch, (case.resolution, case.resolution),
                                          case.dtype, "train")
        self.case = case
        self.policy = policy
        self.compiled = compiled  # plans priced for compile_plan (fused pointwise recompute is free)
        self.solver = Solver(self.graph, case.model_name, policy=policy, bn="train", optimizer=OPTIMIZER,
                             device_profile=profile, compiled=compiled)

    def smallest(self) -> int:
        return self.solver.smallest_budget()

    def method(self, budget: float) -> Method:
        """The plan at ``budget``, executed eagerly (``apply_plan``) or, for plans priced for
        compilation, through ``torch.compile`` (``compile_plan``; memory then measured on the same
        program run op by op on the CPU, as for ``compile``)."""
        compiled = self.compiled
        name = "lrcnn" if self.policy == "auto" else f"lrcnn-{self.policy}"
        if compiled:
            name = "lrcnn-compile" if self.policy == "auto" else f"{name}-compile"
        setting = f"budget={budget / GiB:.3f}GiB"
        if budget < self.smallest():
            return Method(name, setting, budget_bytes=budget,
                          note=f"infeasible: smallest budget {self.smallest() / GiB:.3f} GiB")
        plan = self.solver.solve(int(budget))
        kinds = sorted({s.mode if s.mode != "rows" else f"rows-{s.policy}" for s in plan.segments}) or ["plain"]
        note = "+".join(kinds)
        if not compiled:
            return Method(name, setting, apply_plan(self.case.model, plan, self.graph), budget_bytes=budget,
                          predicted_peak_bytes=float(plan.predicted["peak_bytes"]), note=note)
        from lrcnn.executor.compiled import compile_plan

        fwd, mem, how = _compiled(self.case, lambda **kw: compile_plan(self.case.model, plan, self.graph, **kw))
        # the prediction is for eager execution: not this program's promise.  Budget 1.0: what is
        # recomputed is the plan's choice
        return Method(name, setting, fwd, mem, compiled=True, budget_bytes=budget,
                      note="; ".join(filter(None, [note, how])), setup=_budget_setup(1.0))


def sweep(lo: float, hi: float, points: int) -> List[float]:
    """``points`` budgets spaced geometrically from ``lo`` to ``hi``."""
    if points <= 1 or hi <= lo:
        return [lo]
    r = (hi / lo) ** (1.0 / (points - 1))
    return [lo * r**i for i in range(points)]


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def run_case(case: Case, methods: Sequence[str], compile_budgets: Sequence[float], points: int,
             profile: str, warmup: int, repeats: int, progress: bool = True,
             on_row: Optional[Callable[[List[Dict]], None]] = None, paired: bool = True) -> List[Dict]:
    """Every method on one case; rows for the CSV (ratios to plain filled in).  ``on_row(rows)``
    is called after every method with the case's rows so far (a long run saves as it goes).
    ``paired``: time every eager method in pairs with plain steps (:func:`measure`)."""
    from tqdm import tqdm

    rows: List[Dict] = []

    def record(m: Method, **res):
        rows.append(dict(case=case.name, model=case.model_name, batch=case.batch, resolution=case.resolution,
                         dtype=case.dtype, noise_floor=case.noise_floor,
                         method=m.method, setting=m.setting, budget_bytes=m.budget_bytes,
                         predicted_peak_bytes=m.predicted_peak_bytes, note=m.note, simulated=False, **res))

    def run(m: Method, bar):
        bar.set_postfix_str(f"{m.method} {m.setting}")
        if m.forward is None:
            record(m, peak_bytes=math.nan, step_bytes=math.nan, baseline_bytes=math.nan, step_s=math.nan,
                   paired_ratio=math.nan, pair_min=math.nan, pair_max=math.nan, max_rel_err=math.nan,
                   exact=False, mem_method="")
        else:
            pair = None
            if paired and m.method != "plain":
                pair = (compiled_plain if compiled_plain is not m.forward else None) if m.compiled else case.model
            record(m, **measure(case, m, warmup, repeats, pair=pair))
        bar.update(1)
        if on_row is not None:
            on_row(_ratios(rows))

    def run_compiled(m: Method, bar):
        try:
            run(m, bar)
        except Exception as e:  # e.g. Inductor without a C++ compiler: record why, go on
            m.note = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:200]
            m.forward = None
            run(m, bar)

    fixed = [Method("plain", "-", case.model)]  # always: the reference of every ratio
    if "checkpoint-blocks" in methods:
        fixed.append(Method("checkpoint-blocks", "non-reentrant", CheckpointBlocks(case.model)))
    if "checkpoint-sqrt" in methods:
        cs = CheckpointSqrt(case.model)
        fixed.append(Method("checkpoint-sqrt", f"{cs.segments} segments of {len(cs.seq)}", cs))
    plans = [LrcnnPlans(case, policy, profile) for policy, name in (("auto", "lrcnn"), ("checkpoint", "lrcnn-checkpoint"))
             if name in methods]
    compiled_plain = None  # the pair of compiled methods: torch.compile of the model at budget 1.0
    n_compile = len(set([1.0] + list(compile_budgets))) if "compile" in methods else 0
    with tqdm(total=len(fixed) + n_compile, desc=case.name, unit="method", disable=not progress,
              file=sys.stderr) as bar, compile_settings():
        for m in fixed:
            run(m, bar)
        if "compile" in methods:
            for m in compile_methods(case, compile_budgets):
                run_compiled(m, bar)
                if m.setting.endswith("=1") and m.forward is not None:  # the first: the others' pair
                    compiled_plain = m.forward
        alt_peaks = [r["peak_bytes"] for r in rows if r["method"] != "plain" and not math.isnan(r["peak_bytes"])]
        if "rockmate" in methods:
            rm = rockmate_methods(case, alt_peaks or [rows[0]["peak_bytes"]])
            bar.total += len(rm)
            for m in rm:
                run(m, bar)
        if "lightstream" in methods:
            ls = lightstream_methods(case)
            bar.total += len(ls)
            for m in ls:
                run(m, bar)
        if "lrcnn-compile" in methods:
            plans.append(LrcnnPlans(case, "auto", profile, compiled=True))
            if compiled_plain is None:  # compiled at its first call, under the first plan's setup (1.0)
                from lrcnn.models.capture import trace

                compiled_plain = torch.compile(trace(case.model))
        for pl in plans:
            budgets = sweep(pl.smallest(), max(pl.smallest(), rows[0]["peak_bytes"]), points)
            budgets = sorted(set(int(b) for b in budgets + alt_peaks if b >= pl.smallest()))
            bar.total += len(budgets)
            for b in budgets:
                (run_compiled if pl.compiled else run)(pl.method(b), bar)
    return _ratios(rows)


def _ratios(rows: List[Dict]) -> List[Dict]:
    """Fill ``mem_ratio``/``time_ratio`` against plain (compile, lrcnn-compile: against compiled
    plain; a method timed in pairs with plain steps: the median ratio of its pairs)."""
    plain = next(r for r in rows if r["method"] == "plain")
    cplain = next((r for r in rows if r["method"] == "compile" and r["setting"].endswith("=1")), None)
    for r in rows:
        base = cplain if (r["method"] in ("compile", "lrcnn-compile") and cplain) else plain
        r["mem_ratio"] = r["peak_bytes"] / plain["peak_bytes"]
        paired = r.get("paired_ratio", math.nan)
        if not math.isnan(paired):
            r["time_ratio"] = paired
        else:
            r["time_ratio"] = r["step_s"] / base["step_s"] if base["step_s"] else math.nan
    return rows


# --------------------------------------------------------------------------------------------
# summary: targets, markdown, plot
# --------------------------------------------------------------------------------------------
def pareto(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The (memory, time) points no other point beats in both."""
    front, best = [], math.inf
    for mem, t in sorted(points):
        if t < best:
            front.append((mem, t))
            best = t
    return front


def targets(df) -> List[Dict]:
    """Per case: lrcnn's minimum peak against the best alternative's, on both measures (absolute
    and the step's own bytes: what the step adds above parameters, optimizer state and batch,
    the measure the original LR-CNN numbers use), and the Pareto check: an alternative is beaten
    when an exact lrcnn plan has no more absolute peak and no more time relative to plain (for
    torch.compile: relative to compiled plain, as its time is compared); ``pareto_ties`` counts the
    others an exact lrcnn plan with no more peak matches within noise (its median ratio is above
    the alternative's, the lowest of its paired ratios is not)."""
    out = []
    ok = df[df.peak_bytes.notna()]
    for case, d in ok.groupby("case", sort=False):
        mine = d.method.str.startswith("lrcnn")
        lr = d[mine & d.exact]
        alts = d[~mine]
        if lr.empty or alts.empty:
            continue
        best_alt = alts.loc[alts.peak_bytes.idxmin()]
        step = {}
        if "step_bytes" in d and d.step_bytes.notna().all():
            best_step = alts.loc[alts.step_bytes.idxmin()]
            step = dict(lrcnn_min_step_bytes=lr.step_bytes.min(), best_alt_step=f"{best_step.method} {best_step.setting}",
                        best_alt_min_step_bytes=best_step.step_bytes,
                        step_min_ratio=lr.step_bytes.min() / best_step.step_bytes)
        dominated, total, ties = 0, 0, 0
        for _, a in alts.iterrows():
            if a.method == "plain":
                continue
            total += 1
            # time as the ratio to each method's own plain (compile: compiled plain), as the issue asks
            fits = lr[lr.peak_bytes <= a.peak_bytes]
            if (fits.time_ratio <= a.time_ratio).any():
                dominated += 1
            elif "pair_min" in fits and (fits.pair_min <= a.time_ratio).any():
                ties += 1  # not beaten, but within the range of an lrcnn row's paired ratios
        out.append(dict(case=case, lrcnn_min_bytes=lr.peak_bytes.min(), best_alt=f"{best_alt.method} {best_alt.setting}",
                        best_alt_min_bytes=best_alt.peak_bytes,
                        min_ratio=lr.peak_bytes.min() / best_alt.peak_bytes,
                        pareto=f"{dominated}/{total}", pareto_ties=ties, **step))
    return out


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        import os
        what = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return (f"{what}; torch {torch.__version__}; {datetime.date.today().isoformat()}")


def markdown(df, tg: List[Dict], device: torch.device) -> str:
    from lrcnn.planner.units import fmt_bytes

    lines = [f"Measured on {machine_line(device)}. Peak = absolute bytes of one training step "
             f"(SGD momentum, train-mode BN); step peak = what the step adds above parameters, optimizer "
             f"state and batch (activations, gradients, transients: the original LR-CNN's measure); "
             f"time = median step; ratios against plain PyTorch "
             f"(compile, lrcnn-compile: against compiled plain; time of a method with a `paired_ratio` in "
             f"the CSV: the median ratio of its steps to a plain step (compiled methods: a compiled plain "
             f"step) timed right before each, in brackets the range of those ratios). "
             f"exact = gradients, loss and BN running statistics "
             f"within {EXACT_RTOL['float32']:g} (float32; float64: {EXACT_RTOL['float64']:g}) norm-wise "
             f"relative of plain PyTorch, or, in float32, per tensor within {NOISE_FACTOR}x plain PyTorch's own "
             f"spread (the same step with oneDNN/cuDNN off; shown as `<= spread`); float64 runs check the "
             f"maths to 1e-10.", ""]
    for case, d in df.groupby("case", sort=False):
        r0 = d.iloc[0]
        spread = f"; float32 spread of plain PyTorch {r0['noise_floor']:.1e}" if r0['dtype'] == "float32" else ""
        where = r0.get("device")
        where = f"; measured on {where}" if isinstance(where, str) and where != machine_line(device) else ""
        lines += [f"**{case}** ({r0['model']}, batch {r0['batch']}, {r0['resolution']}x{r0['resolution']}, "
                  f"{r0['dtype']}{spread}{where})", "",
                  "| method | setting | peak | x plain | step peak | step s | x plain | exact (max rel err) | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for _, r in d.iterrows():
            note = r.note if isinstance(r.note, str) else ""  # empty notes read back from CSV as NaN
            if math.isnan(r.peak_bytes):
                lines.append(f"| {r.method} | {r.setting} | - | - | - | - | - | - | {note} |")
                continue
            sp = fmt_bytes(r.step_bytes) if "step_bytes" in r and not math.isnan(r.step_bytes) else "-"
            lines.append(f"| {r.method} | {r.setting} | {fmt_bytes(r.peak_bytes)} | {r.mem_ratio:.2f} | {sp} | "
                         f"{r.step_s:.3f} | {_time_cell(r)} | {_exact_cell(r)} | "
                         f"{note} |")
        lines.append("")
    if tg:
        lines += ["| case | measure | lrcnn min (exact plans) | best alternative (its min) | ratio (target <= 0.5) | "
                  "alternatives beaten on both axes (+ matched within the pair range) |", "|---|---|---:|---|---:|---:|"]
        for t in tg:
            ties = t.get("pareto_ties", 0)
            pareto = t["pareto"] + (f" (+{ties})" if ties else "")
            lines.append(f"| {t['case']} | absolute peak | {fmt_bytes(t['lrcnn_min_bytes'])} | {t['best_alt']} "
                         f"({fmt_bytes(t['best_alt_min_bytes'])}) | {t['min_ratio']:.2f} | {pareto} |")
            if "step_min_ratio" in t:
                lines.append(f"| {t['case']} | step peak | {fmt_bytes(t['lrcnn_min_step_bytes'])} | "
                             f"{t['best_alt_step']} ({fmt_bytes(t['best_alt_min_step_bytes'])}) | "
                             f"{t['step_min_ratio']:.2f} | |")
        lines.append("")
    return "\n".join(lines)


def _time_cell(r) -> str:
    """The time ratio; for paired methods with the range of their pairs (``1.21 [1.10-1.35]``)."""
    lo, hi = r.get("pair_min", math.nan), r.get("pair_max", math.nan)  # NaN: unpaired, or an older CSV
    if hi > lo:  # (False when either is NaN)
        return f"{r.time_ratio:.2f} [{lo:.2f}-{hi:.2f}]"
    return f"{r.time_ratio:.2f}"


def _exact_cell(r) -> str:
    if r.exact and r.max_rel_err > EXACT_RTOL.get(r.dtype, 0.0):
        return f"yes ({r.max_rel_err:.1e} <= spread)"
    return f"{'yes' if r.exact else 'no'} ({r.max_rel_err:.1e})"


def plot(df, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrcnn.planner.files import atomic_write

    ok = df[df.peak_bytes.notna()]
    cases = list(dict.fromkeys(ok.case))
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(5.5 * max(1, len(cases)), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        d = ok[ok.case == case]
        for meth, dm in d.groupby("method", sort=False):
            pts = list(zip(dm.peak_bytes / GiB, dm.step_s))
            sc = ax.scatter(*zip(*pts), label=meth, s=22)
            fr = pareto(pts)
            if len(fr) > 1:  # the method's Pareto front, in its colour
                ax.step(*zip(*fr), where="post", alpha=0.6, color=sc.get_facecolor()[0])
        ax.set_title(case)
        ax.set_xlabel("peak memory (GiB)")
        ax.set_ylabel("step time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, "PNG", lambda tmp: fig.savefig(tmp, dpi=110, format="png"), ".png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the study under a fixed budget (simulated)
# --------------------------------------------------------------------------------------------
def simulated_peak(model_name: str, wrapper: Optional[type], shape: Sequence[int]) -> int:
    """Absolute peak of one training step of the (wrapped) model, simulated under FakeTensorMode."""
    with memory.fake_mode():
        torch.manual_seed(0)
        model = get_model(model_name)
        set_bn_mode(model, "train")
        fwd = wrapper(model) if wrapper else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, OPTIMIZER)
        x = torch.randn(*shape)
        y = torch.randint(0, 1000, (shape[0],))
        train_step(fwd, opt, x, y)  # optimizer state
        state = opt_state(opt)
        rep = memory.measure_step(lambda: train_step(fwd, opt, x, y), track_existing=[model, state, x, y])
    return rep.absolute_peak


def study(budget: int, profile: str, model_name: str = "resnet50", resolution: int = 224,
          progress: bool = True, which: str = "both") -> List[Dict]:
    """Largest batch at ``resolution`` and largest square input at batch 1 within ``budget``."""
    from tqdm import tqdm

    from lrcnn.models.capture import build_and_capture
    from lrcnn.planner.solve import max_batch
    from lrcnn.executor.simulate import simulate_plan
    from lrcnn.planner.solve import Solver

    rows = []
    alts = [("plain", None), ("checkpoint-blocks", CheckpointBlocks), ("checkpoint-sqrt", CheckpointSqrt)]
    bar = tqdm(desc="study", unit="size", disable=not progress, file=sys.stderr)

    peaks: Dict[Tuple, int] = {}

    def alt_fits(wrapper, shape_of):
        def fits(n):
            key = (wrapper, shape_of(n))
            if key not in peaks:
                bar.set_postfix_str(f"{getattr(wrapper, '__name__', 'plain')} {'x'.join(map(str, shape_of(n)))}")
                peaks[key] = simulated_peak(model_name, wrapper, shape_of(n))
                bar.update(1)
            return peaks[key] <= budget, peaks[key]
        return fits

    solvers = {}

    def lr_fits(shape_of):
        def fits(n):
            shape = shape_of(n)
            bar.set_postfix_str(f"lrcnn {'x'.join(map(str, shape))}")
            _, g = build_and_capture(model_name, shape[0], (shape[2], shape[3]), "float32", "train")
            s = Solver(g, model_name, bn="train", optimizer=OPTIMIZER, device_profile=profile)
            solvers[shape] = s
            bar.update(1)
            return s.fits(budget), s.min_peak()
        return fits

    # (study, what is fixed, input shape of step n, the size reported for step n, largest n tried);
    # resolutions start at 64: at 32x32 and batch 1, train-mode BN of ResNet's last stage sees one
    # value per channel, which PyTorch refuses
    studies = [("max batch", f"{resolution}x{resolution}", lambda n: (n, 3, resolution, resolution), lambda n: n, 1 << 12),
               ("max resolution", "batch 1", lambda n: (1, 3, 32 * (n + 1), 32 * (n + 1)), lambda n: 32 * (n + 1), 1 << 9)]
    studies = [s for s in studies if which == "both" or s[0] == f"max {which}"]
    for what, fixed, shape_of, size_of, limit in studies:
        best_n = 0
        for name, wrapper in alts:
            fits = alt_fits(wrapper, shape_of)
            n = max_batch(fits, budget, limit, start=best_n or None)
            best_n = max(best_n, n)
            pk = fits(n)[1] if n else math.nan
            rows.append(dict(study=what, fixed=fixed, method=name, largest=size_of(n) if n else 0, peak_bytes=pk,
                             how="simulated (FakeTensorMode step)"))
        # from the best alternative's answer: a capture and solve far past the answer (a 16k image)
        # would take longer than the whole study
        n = max_batch(lr_fits(shape_of), budget, limit, start=best_n or None)
        sim = math.nan
        if n:
            shape = shape_of(n)
            plan = solvers[shape].solve(budget)
            df, _ = simulate_plan(plan)
            sim = float(df[df.phase == "peak"].simulated_bytes.iloc[0])
        rows.append(dict(study=what, fixed=fixed, method="lrcnn", largest=size_of(n) if n else 0, peak_bytes=sim,
                         how="planner prediction; plan simulated (FakeTensorMode executor step)"))
    bar.close()
    best = {}
    for r in rows:
        if r["method"] != "lrcnn":
            best[r["study"]] = max(best.get(r["study"], 0), r["largest"])
    for r in rows:
        r["x_best_alternative"] = r["largest"] / best[r["study"]] if best.get(r["study"]) else math.nan
    return rows


def study_markdown(rows: List[Dict], budget: int, device: torch.device, model_name: str = "resnet50") -> str:
    from lrcnn.planner.units import fmt_bytes

    here = machine_line(device)
    runs = {r["study"]: (r["device"] if isinstance(r.get("device"), str) else here) for r in rows}
    where = here if set(runs.values()) <= {here} else "; ".join(f"{k}: {v}" for k, v in runs.items())
    lines = [f"{model_name}, train-mode BN, SGD momentum, budget {fmt_bytes(budget)}; every number simulated "
             f"(FakeTensorMode, no memory used) on {where}.", "",
             "| study | fixed | method | largest | peak at it | x best alternative | how |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        pk = "-" if math.isnan(r["peak_bytes"]) else fmt_bytes(r["peak_bytes"])
        size = str(r["largest"]) if r["study"] == "max batch" else f"{r['largest']}x{r['largest']}"
        lines.append(f"| {r['study']} | {r['fixed']} | {r['method']} | {size} | {pk} | "
                     f"{r['x_best_alternative']:.2f} | {r['how']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line (arguments: bench.add_compare_arguments, shared with `planner bench`)
# --------------------------------------------------------------------------------------------
def command(args) -> int:
    """Run the benchmark an argparse namespace describes (:func:`bench.add_compare_arguments`).
    Bad input raises ``ValueError``/``OSError`` with a one-line message (the CLI's exit 2)."""
    import os

    import pandas as pd

    from lrcnn.planner.cost import check_profile
    from lrcnn.planner.files import write_csv_atomic
    from lrcnn.planner.files import check_output_path, write_text_atomic
    from lrcnn.planner.units import parse_bytes

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device here; use --device cpu")
    profile = args.profile or ("cpu" if dev.type == "cpu" else "h100")
    check_profile(profile)
    if not os.path.isdir(args.out_dir):
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            raise BenchError(f"--out-dir {args.out_dir!r}: cannot create it ({e.strerror}); give a writable folder")
    tag = "cuda" if dev.type == "cuda" else "cpu"
    if args.study:
        budget = parse_bytes(args.study_budget)
        csv, md = (os.path.join(args.out_dir, f"study-{tag}.{e}") for e in ("csv", "md"))
        for path in (csv, md):
            check_output_path(path, "output")
        running = ["max batch", "max resolution"] if args.study == "both" else [f"max {args.study}"]
        kept = [] if args.fresh else earlier_rows(csv, running, key="study",
                                                  required=["study", "fixed", "method", "largest", "peak_bytes",
                                                            "x_best_alternative", "how"], what="study CSV")
        model_name = args.model or "resnet50"
        split_blocks(get_model(model_name, device="meta"))  # a model the alternatives can wrap: say so now
        rows = study(budget, profile, model_name=model_name, progress=not args.no_progress, which=args.study)
        for r in rows:
            r["device"], r["budget_bytes"] = machine_line(dev), budget
        # a kept study under another budget is another study (rows without one predate the column)
        kept = [r for r in kept if math.isnan(r.get("budget_bytes", math.nan)) or int(r["budget_bytes"]) == budget]
        rows = kept + rows
        df = pd.DataFrame(rows)
        text = study_markdown(rows, budget, dev, model_name)
        write_csv_atomic(df, csv)
        write_text_atomic(text, md, "markdown")
        print(text)
        return 0
    if args.model:
        if args.case:
            raise BenchError("give either --case or --model, not both")
        if not (args.batch and args.resolution):
            raise BenchError("--model needs --batch and --resolution")
        cases = [(f"{args.model}-b{args.batch}-{args.resolution}", args.model, args.batch, args.resolution)]
    else:
        if args.batch or args.resolution:
            raise BenchError("--batch/--resolution define a custom case: give --model too")
        cases = [(c, *CASES[c]) for c in (args.case or list(CASES))]
    csv, png, md = (os.path.join(args.out_dir, f"compare-{tag}.{e}") for e in ("csv", "png", "md"))
    for path in (csv, png, md):
        check_output_path(path, "output")
    for _, model_name, _, _ in cases:  # an unknown model or one without blocks: say so before any work
        split_blocks(get_model(model_name, device="meta"))
    earlier = [] if args.fresh else earlier_rows(csv, [])
    names = [c[0] for c in cases]
    kept = [r for r in earlier if r["case"] not in names]
    # a case run again keeps its place in the table; new cases go after the file's
    order = list(dict.fromkeys([r["case"] for r in earlier] + names))

    def in_order(rs: List[Dict]) -> List[Dict]:
        return sorted(rs, key=lambda r: order.index(r["case"]))

    rows: List[Dict] = list(kept)
    for name, model_name, batch, res in cases:
        case = make_case(name, model_name, batch, res, dev, args.dtype)
        done = list(rows)
        rows += run_case(case, args.methods, args.compile_budgets, args.points, profile, args.warmup, args.repeats,
                         paired=not args.unpaired, progress=not args.no_progress,  # files rewritten after every method: a long run keeps what it measured
                         on_row=lambda case_rows: _write_compare(in_order(done + case_rows), dev, csv, png, md))
        del case
        text = _write_compare(in_order(rows), dev, csv, png, md)
    print(text)
    print(f"wrote {csv}, {png}, {md}", file=sys.stderr)
    return 0


def earlier_rows(csv: str, running: Sequence[str], key: str = "case",
                 required: Sequence[str] = ("case", "method", "setting", "peak_bytes", "step_s", "max_rel_err",
                                            "exact", "device"),
                 what: str = "compare CSV") -> List[Dict]:
    """Rows of an existing ``compare-<device>.csv`` (or ``study-<device>.csv``) whose ``key``
    (case, or study) is not in ``running`` (each keeps its own ``device`` line: machine, torch
    version and date), so a table can be built one case (study) per run.  A file that is not
    such a CSV is an error naming ``--fresh``."""
    import os

    from lrcnn.planner.files import read_table

    if not os.path.exists(csv):
        return []
    df = read_table(csv, list(required), what, "pass --fresh to start it anew or choose another --out-dir",
                    BenchError)
    df = df[~df[key].isin(list(running))]
    return df.to_dict("records")


def _write_compare(rows: List[Dict], dev: torch.device, csv: str, png: str, md: str) -> str:
    import pandas as pd

    from lrcnn.planner.files import write_csv_atomic
    from lrcnn.planner.files import write_text_atomic

    df = pd.DataFrame(rows)
    here = machine_line(dev)
    df["device"] = df["device"].fillna(here) if "device" in df else here  # kept rows: their own run's line
    text = markdown(df, targets(df), dev)
    write_csv_atomic(df, csv)
    plot(df, png)
    write_text_atomic(text, md, "markdown")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.compare ...`` is ``python -m bench compare ...``."""
    from lrcnn.analysis.bench.__main__ import main as bench_main

    return bench_main(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
