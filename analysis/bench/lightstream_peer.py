"""lightstream (PyPI ``lightstream``, the maintained package of StreamingCNN) as a ``planner bench``
method: its ``StreamingCNN`` streams a ResNet-type trunk (``conv1`` .. the last ``layerK``) tile by
tile, forward without a graph and backward tile by tile again, and the plain head (average pool,
``fc``) and loss follow.  It trains frozen BatchNorm only (it puts normalization layers in eval mode
and freezes their parameters), so it runs on the bench's ``frozen`` cases.

Adapting it to the bench, without changing what it computes:

* its ``StreamingConstructor`` is asked to keep BatchNorm during its statistics pass
  (``add_keep_modules``, as its own ``StreamingResNet`` does): replaced by identities, a block's
  ``out += identity`` writes into the output of a convolution's full backward hook and autograd
  refuses (``Output 0 of BackwardHookFunction is a view and is being modified inplace``);
* on a CPU-only machine its statistics stay on the CPU (with ``statistics_on_cpu`` it moves the
  trunk to CUDA afterwards unconditionally);
* the streamed trunk's parameters and buffers are the case model's own tensors (it copies the
  trunk when it builds), so the step trains the model every other method trains and its gradients
  are compared with plain PyTorch's like theirs.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lrcnn.analysis.bench.cases import BenchError, Case, Method
from lrcnn.models import get_model

STEM = ("conv1", "bn1", "relu", "maxpool")


def resnet_trunk(model: nn.Module) -> Optional[List[str]]:
    """Names of ``model``'s children that form a ResNet trunk (``conv1, bn1, relu, maxpool,
    layer1 .. layerK``, followed by ``avgpool`` and ``fc``), or ``None`` when it has no such
    structure.  Running them in order, then ``fc(flatten(avgpool(.)))``, is the model's forward
    for torchvision's ResNets and the zoo's ``tiny_resnet``."""
    names = [n for n in STEM if hasattr(model, n)]
    if len(names) != len(STEM) or not (hasattr(model, "layer1") and hasattr(model, "avgpool") and hasattr(model, "fc")):
        return None
    k = 1
    while hasattr(model, f"layer{k}"):
        names.append(f"layer{k}")
        k += 1
    return names


def default_tile(case: Case) -> int:
    """Five sixths of the input, rounded down to a multiple of the trunk's output stride (the
    steps lightstream moves its tiles in).  Its tiles must be large against the trunk's receptive
    field: a tile's backward completes the gradient only inside a border of about the receptive
    field on each side (ResNet-18: 490 pixels), so a tile of 1024 pixels keeps 32 valid rows and
    a 1536x1536 input takes 18x18 of them, one of 1280 pixels keeps 288 and takes 2x2; its own
    example streams 4800x4800 in 3200-pixel tiles."""
    model = get_model(case.model_name, device="meta")
    names = resnet_trunk(model) or []
    trunk = nn.Sequential(*[getattr(model, n) for n in names])
    out = trunk(torch.empty(1, 3, case.resolution, case.resolution, device="meta"))
    stride = max(1, case.resolution // int(out.shape[-2]))
    return max(stride, case.resolution * 5 // 6 // stride * stride)


def tile_counts(scnn, height: int) -> Tuple[int, int]:
    """(forward, backward) tiles along one side of a ``height``-pixel square input, as
    ``StreamingCNN.forward`` / ``.backward`` count them from the borders its statistics pass found
    (``tile_output_lost``: output pixels a tile's forward loses per side; ``tile_gradient_lost``:
    input pixels whose gradient a tile's backward cannot complete).  Backward 0: a tile holds no
    valid gradient row (lightstream then divides by zero)."""
    tile = scnn.tile_shape[2]
    stride = int(scnn.output_stride[1])
    if height <= tile:
        return 1, 1
    ol, gl = scnn.tile_output_lost, scnn.tile_gradient_lost
    out_tile = scnn._tile_output_shape[2]
    out_h = (height - tile) // stride + out_tile
    fwd = math.ceil(out_h / max(1, out_tile - ol.top - ol.bottom))
    valid = (tile - gl.top - gl.bottom) // stride * stride
    bwd = math.ceil((height - gl.top - gl.bottom) / valid) if valid > 0 else 0
    return fwd, bwd


class _Streamed(torch.autograd.Function):
    """The trunk's output from lightstream's tiled forward; its backward is lightstream's tiled
    backward, which puts the trunk's parameter gradients into their ``.grad`` itself (the input
    gets none: the batch needs no gradient).  ``anchor``: one trainable trunk parameter, so that
    autograd calls this backward at all."""

    @staticmethod
    def forward(ctx, x, anchor, scnn):
        ctx.scnn, ctx.x = scnn, x
        return scnn.forward(x)

    @staticmethod
    def backward(ctx, grad):
        # its tiles' forward must record a graph (a backward runs without one); each tile runs under
        # torch.autocast("cuda", its dtype), which warns where CUDA is absent and does nothing
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*autocast", UserWarning)
            ctx.scnn.backward(ctx.x, grad)
        return None, None, None


class LightstreamModel:
    """``model``'s forward with the trunk streamed by lightstream: logits, whose backward trains
    the model's own parameters (see :class:`_Streamed`)."""

    def __init__(self, model: nn.Module, scnn) -> None:
        self.model, self.scnn = model, scnn
        self.anchor = next(p for p in scnn.stream_module.parameters() if p.requires_grad)

    def __call__(self, x):
        feats = _Streamed.apply(x, self.anchor, self.scnn)
        return self.model.fc(torch.flatten(self.model.avgpool(feats), 1))


