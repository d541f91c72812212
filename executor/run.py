"""``planner run``: real training steps with a plan applied, recording predicted vs actual.

One run = load and check the plan, build the plan's model (random weights, ``--seed``) at the
plan's dtype on the chosen device, apply the plan, then ``warmup`` unrecorded steps and ``steps``
recorded ones.  A step is forward, cross-entropy loss (per pixel for a model with dense
``(N, C, H, W)`` logits, e.g. a segmentation model: :mod:`lrcnn.models.loss`), backward,
``optimizer.step()`` and ``zero_grad(set_to_none=True)``.

What is measured, and how (kept honest):

* **Memory** is measured on the *first* recorded step only (``tracked=True`` in the records):
  every later step of a fixed plan at a fixed shape allocates the same tensors, and the CPU
  measurement (:class:`lrcnn.models.memory.StorageTracker`, a dispatch mode) slows the step down by
  half or more, so its time is not used for timing.  Peaks are *absolute* live device bytes, the
  cost model's definition: parameters, buffers, optimizer state, input batch and labels are
  counted from the start of the step (``track_existing``), gradients, activations and transients
  as they appear.  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  (everything allocated on the device, so the same definition).
* **Reserved memory** (what a CUDA out-of-memory error depends on; a plan solved for a GPU profile
  keeps its budget in reserved bytes): CUDA: ``torch.cuda.max_memory_reserved`` of the tracked
  step (``reserved_method='cuda'``), beside the allocator model on the same step's storages
  (``modeled_reserved_bytes``); CPU: the model only (:mod:`lrcnn.models.allocator` on the step's
  recorded allocations, ``reserved_method='model'``).  On CUDA the run uses expandable segments
  unless the allocator is configured otherwise (``alloc_conf`` records the settings, modeled or in
  effect; :func:`lrcnn.models.allocator.prefer_expandable_segments`).
* **Time** is measured on every untracked step (and reported for the tracked one, flagged):
  ``time.perf_counter`` on the CPU, CUDA events on the GPU, taken at the same marks as memory
  (phases and segment boundaries; :func:`lrcnn.models.memory.mark`).  Segment time = time between
  the segment's begin and end marks (backward: from the gradient of its output to the gradient
  of its input, the recomputation of checkpoint/rows segments included).

Records: one row per (step, scope, name); see :data:`COLUMNS`.

Distributed (``torchrun --nproc-per-node N -m lrcnn run PLAN.json ...``): every rank runs the
plan on its own batch of the plan's ``input_shape[0]`` (per-rank) under DistributedDataParallel
with default settings; synthetic data is seeded ``seed + rank``, an ImageFolder is sharded with a
``DistributedSampler``.  Each rank measures itself and writes ``OUT.rank{r}.EXT``; rank 0 gathers
all ranks' records (through the process group) into ``--out`` and prints the summary.  Records
carry ``rank`` and ``world_size``; each rank is its own run (``run_id`` = shared id + ``-r{rank}``).
Memory per rank on the CPU: the storage count does not see DDP's gradient buckets (one more copy
of the gradients, allocated when DDP wraps the model, outside the step); CUDA's allocator does.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from lrcnn.errors import LrcnnError
from lrcnn.executor import distributed as D
from lrcnn.executor.exactness import GRAD_FLOOR, rel, SPREAD_FACTOR, within_plain_spread
from lrcnn.executor.measure import (autocast, DEFAULT_LR, grad_scaler, make_optimizer as _make_optimizer,
                                    measure_memory_step, measure_time_step, StepMeasure, train_step)
from lrcnn.executor.program import apply_plan
from lrcnn.models.allocator import (allocator_settings, expandable_segments, LRCNN_ALLOC_CONF,
                                   prefer_expandable_segments)
from lrcnn.models.capture import compute_dtype
from lrcnn.models.loss import cross_entropy, is_dense, num_classes as _num_classes, pixel_cross_entropy, synthetic_target
from lrcnn.models.zoo import set_bn_mode
from lrcnn.planner.cost import CostError, CostModel, load_profile
from lrcnn.planner.files import atomic_write, check_output_path, write_csv_atomic
from lrcnn.planner.plan import OPTIMIZERS, Plan, plan_model
from lrcnn.planner.solve import capture_model

PHASES = ("forward", "backward", "optimizer")
#: norm-wise relative tolerance of --check-grads per compute dtype: float64 must agree within it;
#: for lower precisions it is the least limit, the judgement being plain's own spread at that
#: precision (:func:`check_grads`).
GRAD_TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}

COLUMNS = [
    "run_id", "rank", "world_size", "step", "tracked", "scope", "name", "phase", "segment", "mode", "order",
    "predicted_peak_bytes", "actual_peak_bytes", "actual_live_bytes", "predicted_reserved_bytes",
    "actual_reserved_bytes", "modeled_reserved_bytes", "predicted_s", "actual_s", "loss",
    "device", "device_name", "torch_version", "cudnn_version", "cudnn_benchmark", "cudnn_deterministic",
    "mem_method", "reserved_method", "alloc_conf", "plan_path", "plan_fingerprint", "model", "batch", "resolution",
    "dtype", "amp", "optimizer", "lr", "budget_bytes", "budget_in", "data", "started",
]


class RunError(LrcnnError, ValueError):
    """Bad input for a run (one line: the problem and the fix); the CLI exits 2."""


@dataclass
class RunResult:
    records: Any                     # pandas DataFrame, columns COLUMNS
    failures: List[str] = field(default_factory=list)  # budget exceeded, ... (exit 1)


# ------------------------------------------------------------------------------------------------
# Predictions
# ------------------------------------------------------------------------------------------------

def predicted_for(plan, graph, device_kind: str = "cpu") -> Dict[str, Any]:
    """What the cost model predicts for this run: the plan's own ``predicted`` block when it was
    made for this kind of device (``cpu`` / ``cuda``), else a fresh prediction with the matching
    profile (a plan solved for an H100 carries CUDA workspace and timings: on the CPU it is
    re-predicted with the ``cpu`` profile).  ``{}`` (NaN in the records) if that fails."""

    pred = dict(plan.predicted or {})
    prof = pred.get("device_profile")
    try:
        kind = load_profile(prof).kind if prof else None
    except CostError:
        kind = None
    if pred and (kind == device_kind or graph is None):
        return pred
    profile = "cpu" if device_kind == "cpu" else (prof if kind == "cuda" else "h100")
    try:
        cm = CostModel(graph, optimizer=plan.training.get("optimizer", "sgd"), profile=profile,
                       loss_in_rows=bool(plan.training.get("loss_in_rows")))
        return cm.predict(plan)
    except Exception as e:  # a cost-model bug must not stop the measurement; say so, once
        print(f"planner: warning: cost model failed ({' '.join(str(e).split()) or type(e).__name__}); "
              f"predicted values are recorded as NaN", file=sys.stderr)
        return pred


def _num(v) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------------------
# Device, model, data, optimizer
# ------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a RunError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RunError("--device cuda: no CUDA GPU is available to this torch "
                           f"({torch.__version__}); use --device cpu or --device auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise RunError(f"--device {name!r} is not one of cuda, cpu, auto")


def device_info(device: torch.device) -> Dict[str, Any]:
    """Device name, torch version and cuDNN settings, for the records."""
    import platform

    info = {"device": str(device), "torch_version": torch.__version__,
            "cudnn_version": None, "cudnn_benchmark": None, "cudnn_deterministic": None}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cudnn_version"] = str(torch.backends.cudnn.version())
        info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        info["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
    else:
        info["device_name"] = platform.processor() or platform.machine() or "cpu"
    return info


def build_model(plan, seed: int = 0):
    """The plan's model with random weights (``seed``) on the CPU, and its capture, checked
    against the plan (:func:`lrcnn.planner.plan.plan_model`)."""

    torch.manual_seed(seed)
    return plan_model(plan, real=True)


def module_graph(model: nn.Module, plan):
    """The capture of your own ``model`` at the plan's input shape, dtype, BN mode and precision,
    checked against the plan (fingerprint, segments: a plan of another model is a PlanError); the
    model is left in training mode with its BatchNorm in the plan's mode."""
    if not isinstance(model, nn.Module):
        raise RunError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bn = plan.training.get("bn", "train")
    _, graph = capture_model(model, plan.input_shape, plan.dtype, bn, amp=plan.training.get("amp"))
    plan.validate(graph)
    set_bn_mode(model, bn)
    return graph


