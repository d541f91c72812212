"""Op classification: what each fx node is, its H-geometry and whether it can run in row strips.

One table, used by the capture (kinds, geometry, FLOPs) and the executor (which ops a row segment
may contain and how each is evaluated on a band of rows).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrcnn.models.geometry import HGeom, IDENTITY, RESIZE_MODES, ResizeGeom, RowGeom, TransposeGeom

# kinds
SPATIAL = "spatial"      # rows of other rows along H (conv, pool, transposed conv, resize): a halo
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
    F.relu_: "relu", torch.relu_: "relu", torch.sigmoid_: "sigmoid", torch.tanh_: "tanh",
}
ACTIVATIONS = frozenset(_ACT_MODULES.values()) | frozenset(_ACT_FUNCS.values())
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_CAT_FUNCS = {torch.cat, torch.concat} if hasattr(torch, "concat") else {torch.cat}
# Tensor methods that are spellings of the functions above, with the tensor as first argument
# (``x.sigmoid()`` is ``torch.sigmoid(x)``, ``x.add(y, alpha=a)`` is ``torch.add(x, y, alpha=a)``);
# their in-place spellings (``x.add_(y)``) are the same ops (see out_of_place_call)
_METHOD_FUNCS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "add": torch.add,
                 "mul": torch.mul}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
# in-place functions and the functions that compute the same without overwriting their input
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.imul: operator.mul, F.relu_: torch.relu,
                  torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}


@dataclass(frozen=True)
class OpInfo:
    """Classification of one fx node."""

    op: str              # short op name: conv2d, maxpool2d, avgpool2d, batchnorm2d, relu, add, ...
    kind: str            # one of the kinds above
    geom: Optional[RowGeom]  # H-geometry for spatial/pointwise/join/norm ops; None for global
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


def _inplace_method(name: str) -> bool:
    """``name`` is the in-place spelling of a tensor method (``add_`` of ``add``)."""
    return name.endswith("_") and not name.endswith("__") and callable(getattr(torch.Tensor, name[:-1], None))


def overwrites_input(op: str, target: Any, kwargs: dict, module: Optional[nn.Module] = None) -> bool:
    """Whether an fx node (``op``: call_function / call_method / call_module) overwrites its first
    argument in place (and returns it): ``x.add_(y)``, ``x += y``, ``F.relu_(x)``, ``inplace=True``."""
    if op == "call_module":
        return bool(getattr(module, "inplace", False))
    if op == "call_method":
        return _inplace_method(target)
    return op == "call_function" and (target in _INPLACE_FUNCS or bool(kwargs.get("inplace")))


def out_of_place_call(target: Any, kwargs: dict) -> tuple:
    """(target, kwargs) of a call_function node, or of a call_method node (``target`` the method's
    name), rewritten not to overwrite its inputs (``x.add_(y)`` runs as ``x.add(y)``)."""
    if isinstance(target, str):
        if _inplace_method(target):
            target = target[:-1]
    else:
        target = _INPLACE_FUNCS.get(target, target)
    if kwargs.get("inplace"):
        kwargs = dict(kwargs, inplace=False)
    return target, kwargs


def call(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Evaluate a call_function node (``target`` the function) or a call_method node (``target`` the
    method's name, ``args[0]`` the tensor it is called on) on argument values."""
    if op == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def window_geom(m: nn.Module, axis: int = 0) -> RowGeom:
    """The row geometry of a module along H (``axis=0``: what row strips reason with) or W
    (``axis=1``: the same formulas then give output widths, e.g. of a band with no rows), derived
    from its parameters: windows (conv, max-pool, avg-pool, ``PixelUnshuffle``), transposed
    windows (``ConvTranspose2d``, ``PixelShuffle``) and interpolations (``nn.Upsample``, any mode
    :data:`lrcnn.models.geometry.RESIZE_MODES` names).  TypeError for any other module."""
    if isinstance(m, nn.Conv2d):
        k, s, p, d = (pair(v)[axis] for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        return HGeom(k, s, p, d, False, 0.0)
    if isinstance(m, nn.MaxPool2d):
        k, s, p, d = (pair(v)[axis] for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
        return HGeom(k, s, p, d, bool(m.ceil_mode), -math.inf)
    if isinstance(m, nn.AvgPool2d):
        k, s, p = (pair(v)[axis] for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        return HGeom(k, s, p, 1, bool(m.ceil_mode), 0.0)
    if isinstance(m, nn.ConvTranspose2d):
        k, s, p, d, op = (pair(v)[axis] for v in (m.kernel_size, m.stride, m.padding, m.dilation, m.output_padding))
        return TransposeGeom(k, s, p, d, op)
    if isinstance(m, nn.PixelShuffle):
        return TransposeGeom(m.upscale_factor, m.upscale_factor)
    if isinstance(m, nn.PixelUnshuffle):
        return HGeom(m.downscale_factor, m.downscale_factor)
    if isinstance(m, nn.Upsample):
        g = resize_geom(m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor, axis=axis)
        if isinstance(g, ResizeGeom):
            return g
    raise TypeError(f"{type(m).__name__} has no window geometry")


def resize_geom(size, scale_factor, mode: str, align_corners, recompute_scale_factor=None, antialias=False,
                axis: int = 0):
    """The :class:`ResizeGeom` along ``axis`` of an interpolation called with these arguments
    (``F.interpolate``'s), or a string saying why it has none (a mode without row geometry,
    antialiasing).  A size that is not a literal (read from a tensor at run time) gives a
    geometry with ``dynamic`` set and no size yet: :func:`refine` takes it from the captured map."""
    if mode not in RESIZE_MODES:
        return f"interpolation mode {mode!r} has no row geometry (row strips run {', '.join(RESIZE_MODES)})"
    if antialias:
        return "antialiased interpolation has no row geometry"
    if size is not None:
        v = size[axis] if isinstance(size, (tuple, list)) else size
        if isinstance(v, int) and not isinstance(v, bool):
            return ResizeGeom(mode, bool(align_corners), size=v)
        return ResizeGeom(mode, bool(align_corners), dynamic=True)
    if scale_factor is None:
        return "interpolation without size or scale factor"
    f = scale_factor[axis] if isinstance(scale_factor, (tuple, list)) else scale_factor
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not f > 0:
        return "interpolation by a scale factor read at run time"
    f = float(f)
    return ResizeGeom(mode, bool(align_corners), factor=f, scale=None if recompute_scale_factor else f)


# the interpolation functions: their arguments as F.interpolate's (the deprecated spellings fix some)
_RESIZE_FUNCS = {F.interpolate: {}, F.upsample: {}, F.upsample_nearest: {"mode": "nearest"},
                 F.upsample_bilinear: {"mode": "bilinear", "align_corners": True}}
_SHUFFLE_FUNCS = {torch.pixel_shuffle: "pixel_shuffle", torch.pixel_unshuffle: "pixel_unshuffle"}


def resize_call(target: Any, args: tuple, kwargs: dict) -> dict:
    """The arguments of an interpolation function call, named as ``F.interpolate``'s
    (``input``, ``size``, ``scale_factor``, ``mode``, ``align_corners``, ``recompute_scale_factor``,
    ``antialias``), defaults filled in."""
    bound = inspect.signature(target).bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    a.update(_RESIZE_FUNCS.get(target, {}))
    a.setdefault("recompute_scale_factor", None)
    a.setdefault("antialias", False)
    return a


def function_geom(target: Any, args: tuple, kwargs: dict, axis: int = 0):
    """Row geometry of a call_function node's op along ``axis`` (interpolation, pixel
    (un)shuffle), a string saying why an interpolation has none, or None for other functions."""
    if target in _RESIZE_FUNCS:
        a = resize_call(target, args, kwargs)
        return resize_geom(a["size"], a["scale_factor"], a["mode"], a["align_corners"],
                           a["recompute_scale_factor"], a["antialias"], axis=axis)
    if target in _SHUFFLE_FUNCS:
        r = args[1] if len(args) > 1 else kwargs.get("upscale_factor", kwargs.get("downscale_factor"))
        if not isinstance(r, int):
            return None
        return TransposeGeom(r, r) if target is torch.pixel_shuffle else HGeom(r, r)
    return None


def _conv_info(m: nn.Conv2d) -> OpInfo:
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        return OpInfo("conv2d", SPATIAL, None, False,
                      f"padding={m.padding!r}, padding_mode={m.padding_mode!r} (row strips need numeric zero padding)")
    return OpInfo("conv2d", SPATIAL, window_geom(m), True)


def _maxpool_info(m: nn.MaxPool2d) -> OpInfo:
    if m.return_indices:
        return OpInfo("maxpool2d", SPATIAL, None, False, "return_indices=True")
    return OpInfo("maxpool2d", SPATIAL, window_geom(m), True)


def _conv_transpose_info(m: nn.ConvTranspose2d) -> OpInfo:
    if m.padding_mode != "zeros":
        return OpInfo("conv_transpose2d", SPATIAL, None, False, f"padding_mode={m.padding_mode!r}")
    return OpInfo("conv_transpose2d", SPATIAL, window_geom(m), True)


def _upsample_info(m: nn.Upsample) -> OpInfo:
    g = resize_geom(m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor)
    if isinstance(g, str):
        return OpInfo("interpolate", SPATIAL, None, False, g)
    return OpInfo("interpolate", SPATIAL, g, True)


def _avgpool_info(m: nn.AvgPool2d) -> OpInfo:
    if m.divisor_override is not None:
        return OpInfo("avgpool2d", SPATIAL, None, False, "divisor_override is set")
    return OpInfo("avgpool2d", SPATIAL, window_geom(m), True)


# Stock classes whose computation row strips and the store recompute reimplement (they call
# F.conv2d, F.batch_norm, ... with the module's tensors): a subclass that overrides one of these
# methods computes something else, and is run only as a whole module call.
_STOCK_METHODS = ((nn.Conv2d, ("forward", "_conv_forward")), (nn.MaxPool2d, ("forward",)),
                  (nn.AvgPool2d, ("forward",)), (nn.ConvTranspose2d, ("forward", "_output_padding")),
                  (nn.Upsample, ("forward",)), (nn.PixelShuffle, ("forward",)),
                  (nn.PixelUnshuffle, ("forward",)), (nn.modules.batchnorm._BatchNorm, ("forward",)),
                  (nn.Identity, ("forward",))) + tuple((c, ("forward",)) for c in _ACT_MODULES)

_HOOKS = (("_forward_pre_hooks", "a forward pre-hook"), ("_forward_hooks", "a forward hook"),
          ("_backward_pre_hooks", "a backward pre-hook"), ("_backward_hooks", "a backward hook"))


# Fused norm + activation layers known to compute exactly "BatchNorm, then their ``drop`` and ``act``
# submodules" (their forward is a copy of BatchNorm's followed by those two calls): class path ->
# names of the submodules applied after the normalisation, in order.
_NORM_ACT = {"timm.layers.norm_act.BatchNormAct2d": ("drop", "act")}


def norm_act_tail(m: nn.Module) -> Optional[list]:
    """For a known fused BatchNorm + activation layer (timm's ``BatchNormAct2d``, exactly that
    class) whose tail modules are stock row-wise pointwise layers (an activation, ``Identity``):
    those modules, which row strips and recomputes apply after the normalisation; else None."""
    cls = type(m)
    names = _NORM_ACT.get(f"{cls.__module__}.{cls.__qualname__}")
    if names is None or not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return None
    tail = [getattr(m, k, None) for k in names]
    for t in tail:
        if not isinstance(t, nn.Module):
            return None
        info = _classify_module(t)
        if info.kind != POINTWISE or not info.rowwise or list(t.children()) or any(
                getattr(t, h, None) for h, _ in _HOOKS):
            return None
    return tail


def module_refusal(m: nn.Module) -> str:
    """Why lrcnn cannot run module ``m`` piecewise (row strips, which reimplement its computation
    on bands of rows): a hook on it (hooks see whole-map tensors once per call; pruning masks and
    the old ``weight_norm`` are hooks too), a parametrization
    (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, orthogonal), or a subclass of a
    stock layer that overrides its computation (torch.ao QAT convolutions, fused norm+activation
    layers).  '' when none applies.  Whole-module calls (plain, checkpoint, store segments) run
    all of these exactly; only row strips refuse them."""
    from torch.nn.utils import parametrize

    # (global module hooks, register_module_forward_hook, are tools' observers: FlopCounterMode
    # and the profilers' module trackers; row strips call no module, so those see none of them)
    found = [what for attr, what in _HOOKS if getattr(m, attr, None)]
    if found:
        return f"{type(m).__name__} has {' and '.join(found)}, which row strips cannot run"
    if parametrize.is_parametrized(m):
        names = ", ".join(sorted(m.parametrizations.keys()))
        return f"{type(m).__name__} has a parametrization of {names}, which row strips cannot run"
    if norm_act_tail(m) is not None:
        return ""
    for cls, methods in _STOCK_METHODS:
        if isinstance(m, cls):
            own = [f for f in methods if getattr(type(m), f) is not getattr(cls, f)]
            if own:
                return (f"{type(m).__name__} subclasses {cls.__name__} with its own {own[0]}(), "
                        f"which row strips cannot reproduce")
    return ""


def classify_module(m: nn.Module) -> OpInfo:
    """Classify a leaf module called by an fx node (a module lrcnn cannot run piecewise,
    :func:`module_refusal`, keeps its kind but is not row-wise)."""
    info = _classify_module(m)
    if info.rowwise:
        why = module_refusal(m)
        if why:
            return OpInfo(info.op, info.kind, info.geom, False, why)
    return info


def _classify_module(m: nn.Module) -> OpInfo:
    t = type(m)
    if isinstance(m, nn.Conv2d):
        return _conv_info(m)
    if isinstance(m, nn.MaxPool2d):
        return _maxpool_info(m)
    if isinstance(m, nn.AvgPool2d):
        return _avgpool_info(m)
    if isinstance(m, nn.ConvTranspose2d):
        return _conv_transpose_info(m)
    if isinstance(m, nn.Upsample):
        return _upsample_info(m)
    if isinstance(m, nn.PixelShuffle):
        return OpInfo("pixel_shuffle", SPATIAL, window_geom(m), True)
    if isinstance(m, nn.PixelUnshuffle):
        return OpInfo("pixel_unshuffle", SPATIAL, window_geom(m), True)
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
    """Classify a call_function node, or a call_method node (``target`` the method's name): a tensor
    method that spells a supported function is classified as that function."""
    if isinstance(target, str):
        fn = _METHOD_FUNCS.get(target[:-1] if _inplace_method(target) else target)
        if fn is None:
            return OpInfo(target, GLOBAL, None, False, f"tensor method .{target}() is not supported in row segments")
        target = fn
    if target in _ACT_FUNCS:
        return OpInfo(_ACT_FUNCS[target], POINTWISE, IDENTITY, True)
    if target in _RESIZE_FUNCS or target in _SHUFFLE_FUNCS:
        op = "interpolate" if target in _RESIZE_FUNCS else _SHUFFLE_FUNCS[target]
        try:
            g = function_geom(target, args, kwargs)
        except TypeError:  # (arguments that do not bind: the call itself fails)
            g = None
        if g is None or isinstance(g, str):
            return OpInfo(op, SPATIAL, None, False, g or f"{op} with a factor read at run time")
        return OpInfo(op, SPATIAL, g, True)
    if target in _ADD_FUNCS:
        return OpInfo("add", JOIN, IDENTITY, True)
    if target in _CAT_FUNCS:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if dim in (1, -3):
            return OpInfo("cat", JOIN, IDENTITY, True)
        return OpInfo("cat", GLOBAL, None, False, f"concat along dim {dim} (only channel concat is row-local)")
    if target in _MUL_FUNCS:
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


def refine(info: OpInfo, in_shapes: list, shape: tuple, extra_inputs: bool = False) -> OpInfo:
    """An op's classification checked against what the capture saw (input and output shapes): an
    interpolation to a size read at run time takes the captured height (its geometry then holds
    at that height only, ``dynamic``); a spatial op whose geometry does not give the captured
    output height from the input's (a transposed convolution called with ``output_size``, which
    ``extra_inputs`` says: the call passes more than its input) has no row geometry."""
    g = info.geom
    if info.kind != SPATIAL or g is None or not info.rowwise or len(shape) != 4 or not in_shapes \
            or len(in_shapes[0]) != 4:
        return info
    if isinstance(g, ResizeGeom) and g.dynamic and g.size is None:
        g = dataclasses.replace(g, size=int(shape[2]))
        info = dataclasses.replace(info, geom=g)
    if (extra_inputs and info.op == "conv_transpose2d") or g.out_size(in_shapes[0][2]) != shape[2]:
        return dataclasses.replace(info, geom=None, rowwise=False,
                                   reason=f"{info.op} gives {shape[2]} rows from {in_shapes[0][2]}, not the "
                                          f"{g.out_size(in_shapes[0][2])} its parameters say (a size given at the "
                                          f"call): no row geometry")
    return info


# Ops whose output a store segment may drop after its forward and recompute when backward needs it
# (``Segment.recompute``): cheap, deterministic maps of one step's values (activations, BatchNorm,
# residual add), whatever their spelling (module, function, tensor method).
RECOMPUTE_OPS = ACTIVATIONS | frozenset({"batchnorm2d", "add"})


def recomputable(node) -> bool:
    """Whether a captured node may be in a store segment's recompute set: the one rule the plan
    search proposes sets by (planner.ilp) and ``apply_plan`` accepts them by (executor.program)."""
    return node.kind in (POINTWISE, NORM, JOIN) and node.op in RECOMPUTE_OPS


# --------------------------------------------------------------------------------------------
# time classes

TIME_CLASSES = ("conv", "dwconv", "linear", "bn", "bn_stats", "act", "pool", "map")


def time_class(op: str, groups: int = 1, batch_stats: bool = False) -> str:
    """The class an op's time is calibrated and predicted by (``planner calibrate``, cost model):
    dense convolutions, grouped/depthwise convolutions, linear layers, batch norm with given
    statistics (``bn``) or computing its batch statistics (``bn_stats``: a train-mode BN run plainly
    or checkpointed), activations, pooling, and other element-wise maps (adds, concats, ...)."""
    if op in ("conv2d", "conv_transpose2d"):
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
    if op == "conv_transpose2d" and module is not None and in_shapes:
        kh, kw = pair(module.kernel_size)
        cout = module.out_channels // module.groups
        fwd = 2 * math.prod(in_shapes[0]) * cout * kh * kw + (out_numel if module.bias is not None else 0)
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
