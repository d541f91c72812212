"""Op classification: what each fx node is, its H-geometry and whether it can run in row strips.

One table, used by the capture (kinds, geometry, FLOPs) and the executor (which ops a row segment
may contain and how each is evaluated on a band of rows).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import HGeom, IDENTITY

# kinds
SPATIAL = "spatial"      # windowed along H (conv, pool): rows need a halo
POINTWISE = "pointwise"  # row-local elementwise (activations, eval BN, identity)
JOIN = "join"            # residual add / channel concat: several inputs, same rows
NORM = "norm"            # BatchNorm2d: pointwise in eval mode, a global barrier in train mode
GLOBAL = "global"        # needs the whole map or is not a map op (global pool, flatten, linear, ...)
INPUT = "input"
OUTPUT = "output"

_ACT_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.Tanh: "tanh", nn.GELU: "gelu",
    nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Mish: "mish", nn.Hardtanh: "hardtanh",
}
_ACT_FUNCS = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", F.hardswish: "hardswish",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid",
    torch.tanh: "tanh", F.gelu: "gelu", F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh",
    F.relu_: "relu", torch.relu_: "relu",
}
ACTIVATIONS = frozenset(_ACT_MODULES.values()) | frozenset(_ACT_FUNCS.values())
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_CAT_FUNCS = {torch.cat, torch.concat} if hasattr(torch, "concat") else {torch.cat}


@dataclass(frozen=True)
class OpInfo:
    """Classification of one fx node."""

    op: str              # short op name: conv2d, maxpool2d, avgpool2d, batchnorm2d, relu, add, ...
    kind: str            # one of the kinds above
    geom: Optional[HGeom]  # H-geometry for spatial/pointwise/join/norm ops; None for global
    rowwise: bool        # may run inside a row segment (norm: in eval mode; see executor)
    reason: str = ""     # why not rowwise, for error messages


def pair(v) -> tuple:
    """(h, w) from an int or a pair (nn layers accept both)."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def out_of_place_module(m: nn.Module) -> nn.Module:
    """``m``, or a shallow copy that does not overwrite its input (``inplace=False``)."""
    if getattr(m, "inplace", False):
        m = copy.copy(m)
        m.inplace = False
    return m


def out_of_place_call(target: Any, kwargs: dict) -> tuple:
    """(target, kwargs) of a call_function node, rewritten not to overwrite its inputs."""
    if target is operator.iadd:
        target = operator.add
    elif target in (F.relu_, torch.relu_):
        target = torch.relu
    if kwargs.get("inplace"):
        kwargs = dict(kwargs, inplace=False)
    return target, kwargs