def make_optimizer(plan, params, lr: Optional[float] = None):
    """The optimizer named by ``plan.training['optimizer']`` (sgd | momentum | adam | adamw)."""
    t = plan.training
    name = str(t.get("optimizer", "sgd")).lower()
    if name not in OPTIMIZERS:
        raise RunError(f"plan training.optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}; "
                       f"edit the plan or re-create it")
    lr = float(lr if lr is not None else t.get("lr", DEFAULT_LR[name]))
    wd = float(t.get("weight_decay", 0.01 if name == "adamw" else 0.0))
    return _make_optimizer(params, name, lr, float(t.get("momentum", 0.9)), wd), name, lr


def _synthetic(plan, logits_shape, seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Random batches of the plan's input shape and random class indices for the model's logits
    (one per sample, or one per pixel of dense logits: a synthetic mask)."""
    g = torch.Generator().manual_seed(seed + 1)
    shape, dtype = tuple(plan.input_shape), getattr(torch, plan.dtype)
    while True:
        yield torch.randn(*shape, generator=g).to(dtype), synthetic_target(logits_shape, g)


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _fit(img, size: Tuple[int, int], interpolation=None):
    """A PIL image brought to ``size`` (h, w) as both data readers do: the short side resized to
    the longer of h and w, then a centre crop (``interpolation``: nearest for a mask)."""
    import torchvision.transforms.functional as TF

    h, w = size
    kw = {} if interpolation is None else {"interpolation": interpolation}
    return TF.center_crop(TF.resize(img, max(h, w), **kw), [h, w])


def _image_tensor(img, size: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An RGB PIL image as a model input: fitted to ``size`` (:func:`_fit`), ImageNet-normalised,
    in ``dtype``."""
    import torchvision.transforms.functional as TF

    return TF.normalize(TF.to_tensor(_fit(img, size)), IMAGENET_MEAN, IMAGENET_STD).to(dtype)


def _check_folder(path: str, want: str) -> None:
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise RunError(f"--data {path!r} {what}; give {want} or 'synthetic'")


def _check_count(path: str, count: int, n: int, world_size: int) -> None:
    if count < n * world_size:
        each = f" per rank x {world_size} ranks" if world_size > 1 else ""
        raise RunError(f"--data {path!r} has {count} image(s), fewer than the plan's batch of {n}{each}; "
                       f"add images or plan a smaller batch")


def _decode_first(ds, path: str, first: str, also: str = "") -> None:
    """Decode one sample now (``first``: its file, ``also``: what else it reads): a broken file is
    bad input, not a crash mid-run."""
    try:
        ds[0]
    except RunError:
        raise
    except Exception as e:
        raise RunError(f"--data {path!r}: cannot read {first!r}{also} ({' '.join(str(e).split())}); "
                       f"remove or replace it") from None


def image_folder(path: str, plan, num_classes: int, seed: int = 0, rank: int = 0, world_size: int = 1):
    """A shuffling ``DataLoader`` over a torchvision ``ImageFolder`` at the plan's resolution
    (resize the short side, centre crop to HxW, ImageNet normalisation), full batches only.
    ``world_size > 1``: this rank's shard (``DistributedSampler``, same seed on every rank)."""
    from torchvision.datasets import ImageFolder

    n, _, h, w = plan.input_shape
    _check_folder(path, "an ImageFolder root (one sub-folder per class)")
    dtype = getattr(torch, plan.dtype)
    try:
        ds = ImageFolder(path, transform=lambda img: _image_tensor(img, (h, w), dtype))
    except (FileNotFoundError, RuntimeError) as e:
        raise RunError(f"--data {path!r} holds no usable images ({' '.join(str(e).split())}); "
                       f"put images in one sub-folder per class") from None
    if len(ds.classes) > num_classes:
        raise RunError(f"--data {path!r} has {len(ds.classes)} classes but the plan's model has "
                       f"{num_classes} outputs; re-create the plan with training.num_classes >= {len(ds.classes)}")
    _check_count(path, len(ds), n, world_size)
    _decode_first(ds, path, ds.samples[0][0])
    return _loader(ds, n, seed, rank, world_size)


def _loader(ds, n: int, seed: int, rank: int, world_size: int):
    """A shuffling ``DataLoader`` of full batches of ``n`` over ``ds`` (this rank's shard when
    ``world_size > 1``: a ``DistributedSampler``, the same seed on every rank)."""
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                                      seed=seed, drop_last=True)
        return torch.utils.data.DataLoader(ds, batch_size=n, sampler=sampler, drop_last=True, num_workers=0)
    g = torch.Generator().manual_seed(seed + 1)
    return torch.utils.data.DataLoader(ds, batch_size=n, shuffle=True, drop_last=True, generator=g,
                                       num_workers=0)


