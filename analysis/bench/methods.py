"""The methods lrcnn is measured against (checkpointing per block and sqrt(n), torch.compile's
memory budget, Rockmate; lightstream: :mod:`~lrcnn.analysis.bench.lightstream_peer`) and lrcnn's own
plans across the budget range."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from lrcnn.analysis.bench.cases import BenchError, Case, Method, OPTIMIZER
from lrcnn.executor import apply_plan
from lrcnn.executor.compiled import compile_plan
from lrcnn.models.capture import trace
from lrcnn.planner.solve import Solver, capture_model

GiB = 2**30


def split_blocks(model: nn.Module) -> Tuple[nn.Module, List[nn.Module], nn.Module]:
    """``(stem, blocks, head)``: running them in order computes exactly ``model(x)``.  The blocks are
    what people checkpoint: residual blocks (ResNet), inverted-residual blocks (MobileNetV2), VGG
    stages (convolutions up to and including a max-pool), and for dense models (:func:`dense_blocks`)
    the U-Net's levels and torchvision's ResNet-backbone segmentation models' residual blocks and
    classifier.  What passes between blocks is a tensor, or for dense models a tuple (the U-Net's
    skips; the input size the segmentation head resamples to)."""
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
        dense = dense_blocks(model)
        if dense is None:
            raise BenchError(f"no block structure known for {type(model).__name__}: the checkpoint baselines "
                             f"cover torchvision ResNet, VGG and MobileNetV2 models, the zoo's UNet and "
                             f"torchvision's FCN / DeepLabV3 with a ResNet backbone")
        return dense
    return stem, blocks, head


# ---- dense models: the blocks pass a tuple along (U-Net: the skips so far; FCN: the map and the
# input size its head resamples to); each block reads and replaces the tuple's last entries

class _Skips(nn.Module):
    """U-Net stem: the input as a one-entry tuple."""

    def forward(self, x):
        return (x,)


class _Level(nn.Module):
    """A U-Net level down: ``block`` on the last entry, its output appended (a skip), or replacing
    the input (``push=False``: the first level, whose input is no skip)."""

    def __init__(self, block: nn.Module, push: bool = True) -> None:
        super().__init__()
        self.block, self.push = block, push

    def forward(self, skips):
        y = self.block(skips[-1])
        return (*skips, y) if self.push else (*skips[:-1], y)


class _UpLevel(nn.Module):
    """A U-Net level up: the last entry up-sampled, concatenated after the skip before it, the
    level's convolutions: the two entries replaced by the result (the zoo UNet's ``forward``)."""

    def __init__(self, up: nn.Module, dec: nn.Module) -> None:
        super().__init__()
        self.up, self.dec = up, dec

    def forward(self, skips):
        return (*skips[:-2], self.dec(torch.cat([skips[-2], self.up(skips[-1])], dim=1)))


class _Last(nn.Module):
    """U-Net head: ``block`` on the one entry left."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, skips):
        (x,) = skips
        return self.block(x)


class _SizedStem(nn.Module):
    """Segmentation stem: ``(stem(x), input size)``."""

    def __init__(self, stem: nn.Module) -> None:
        super().__init__()
        self.stem = stem

    def forward(self, x):
        return (self.stem(x), x.shape[-2:])


class _Sized(nn.Module):
    """A block of a segmentation model: on the map, the input size carried along."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, state):
        h, size = state
        return (self.block(h), size)


class _SizedHead(nn.Module):
    """torchvision's segmentation head's end: the logits resampled to the input size, as ``{"out": ...}``."""

    def forward(self, state):
        h, size = state
        return {"out": nn.functional.interpolate(h, size=size, mode="bilinear", align_corners=False)}


def dense_blocks(model: nn.Module) -> Optional[Tuple[nn.Module, List[nn.Module], nn.Module]]:
    """``(stem, blocks, head)`` of a dense model whose structure is known, else ``None``.

    * the zoo's :class:`~lrcnn.models.zoo.UNet`: blocks = the first level's convolutions, every
      level down (max-pool and convolutions), every level up (transposed convolution, concatenation
      with the skip, convolutions); the skips are block outputs, kept as checkpointing keeps
      every block's output; head = the 1x1 classifier;
    * torchvision's FCN / DeepLabV3 with a ResNet backbone (no auxiliary head): stem = the
      backbone's stem, blocks = its residual blocks and the classifier, head = the bilinear
      resampling to the input size (``{"out": logits}``)."""
    from torchvision.models.segmentation._utils import _SimpleSegmentationModel

    from lrcnn.models.zoo import UNet

    if isinstance(model, UNet):
        blocks = [_Level(model.inc, push=False)] + [_Level(d) for d in model.down]
        blocks += [_UpLevel(u, d) for u, d in zip(model.up, model.dec)]
        return _Skips(), blocks, _Last(model.outc)
    if isinstance(model, _SimpleSegmentationModel) and model.aux_classifier is None:
        bb = model.backbone
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        if list(bb.keys()) == list(names) and dict(bb.return_layers) == {"layer4": "out"}:
            stem = _SizedStem(nn.Sequential(bb.conv1, bb.bn1, bb.relu, bb.maxpool))
            blocks = [_Sized(b) for layer in (bb.layer1, bb.layer2, bb.layer3, bb.layer4) for b in layer]
            return stem, blocks + [_Sized(model.classifier)], _SizedHead()
    return None


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
    """``checkpoint_sequential`` over ``[stem, *blocks, head]`` with round(sqrt(n)) segments (for a
    U-Net every skip alive at a segment's start is that segment's input, and kept)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        stem, blocks, head = split_blocks(model)
        self.seq = nn.Sequential(*[m for m in (stem, *blocks, head) if not (isinstance(m, nn.Sequential) and len(m) == 0)])
        self.segments = max(1, round(math.sqrt(len(self.seq))))

    def forward(self, x):
        return checkpoint_sequential(self.seq, self.segments, x, use_reentrant=False)


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


class LrcnnPlans:
    """``planner.solve`` for one case: the captured graph and Solver reused for every budget."""

    def __init__(self, case: Case, policy: str, profile: str, compiled: bool = False) -> None:
        # the case's own model: a frozen-BN case's BN parameters get no gradient, and the plan knows
        bn = "train" if case.bn == "train" else "eval"
        _, self.graph = capture_model(case.model, case.shape, case.dtype, bn=bn)
        self.case = case
        self.policy = policy
        self.compiled = compiled  # plans priced for compile_plan (fused pointwise recompute is free)
        self.solver = Solver(self.graph, case.model_name, policy=policy, bn=bn, optimizer=OPTIMIZER,
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