def build(model: nn.Module, names: Sequence[str], tile: int, device: torch.device):
    """lightstream's ``StreamingCNN`` over ``model``'s trunk ``names`` in ``tile``-pixel square
    tiles, built as its ``StreamingConstructor`` builds it (on a copy), then tied to ``model``'s
    own parameters and buffers."""
    from lightstream.core.constructor import StreamingConstructor

    work = copy.deepcopy(model)  # the constructor swaps modules in and out of what it is given
    trunk = nn.Sequential(*[getattr(work, n) for n in names])
    with contextlib.redirect_stdout(io.StringIO()):  # (it prints its progress)
        c = StreamingConstructor(trunk, tile, verbose=False, copy_to_gpu=False, statistics_on_cpu=True,
                                 normalize_on_gpu=False, add_keep_modules=[nn.BatchNorm2d])
        c.statistics_on_cpu = device.type == "cuda"  # (its CPU statistics end with a move to CUDA)
        scnn = c.prepare_streaming_model()
    for qual, mod in scnn.stream_module.named_modules():
        if not qual:
            continue
        index, _, rest = qual.partition(".")
        orig = getattr(model, names[int(index)])
        orig = orig.get_submodule(rest) if rest else orig
        for name, _ in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, getattr(orig, name))
        for name, _ in list(mod.named_buffers(recurse=False)):
            mod._buffers[name] = orig._buffers[name]
    own = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    if not all(id(t) in own for t in list(scnn.stream_module.parameters()) + list(scnn.stream_module.buffers())):
        raise BenchError(f"lightstream's streamed trunk of {type(model).__name__} holds tensors of its own after "
                         f"tying it to the model (its modules no longer mirror {', '.join(names)})")
    return scnn


def status(case: Case) -> str:
    """Why lightstream cannot run the case ('' if it may): not installed, BatchNorm not frozen, or
    not a ResNet-type model."""
    try:
        import lightstream.core.constructor  # noqa: F401
    except ImportError as e:
        return f"import lightstream fails: {e} (pip install -e '.[bench]')".replace("\n", " ")
    except Exception as e:  # a broken install raises anything
        return f"import lightstream fails: {type(e).__name__}: {e}".replace("\n", " ")
    if case.bn != "frozen":
        return (f"lightstream trains frozen BatchNorm only (eval mode, affine parameters frozen; its tiles "
                f"would each compute their own batch statistics); this case trains BN in {case.bn} mode: "
                f"run a --bn frozen case")
    if resnet_trunk(case.model) is None:
        return f"lightstream streams ResNet-type trunks (conv1..layerK); {case.model_name} is not one"
    return ""


def methods(case: Case, tiles: Optional[Sequence[int]] = None) -> List[Method]:
    """One method per tile size (default :func:`default_tile`): lightstream's streamed trunk, the
    plain head and loss; a row with the reason where it cannot run (not installed, train-mode BN,
    not a ResNet, a build that fails, tiles with no valid gradient row)."""
    why = status(case)
    tiles = list(tiles) if tiles else ([default_tile(case)] if not why else [case.resolution * 5 // 6])
    if why:
        return [Method("lightstream", f"tile {t}", note=why) for t in tiles]
    names = resnet_trunk(case.model)
    out = []
    for t in tiles:
        setting = f"tile {t}"
        try:
            scnn = build(case.model, names, t, case.device)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            out.append(Method("lightstream", setting, note=f"cannot build its StreamingCNN: {type(e).__name__}: "
                                                           f"{first}"[:300]))
            continue
        fwd, bwd = tile_counts(scnn, case.resolution)
        gl = scnn.tile_gradient_lost
        border = f"gradient border {gl.top}+{gl.bottom} px"
        if bwd == 0:
            out.append(Method("lightstream", setting, note=f"no valid gradient row in a {t}-pixel tile ({border}, "
                                                           f"stride {int(scnn.output_stride[1])}): its backward "
                                                           f"divides by zero; use larger tiles"))
            continue
        out.append(Method("lightstream", setting, LightstreamModel(case.model, scnn),
                          note=f"{fwd}x{fwd} tiles forward, {bwd}x{bwd} backward ({border})"))
    return out