IMAGE_EXTS = (".png", ".jpg", ".jpeg")  # images of a dense data folder; masks are .png (lossless)


class ImageMaskPairs(torch.utils.data.Dataset):
    """Image / mask pairs for a dense (per-pixel) model: ``DIR/images/NAME.png|jpg`` and
    ``DIR/masks/NAME.png``, the mask a single-channel image (mode ``L`` or ``P``) whose values are
    class indices.  Both are brought to ``(h, w)`` alike (short side resized, centre crop; the
    mask by nearest neighbour, so it keeps its class indices), the image in ImageNet normalisation
    and ``dtype``; the mask as an ``int64`` (h, w) map.  A mask value outside ``0..num_classes-1``
    is a :class:`RunError`."""

    def __init__(self, pairs: List[Tuple[str, str]], size: Tuple[int, int], num_classes: int, dtype: torch.dtype):
        self.pairs, self.size, self.num_classes, self.dtype = pairs, size, num_classes, dtype

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        import numpy as np
        import torchvision.transforms.functional as TF
        from PIL import Image

        ipath, mpath = self.pairs[i]
        with Image.open(ipath) as im:
            img = im.convert("RGB")
        with Image.open(mpath) as mk:
            if mk.mode not in ("L", "P", "I", "I;16"):
                raise RunError(f"mask {mpath!r} is a {mk.mode} image; a mask holds one class index per pixel "
                               f"(a single-channel PNG, mode L or P)")
            mask = mk.copy()
        x = _image_tensor(img, self.size, self.dtype)
        y = torch.from_numpy(np.array(_fit(mask, self.size, TF.InterpolationMode.NEAREST), dtype=np.int64))
        top = int(y.max())
        if top >= self.num_classes or int(y.min()) < 0:
            raise RunError(f"mask {mpath!r} holds class index {top if top >= self.num_classes else int(y.min())}, "
                           f"outside 0..{self.num_classes - 1} of the plan's model; re-create the plan with "
                           f"training.num_classes > {top} (planner solve --num-classes), or fix the mask")
        return x, y


