"""The training loss lrcnn prices and runs: cross-entropy on the model's logits.

One rule for every place a step is taken (capture's memory profile, ``planner run``, the
measurements, ``--check-grads``): the loss reads the model's *logits* (:func:`logits_of`: the
output tensor, or the ``"out"`` entry of a dict output such as torchvision's segmentation
models'), and its target follows their shape (:func:`target_shape`): ``(N, C)`` logits take one
class index per sample, ``(N, C, H, W)`` dense logits one class index per pixel, ``(N, H, W)``
(a per-pixel cross-entropy).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lrcnn.errors import LrcnnError

#: the entry of a dict output that holds the logits (torchvision's segmentation models: ``{"out": ...}``)
OUT_KEY = "out"


class LossError(LrcnnError, ValueError):
    """The model's output or the target does not fit the cross-entropy lrcnn trains with."""


def logits_of(out: Any) -> torch.Tensor:
    """The tensor a model's output holds its logits in: the output itself, the ``"out"`` entry of
    a dict (an auxiliary head's entries are not trained: build such models without it), or the
    one tensor of a one-entry dict, tuple or list.  :class:`LossError` otherwise."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if OUT_KEY in out and isinstance(out[OUT_KEY], torch.Tensor):
            return out[OUT_KEY]
        vals = list(out.values())
    elif isinstance(out, (tuple, list)):
        vals = list(out)
    else:
        vals = []
    if len(vals) == 1 and isinstance(vals[0], torch.Tensor):
        return vals[0]
    what = (f"a dict with keys {', '.join(map(repr, out))}" if isinstance(out, dict)
            else f"a {type(out).__name__}" + (f" of {len(vals)}" if vals else ""))
    raise LossError(f"the model returns {what}; lrcnn trains a cross-entropy on one logits tensor: return it, "
                    f"or a dict with its logits under {OUT_KEY!r}")


def target_shape(logits_shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape of the class-index target of logits of ``logits_shape``: ``(N,)`` for ``(N, C)``,
    ``(N, H, W)`` for dense ``(N, C, H, W)`` logits (every position but the class dimension)."""
    s = tuple(int(v) for v in logits_shape)
    if len(s) < 2:
        raise LossError(f"logits of shape {s} have no class dimension; a cross-entropy needs (N, C) or (N, C, H, W)")
    return (s[0],) + s[2:]


def num_classes(logits_shape: Sequence[int]) -> int:
    """The classes of logits of ``logits_shape`` (their dimension 1)."""
    return int(logits_shape[1]) if len(logits_shape) >= 2 else 0


def is_dense(logits_shape: Sequence[int]) -> bool:
    """Whether logits of this shape are a per-position prediction (one class per pixel)."""
    return len(logits_shape) > 2


def cross_entropy(out: Any, target: torch.Tensor) -> torch.Tensor:
    """The loss of one step: cross-entropy of the model output's logits (:func:`logits_of`)
    against ``target`` (class indices of :func:`target_shape`), the mean over every sample, or
    every pixel of dense logits."""
    logits = logits_of(out)
    want = target_shape(logits.shape)
    if tuple(target.shape) != want:
        raise LossError(f"the target has shape {tuple(target.shape)}, the model's logits {tuple(logits.shape)} need "
                        f"class indices of shape {want}")
    return F.cross_entropy(logits, target)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of every position (reduction none): ``(N, H, W)`` losses of ``(N, C, H, W)``
    logits against class indices ``(N, H, W)``.  Its mean is :func:`cross_entropy` of dense logits;
    ``apply_plan(model, plan, loss=pixel_cross_entropy)`` evaluates it inside the last row segment,
    a band of rows at a time (so the full logits never exist)."""
    return F.cross_entropy(logits, target, reduction="none")


def synthetic_target(logits_shape: Sequence[int], generator: Optional[torch.Generator] = None,
                     device: Any = None) -> torch.Tensor:
    """Random class indices for logits of ``logits_shape`` (zeros under a fake mode or on the
    meta device, where only the shape matters: pass no generator)."""
    shape = target_shape(logits_shape)
    if generator is None:
        return torch.zeros(shape, dtype=torch.long, device=device)
    return torch.randint(0, max(1, num_classes(logits_shape)), shape, generator=generator).to(device or "cpu")


def target_bytes(logits_shape: Sequence[int]) -> int:
    """Bytes of the int64 target of logits of ``logits_shape``."""
    n = 1
    for v in target_shape(logits_shape):
        n *= v
    return 8 * n


__all__ = ["LossError", "logits_of", "target_shape", "num_classes", "is_dense", "cross_entropy", "pixel_cross_entropy",
           "synthetic_target", "target_bytes", "OUT_KEY"]