def window_geom(m: nn.Module, axis: int = 0) -> HGeom:
    """The window geometry of a conv / max-pool / avg-pool module along H (``axis=0``: its
    :class:`HGeom`, what row strips reason with) or W (``axis=1``: the same formulas then give
    output widths, e.g. of a band with no rows)."""
    if isinstance(m, nn.Conv2d):
        k, s, p, d = (pair(v)[axis] for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        return HGeom(k, s, p, d, False, 0.0)
    if isinstance(m, nn.MaxPool2d):
        k, s, p, d = (pair(v)[axis] for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
        return HGeom(k, s, p, d, bool(m.ceil_mode), -math.inf)
    if isinstance(m, nn.AvgPool2d):
        k, s, p = (pair(v)[axis] for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        return HGeom(k, s, p, 1, bool(m.ceil_mode), 0.0)
    raise TypeError(f"{type(m).__name__} has no window geometry")


def _conv_info(m: nn.Conv2d) -> OpInfo:
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        return OpInfo("conv2d", SPATIAL, None, False,
                      f"padding={m.padding!r}, padding_mode={m.padding_mode!r} (row strips need numeric zero padding)")
    return OpInfo("conv2d", SPATIAL, window_geom(m), True)


def _maxpool_info(m: nn.MaxPool2d) -> OpInfo:
    if m.return_indices:
        return OpInfo("maxpool2d", SPATIAL, None, False, "return_indices=True")
    return OpInfo("maxpool2d", SPATIAL, window_geom(m), True)


def _avgpool_info(m: nn.AvgPool2d) -> OpInfo:
    if m.divisor_override is not None:
        return OpInfo("avgpool2d", SPATIAL, None, False, "divisor_override is set")
    return OpInfo("avgpool2d", SPATIAL, window_geom(m), True)


def classify_module(m: nn.Module) -> OpInfo:
    """Classify a leaf module called by an fx node."""
    t = type(m)
    if isinstance(m, nn.Conv2d):
        return _conv_info(m)
    if isinstance(m, nn.MaxPool2d):
        return _maxpool_info(m)
    if isinstance(m, nn.AvgPool2d):
        return _avgpool_info(m)
    if isinstance(m, nn.BatchNorm2d):
        return OpInfo("batchnorm2d", NORM, IDENTITY, True)
    for cls, name in _ACT_MODULES.items():
        if t is cls:
            return OpInfo(name, POINTWISE, IDENTITY, True)
    if isinstance(m, nn.Identity):
        return OpInfo("identity", POINTWISE, IDENTITY, True)
    if isinstance(m, (nn.Dropout, nn.Dropout2d)):
        return OpInfo("dropout", POINTWISE, IDENTITY, False, "dropout is random (not reproducible strip by strip)")
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return OpInfo("adaptive_" + ("avg" if isinstance(m, nn.AdaptiveAvgPool2d) else "max") + "pool2d",
                      GLOBAL, None, False, "adaptive pooling sees the whole map")
    if isinstance(m, nn.Linear):
        return OpInfo("linear", GLOBAL, None, False, "not a spatial map op")
    if isinstance(m, nn.Flatten):
        return OpInfo("flatten", GLOBAL, None, False, "flatten mixes rows into features")
    return OpInfo(t.__name__.lower(), GLOBAL, None, False, f"module type {t.__name__} is not supported in row segments")


def classify_function(target: Any, args: tuple, kwargs: dict) -> OpInfo:
    """Classify a call_function / call_method node."""
    if target in _ACT_FUNCS:
        return OpInfo(_ACT_FUNCS[target], POINTWISE, IDENTITY, True)
    if target in _ADD_FUNCS:
        return OpInfo("add", JOIN, IDENTITY, True)
    if target in _CAT_FUNCS:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if dim in (1, -3):
            return OpInfo("cat", JOIN, IDENTITY, True)
        return OpInfo("cat", GLOBAL, None, False, f"concat along dim {dim} (only channel concat is row-local)")
    if target in (operator.mul, torch.mul):
        # elementwise product: row-local only between maps of the same height (excite scaling
        # with a global vector is not); the capture refines this with shapes.
        return OpInfo("mul", JOIN, IDENTITY, True)
    if target is torch.flatten:
        return OpInfo("flatten", GLOBAL, None, False, "flatten mixes rows into features")
    if target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return OpInfo("adaptive_pool2d", GLOBAL, None, False, "adaptive pooling sees the whole map")
    if target is F.dropout:
        return OpInfo("dropout", POINTWISE, IDENTITY, False, "dropout is random")
    name = getattr(target, "__name__", str(target))
    return OpInfo(name, GLOBAL, None, False, f"function {name} is not supported in row segments")


# --------------------------------------------------------------------------------------------
# time classes

TIME_CLASSES = ("conv", "dwconv", "linear", "bn", "bn_stats", "act", "pool", "map")


def time_class(op: str, groups: int = 1, batch_stats: bool = False) -> str:
    """The class an op's time is calibrated and predicted by (``planner calibrate``, cost model):
    dense convolutions, grouped/depthwise convolutions, linear layers, batch norm with given
    statistics (``bn``) or computing its batch statistics (``bn_stats``: a train-mode BN run plainly
    or checkpointed), activations, pooling, and other element-wise maps (adds, concats, ...)."""
    if op == "conv2d":
        return "dwconv" if groups > 1 else "conv"
    if op == "linear":
        return "linear"
    if op.startswith("batchnorm"):
        return "bn_stats" if batch_stats else "bn"
    if op in ACTIVATIONS:
        return "act"
    if "pool" in op:
        return "pool"
    return "map"


# --------------------------------------------------------------------------------------------
# FLOPs (analytic)
# --------------------------------------------------------------------------------------------

def flops(op: str, module: Optional[nn.Module], in_shapes: list, out_shape: tuple) -> tuple:
    """(forward, backward) floating point operations of one op (multiply-add = 2)."""
    out_numel = math.prod(out_shape) if out_shape else 0
    if op == "conv2d" and module is not None:
        kh, kw = pair(module.kernel_size)
        cin = module.in_channels // module.groups
        fwd = 2 * out_numel * cin * kh * kw + (out_numel if module.bias is not None else 0)
        return fwd, 2 * fwd
    if op == "linear" and module is not None:
        fwd = 2 * out_numel * module.in_features + (out_numel if module.bias is not None else 0)
        return fwd, 2 * fwd
    if op in ("maxpool2d", "avgpool2d") and module is not None:
        kh, kw = pair(module.kernel_size)
        return out_numel * kh * kw, out_numel * kh * kw
    if op == "batchnorm2d":
        return 4 * out_numel, 8 * out_numel
    if op.startswith("adaptive") and in_shapes:
        n = math.prod(in_shapes[0])
        return n, n
    if op in ("flatten", "identity", "dropout"):
        return 0, 0
    return out_numel, out_numel