def mask_folder(path: str, plan, num_classes: int, seed: int = 0, rank: int = 0, world_size: int = 1):
    """A shuffling ``DataLoader`` of image / mask pairs (:class:`ImageMaskPairs`) at the plan's
    resolution, full batches only, for a model with dense logits.  Every image must have its mask
    (same file name, ``.png``) of the image's size: checked for every pair before the run (from
    the files' headers), a :class:`RunError` naming the first that fails."""
    from PIL import Image

    n, _, h, w = plan.input_shape
    _check_folder(path, "a folder with images/ and masks/")
    idir, mdir = os.path.join(path, "images"), os.path.join(path, "masks")
    for d in (idir, mdir):
        if not os.path.isdir(d):
            raise RunError(f"--data {path!r} has no {os.path.basename(d)}/ folder; the plan's model predicts a class "
                           f"per pixel: give DIR/images/*.png|jpg and DIR/masks/*.png (class indices) of the same names")
    images = sorted(f for f in os.listdir(idir) if f.lower().endswith(IMAGE_EXTS))
    if not images:
        raise RunError(f"--data {path!r}: images/ holds no .png or .jpg image")
    pairs = []
    for f in images:
        ipath, mpath = os.path.join(idir, f), os.path.join(mdir, os.path.splitext(f)[0] + ".png")
        if not os.path.isfile(mpath):
            raise RunError(f"--data {path!r}: image images/{f} has no mask masks/{os.path.basename(mpath)}; "
                           f"add it or remove the image")
        try:
            with Image.open(ipath) as im, Image.open(mpath) as mk:
                isize, msize = im.size, mk.size
        except Exception as e:
            raise RunError(f"--data {path!r}: cannot read images/{f} or its mask ({' '.join(str(e).split())}); "
                           f"remove or replace it") from None
        if isize != msize:
            raise RunError(f"--data {path!r}: mask masks/{os.path.basename(mpath)} is {msize[0]}x{msize[1]} (WxH), its "
                           f"image images/{f} {isize[0]}x{isize[1]}; a mask labels its image pixel for pixel")
        pairs.append((ipath, mpath))
    _check_count(path, len(pairs), n, world_size)
    ds = ImageMaskPairs(pairs, (h, w), num_classes, getattr(torch, plan.dtype))
    _decode_first(ds, path, pairs[0][0], " or its mask")
    return _loader(ds, n, seed, rank, world_size)


def _cycle(loader) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # DistributedSampler: a new order per epoch
            loader.sampler.set_epoch(epoch)
        n = 0
        for x, y in loader:
            n += 1
            yield x, y
        if n == 0:  # an empty loader, or a one-shot iterator already used up
            raise RunError(f"the data ({type(loader).__name__}) gave no batch; give a DataLoader or another "
                           f"iterable that can be iterated again, with at least one batch")
        epoch += 1


# ------------------------------------------------------------------------------------------------
# --check-grads
# ------------------------------------------------------------------------------------------------

#: the random seed every model of a --check-grads comparison runs its step under (the same dropout
#: masks in the plain and the planned step; the run's own random state is left as it was)
CHECK_SEED = 1234


def _grad_step(m: nn.Module, x, y, amp: Optional[str],
               inside: bool = False) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """One forward+backward: the loss and every parameter's gradient (None where none was made),
    under :data:`CHECK_SEED`.  ``inside``: the loss is ``m(x, y)`` (a planned module applied with
    ``loss=``)."""
    m.zero_grad(set_to_none=True)
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(CHECK_SEED)
        with autocast(x.device.type, amp):
            loss = m(x, y) if inside else cross_entropy(m(x), y)
        loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_grads(plain: nn.Module, planned: nn.Module, x, y, dtype: str,
                amp: Optional[str] = None, loss_inside: bool = False) -> Tuple[bool, str]:
    """One forward+backward of the plain model and the planned one on the same input: the loss and
    every parameter gradient, compared norm-wise, each gradient against at least
    :data:`~lrcnn.executor.exactness.GRAD_FLOOR` x the whole gradient's norm (a gradient that is
    zero by the maths, a conv bias before a train-mode BN, is rounding noise on both sides).

    float64 must agree within :data:`GRAD_TOL` (1e-10): the planned step is the same maths.  Any
    lower precision (float32, bfloat16/float16 parameters, or ``amp`` autocast) is judged by plain
    PyTorch's own spread at that precision: plain float32 is itself ~1e-4 from the maths on BN-heavy
    nets at small batches, plain bfloat16 0.1-0.3, and a planned step summing in another order is
    as far from plain as plain is from a more precise step of the same weights (float64 for a
    float32 step, float32 for a half-precision one; made here from ``plain``'s weights).  Each
    quantity may differ from plain's by :data:`~lrcnn.executor.exactness.SPREAD_FACTOR` times that
    spread, there or plain's largest over the gradients
    (:func:`~lrcnn.executor.exactness.within_plain_spread`), at least :data:`GRAD_TOL`.
    ``loss_inside``: ``planned`` computes the loss itself, ``planned(x, y)`` (``apply_plan(...,
    loss=...)``), against plain ``cross_entropy(plain(x), y)``."""

    compute = compute_dtype(dtype, amp)
    tol = GRAD_TOL[compute]
    exact = compute == "float64"
    ref_dtype = torch.float64 if compute == "float32" else torch.float32
    ref = None if exact else copy.deepcopy(plain).to(ref_dtype)  # (before plain's step moves BN running stats)
    (l0, g0), (l1, g1) = _grad_step(plain, x, y, amp), _grad_step(planned, x, y, amp, loss_inside)
    for name, r in g0.items():
        if (r is None) != (g1.get(name) is None):
            return False, f"parameter {name!r} has a gradient in one model only"
    under = f"{dtype} under autocast {amp}" if amp else dtype
    if not exact:
        lr, gr = _grad_step(ref, x.to(ref_dtype), y, None)
        del ref
        ok, worst = within_plain_spread({"loss": l1, **g1}, {"loss": l0, **g0}, {"loss": lr, **gr},
                                        factor=SPREAD_FACTOR, tol=tol)
        name, d, limit, spread, largest = worst
        more = str(ref_dtype).replace("torch.", "")
        return ok, (f"worst norm-wise relative difference from plain {under} {d:.3g} at {name!r} (limit {limit:.3g}: "
                    f"{SPREAD_FACTOR:g} x plain {under}'s own distance from {more}, {spread:.3g} there, {largest:.3g} "
                    f"at most over the gradients, the larger counts, at least {tol:g}; its rounding hides smaller "
                    f"errors)")

    floor = GRAD_FLOOR[torch.float64] * math.sqrt(
        sum(float(torch.linalg.vector_norm(g.double())) ** 2 for g in g0.values() if g is not None))
    worst = ("loss", rel(l1.reshape(1), l0.reshape(1)))
    for name, ref_g in g0.items():
        got = g1.get(name)
        if ref_g is None:
            continue
        r = rel(got, ref_g, floor)
        if not r <= worst[1]:  # NaN counts as worst
            worst = (name, r)
    ok = worst[1] <= tol
    return ok, f"worst norm-wise relative difference {worst[1]:.3g} at {worst[0]!r} (tolerance {tol:g} for {under})"


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def check_out(path: Optional[str]) -> None:
    if path is None:
        return
    check_output_path(path, "records", (".parquet", ".csv"))
    if path.endswith(".parquet"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise RunError(f"--out {path!r}: writing Parquet needs pyarrow; install it or use a .csv name") from None


def write_records(df, path: str) -> None:
    """Parquet (or CSV when ``path`` ends in .csv), written atomically."""
    if path.endswith(".csv"):
        write_csv_atomic(df, path)
        return
    try:
        atomic_write(path, "records", lambda tmp: df.to_parquet(tmp, index=False), ".parquet")
    except ImportError:
        raise RunError(f"--out {path!r}: writing Parquet needs pyarrow; install it or use a .csv name") from None


def _rows_for_step(step: int, tracked: bool, meas: StepMeasure, loss: float, plan, pred: Dict[str, Any],
                   base: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []

    def add(scope, name, phase, peak, secs, p_peak, p_s, segment=-1, mode=None, order=-1, live=math.nan,
            reserved=(math.nan, math.nan, math.nan)):
        rows.append(dict(base, step=step, tracked=tracked, scope=scope, name=name, phase=phase,
                         segment=segment, mode=mode, order=order,
                         predicted_peak_bytes=_num(p_peak), actual_peak_bytes=peak if tracked else math.nan,
                         actual_live_bytes=live if tracked else math.nan, predicted_reserved_bytes=reserved[0],
                         actual_reserved_bytes=reserved[1], modeled_reserved_bytes=reserved[2],
                         predicted_s=_num(p_s), actual_s=secs, loss=loss))

    e = meas.entries
    step_peak = max([meas.start_live] + [x[2] for x in e]) if tracked else math.nan
    resv = (_num(pred.get("reserved_bytes")), meas.reserved if tracked else math.nan,
            meas.modeled_reserved if tracked else math.nan)
    add("step", "step", "step", step_peak, e[-1][3] if e else math.nan, pred.get("peak_bytes"), pred.get("time_s"),
        reserved=resv)
    prev = None
    pphases = pred.get("phases") or {}
    for ph in PHASES:
        peak, secs = meas.span(prev, ph)
        add("phase", ph, ph, peak, secs, pphases.get(ph), None)
        prev = ph
    psegs = {}
    for k, s in enumerate(pred.get("segments") or []):
        if isinstance(s, dict):
            psegs[int(s.get("index", k))] = s
    for i, s in enumerate(plan.segments):
        ps = psegs.get(i, {})
        name = f"{i} {s.first}..{s.last}"
        f_peak, f_s = meas.span(f"segment {i} forward begin", f"segment {i} forward")
        b_peak, b_s = meas.span(f"segment {i} backward begin", f"segment {i} backward", fallback_end="backward")
        add("segment", name, "forward", f_peak, f_s, ps.get("forward_peak"), ps.get("forward_s"), i, s.mode)
        add("segment", name, "backward", b_peak, b_s, ps.get("backward_peak"), ps.get("backward_s"), i, s.mode)
    if tracked:  # the memory timeline of the step, mark by mark
        for k, (lab, live, peak, _) in enumerate(e):
            p_peak = None
            if lab in pphases:
                p_peak = pphases[lab]
            elif lab.startswith("segment ") and not lab.endswith("begin"):
                parts = lab.split()
                if len(parts) == 3 and parts[1].isdigit():
                    p_peak = psegs.get(int(parts[1]), {}).get(f"{parts[2]}_peak")
            add("timeline", lab, "timeline", peak, math.nan, p_peak, None, order=k, live=live)
    return rows


def gpu_budget(plan) -> bool:
    """Whether the plan's budget is in reserved bytes: it was solved for a GPU profile."""
    prof = (plan.solver or {}).get("device_profile")
    try:
        return bool(prof) and load_profile(prof).kind == "cuda"
    except (CostError, OSError, ValueError):
        return False


def budget_failures(df, plan, device_type: str) -> List[str]:
    """The run's budget failures from its records: the allocated peak over the plan's budget, and
    the reserved one over it where the budget is in reserved bytes (a plan of a GPU profile,
    :func:`gpu_budget`): measured on CUDA (``max_memory_reserved``), modeled from the step's
    allocations on the CPU."""
    budget = plan.budget_bytes
    if budget is None:
        return []
    step = df[df.scope == "step"]
    out = []
    peak = step["actual_peak_bytes"].max()
    if peak > budget:
        out.append(f"measured peak {int(peak):,} bytes exceeds the plan's budget of {int(budget):,} bytes by "
                   f"{int(peak - budget):,}")
    resv = step["actual_reserved_bytes"].max()
    if gpu_budget(plan) and resv > budget:
        how = "measured (max_memory_reserved)" if device_type == "cuda" else \
            "modeled (CUDA caching allocator model on this step's allocations)"
        out.append(f"reserved peak {int(resv):,} bytes, {how}, exceeds the plan's budget of {int(budget):,} bytes "
                   f"by {int(resv - budget):,} (allocated peak {int(peak):,})")
    return out


def plan_precision(plan, amp: Optional[str] = None) -> Optional[str]:
    """The plan's mixed precision (``training.amp``); RunError when ``amp`` (``--amp``) asks for
    another one."""
    plan_amp = plan.training.get("amp")
    if amp is not None and amp != plan_amp:
        raise RunError(f"--amp {amp}: the plan was solved {'for --amp ' + plan_amp if plan_amp else 'without --amp'}, "
                       f"and its memory prediction holds only for that precision; solve again with --amp {amp}")
    return plan_amp


def run_plan(plan_path, steps: int = 20, warmup: int = 2, device: str = "auto",
             data: Any = "synthetic", lr: Optional[float] = None, check: bool = False,
             out: Optional[str] = None, seed: int = 0, progress: bool = True,
             dist_info=None, amp: Optional[str] = None, model: Optional[nn.Module] = None,
             loss_in_rows: bool = False) -> RunResult:
    """Run a plan (a path, or a :class:`lrcnn.planner.Plan`) for real and return its records (see the
    module docstring).

    The model is the plan's zoo model with random weights (``seed``), or ``model``: your own
    ``nn.Module`` (the one the plan was solved for, e.g. by :func:`lrcnn.solve`), captured again
    and checked against the plan, then trained in place.  ``data``: ``"synthetic"`` (random
    images, random labels: per pixel, a random mask, for dense logits), an ``ImageFolder`` root
    (classifiers), a folder of image / mask pairs (``DIR/images``, ``DIR/masks``: models with
    dense logits, :func:`mask_folder`), or any iterable of ``(images, targets)`` batches of the
    plan's shape (a ``DataLoader``; it is iterated again when it runs out).

    Mixed precision is the plan's (``training.amp``, set by ``planner solve --amp``): forward and
    loss under ``torch.autocast`` in that dtype, float16 with a ``torch.amp.GradScaler``.
    ``amp`` (``--amp``) states the precision expected: a plan solved for another one is refused,
    since its memory prediction holds only for the precision it was priced at.

    ``loss_in_rows`` (``--loss-in-rows``), or a plan with ``training.loss_in_rows``: the per-pixel
    cross-entropy of a dense model is evaluated inside the plan's last row segment
    (``apply_plan(..., loss=pixel_cross_entropy)``: the full-resolution logits never exist), and
    predicted so; PlanError unless the plan ends in a rows segment at the logits.

    ``dist_info``: this process's :class:`lrcnn.executor.distributed.DistInfo` when it is one rank of a
    distributed run (the process group already initialised, see :func:`run_command`): the planned
    model is wrapped in DistributedDataParallel, data differs per rank, and on rank 0 the result's
    records are every rank's (the others return their own).

    Raises :class:`RunError` / ``PlanError`` / ``ModelError`` (ValueErrors, one line) on bad
    input, before any output file is touched.  Failures of the run itself (measured peak over the
    plan's budget, ``check`` mismatch) are in :attr:`RunResult.failures`.
    """
    import pandas as pd
    from tqdm import tqdm

    info = dist_info or D.DistInfo()
    if steps < 1 or warmup < 0:
        raise RunError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    check_out(out)
    dev = D.rank_device(resolve_device(device), info)
    plan = plan_path if isinstance(plan_path, Plan) else Plan.load(plan_path)
    plan_amp = plan_precision(plan, amp)
    planned_world = plan.training.get("world_size")
    if planned_world is not None and planned_world != info.world_size and info.is_main:
        print(f"planner: warning: the plan was made for {planned_world} process(es), this run has "
              f"{info.world_size}; memory per process is the same, the global batch is "
              f"{plan.input_shape[0]} x {info.world_size}", file=sys.stderr)
    if model is None:
        model, graph = build_model(plan, seed)
    else:
        graph = module_graph(model, plan)
    if loss_in_rows and not plan.training.get("loss_in_rows"):  # (priced again: the plan's prediction is without)
        plan = Plan.from_dict({**plan.to_dict(), "predicted": {},
                               "training": {**plan.training, "loss_in_rows": True}})
    inside = bool(plan.training.get("loss_in_rows"))
    if inside:
        plan.validate(graph)  # (refused before any data is read: the plan must end in rows at the logits)
    logits = graph.output_node.shape  # (N, C) or dense (N, C, H, W): the loss's target follows
    num_classes = _num_classes(logits)
    if not isinstance(data, str):
        batches = _cycle(data)
        data_label = type(data).__name__
    elif data == "synthetic":
        batches = _synthetic(plan, logits, seed + info.rank)  # every rank its own data
        data_label = "synthetic"
    else:
        folder = mask_folder if is_dense(logits) else image_folder
        batches = _cycle(folder(data, plan, num_classes, seed, info.rank, info.world_size))
        data_label = os.path.abspath(data)
    pred = predicted_for(plan, graph, dev.type)
    # the caching allocator lrcnn's reserve is modeled with (PyTorch reads it when CUDA starts)
    expandable = prefer_expandable_segments() if dev.type == "cuda" else expandable_segments()
    alloc_conf = allocator_settings() or (LRCNN_ALLOC_CONF if expandable else "")
    if dev.type == "cuda" and not expandable and info.is_main:
        print(f"planner: warning: CUDA's caching allocator runs without expandable segments "
              f"({alloc_conf or 'CUDA started before lrcnn could set them'}); the reserve lrcnn keeps in a budget is "
              f"modeled with them, so the reserved peak may exceed the budget (it is measured): set "
              f"PYTORCH_CUDA_ALLOC_CONF={LRCNN_ALLOC_CONF} before CUDA starts", file=sys.stderr)

    model.to(dev)
    plain = copy.deepcopy(model) if check else None
    planned = apply_plan(model, plan, graph, loss=pixel_cross_entropy if inside else None)
    opt, opt_name, lr = make_optimizer(plan, planned.parameters(), lr)
    scaler = grad_scaler(dev.type, plan_amp)  # float16 only: loss scaling against underflow
    failures: List[str] = []
    trained = D.wrap(planned, dev, info)  # DDP with default settings, or planned itself

    if check:
        x, y = next(batches)
        x, y = x.to(dev), y.to(dev)
        saved = copy.deepcopy(planned.state_dict())  # the check must not move BN running stats
        ok, msg = check_grads(plain, planned, x, y, plan.dtype, plan_amp, inside)
        planned.load_state_dict(saved)
        del plain, saved
        if info.enabled and not all(D.all_gather(ok, info)):  # every rank stops, or none does
            ok, msg = False, msg if not ok else f"another rank's check failed (this rank's: {msg})"
        if not ok:  # each rank checks its own batch (DDP not involved)
            return RunResult(None, [f"--check-grads: planned gradients differ from the plain model's: {msg}"])
        if info.is_main:
            print(f"check-grads OK: {msg}")

    n, _, h, w = plan.input_shape
    run_id = D.broadcast(uuid.uuid4().hex[:12], info)
    if info.enabled:
        run_id = f"{run_id}-r{info.rank}"
    base = dict(run_id=run_id, rank=info.rank, world_size=info.world_size, plan_path=os.path.abspath(plan_path) if isinstance(plan_path, str) else "",
                plan_fingerprint=plan.fingerprint, model=plan.model, batch=n, resolution=f"{h}x{w}",
                dtype=plan.dtype, amp=plan_amp or "", optimizer=opt_name, lr=lr, budget_bytes=_num(plan.budget_bytes),
                budget_in="reserved" if gpu_budget(plan) else "allocated",
                data=data_label, started=D.broadcast(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), info),
                mem_method="cuda" if dev.type == "cuda" else "storage",
                reserved_method="cuda" if dev.type == "cuda" else "model", alloc_conf=alloc_conf, **device_info(dev))
    rows: List[Dict[str, Any]] = []
    bar = tqdm(total=warmup + steps, desc=f"run {plan.model}", unit="step", disable=not (progress and info.is_main),
               file=sys.stderr, leave=False)
    try:
        for _ in range(warmup):
            x, y = next(batches)
            train_step(trained, opt, x.to(dev), y.to(dev), plan_amp, scaler, inside)
            bar.update(1)
        for s in range(1, steps + 1):
            x, y = next(batches)
            x, y = x.to(dev), y.to(dev)
            if s == 1:
                meas, loss, _ = measure_memory_step(trained, opt, x, y, dev, plan_amp, scaler, inside)
            else:
                meas, loss = measure_time_step(trained, opt, x, y, dev, plan_amp, scaler, inside)
            rows += _rows_for_step(s, s == 1, meas, loss, plan, pred, base)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
    finally:
        bar.close()
    df = pd.DataFrame(rows, columns=COLUMNS)
    if info.enabled:
        if out is not None:
            write_records(df, D.rank_path(out, info.rank))
        parts = D.gather(rows, info)  # through the process group: no shared file system needed
        if info.is_main:
            df = pd.DataFrame([r for part in parts for r in part], columns=COLUMNS)
        D.barrier(info)
    if out is not None and info.is_main:
        write_records(df, out)

    failures += budget_failures(df, plan, dev.type)
    losses = df.loc[df.scope == "step", "loss"]
    if not losses.map(math.isfinite).all():
        failures.append("the loss is not finite (NaN/inf) in at least one step")
    return RunResult(df, failures)


# ------------------------------------------------------------------------------------------------
# Summary + CLI glue
# ------------------------------------------------------------------------------------------------
