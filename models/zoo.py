"""Model zoo: torchvision classification CNNs by name, dense (segmentation) models, plus small
networks for fast tests.

Dense models predict a class per pixel: torchvision's segmentation models (FCN, DeepLabV3, LR-ASPP;
their output is a dict, the logits under ``"out"``; built without the auxiliary head) and a
standard U-Net (:class:`UNet`).  Models are built with random initialisation (backbones too);
nothing is ever downloaded.  A local state dict can be loaded with ``weights=PATH``.
"""
from __future__ import annotations

import difflib
import os
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from lrcnn.errors import LrcnnError


DTYPES = ("float32", "float64", "bfloat16", "float16")  # the dtypes a model is built and planned in
BN_MODES = ("train", "eval")  # BatchNorm in training (batch statistics) or eval (running statistics) mode


class ModelError(LrcnnError, ValueError):
    """Unknown model name or unusable weights file."""


_TV_NAMES = [
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "alexnet", "squeezenet1_0", "squeezenet1_1", "densenet121",
    "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0", "mnasnet1_0", "googlenet",
]

#: torchvision's segmentation models (``torchvision.models.segmentation``), built with random weights
#: and random backbones and without the auxiliary head (``aux_loss=False``: the output holds the
#: logits alone, under ``"out"``)
_TV_SEG_NAMES = [
    "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
]
_NO_AUX = ("lraspp_mobilenet_v3_large",)  # (no auxiliary head to switch off)

#: what a model predicts: one class per image, or one class per pixel (a dense model)
TASKS = ("classification", "segmentation")

# Default input resolution per model (H = W); torchvision's classification models use 224, its
# segmentation references train on 520x520 crops; a U-Net halves its map 4 times (a multiple of 16).
_DEFAULT_RES = {"inception_v3": 299, "unet": 512}


# ---------------------------------------------------------------------------------------------
# Small test networks (built from torchvision's own blocks, so they exercise the same code paths)
# ---------------------------------------------------------------------------------------------

class TinyVGG(nn.Module):
    """VGG-style trunk: 3x3 convs, ReLU, max-pool (one with ceil_mode), avg-pool; tiny head."""

    def __init__(self, num_classes: int = 10, bn: bool = False):
        super().__init__()
        def block(cin, cout):
            layers = [nn.Conv2d(cin, cout, 3, padding=1)]
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            return layers
        self.features = nn.Sequential(
            *block(3, 8), *block(8, 8), nn.MaxPool2d(2, 2),
            *block(8, 16), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
            *block(16, 16), nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


class TinyResNet(nn.Module):
    """ResNet-style: stem (7x7 s2 conv, BN, ReLU, 3x3 s2 max-pool), a bottleneck and a basic block
    with strided downsample shortcuts (torchvision's Bottleneck / BasicBlock)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck

        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Bottleneck(8, 4, 1, nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))))
        self.layer2 = nn.Sequential(BasicBlock(16, 16, 2, nn.Sequential(nn.Conv2d(16, 16, 1, 2, bias=False), nn.BatchNorm2d(16))))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyMobileNet(nn.Module):
    """MobileNetV2-style: ReLU6, depthwise convolutions, inverted residuals (torchvision's block)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.ops.misc import Conv2dNormActivation

        self.features = nn.Sequential(
            Conv2dNormActivation(3, 8, stride=2, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6),
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
        )
        self.classifier = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


class DoubleConv(nn.Sequential):
    """U-Net's block: (3x3 convolution, BatchNorm, ReLU) twice, the map's size kept."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A standard U-Net (Ronneberger et al. 2015, with same-padding convolutions and BatchNorm):
    ``levels`` times down (2x2 max-pool, :class:`DoubleConv` doubling the width), then as many times
    up (2x2 stride-2 transposed convolution halving the width, concatenation with the skip of the
    same level, :class:`DoubleConv`), a 1x1 convolution to ``num_classes`` logits per pixel.  The
    logits have the input's size; H and W must be multiples of ``2**levels`` (16 by default)."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, width: int = 64, levels: int = 4):
        super().__init__()
        w = [width * 2 ** i for i in range(levels + 1)]
        self.inc = DoubleConv(in_channels, w[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), DoubleConv(w[i], w[i + 1])) for i in range(levels))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(levels)))
        self.dec = nn.ModuleList(DoubleConv(2 * w[i], w[i]) for i in reversed(range(levels)))
        self.outc = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.outc(x)


class TinyFCN(nn.Module):
    """A small dense model written as torchvision writes its segmentation models: a strided
    backbone, a 1x1 classifier, logits upsampled back to the input's size read from
    ``x.shape[-2:]`` (bilinear ``F.interpolate``), returned as ``{"out": logits}``."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                        nn.ReLU(inplace=True), nn.Conv2d(8, num_classes, 1))

    def forward(self, x):
        size = x.shape[-2:]
        y = self.classifier(self.backbone(x))
        return {"out": nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)}


_TINY: Dict[str, Callable[..., nn.Module]] = {
    "tiny_vgg": lambda num_classes=10, **kw: TinyVGG(num_classes, bn=False),
    "tiny_vgg_bn": lambda num_classes=10, **kw: TinyVGG(num_classes, bn=True),
    "tiny_resnet": lambda num_classes=10, **kw: TinyResNet(num_classes),
    "tiny_mobilenet": lambda num_classes=10, **kw: TinyMobileNet(num_classes),
    "tiny_fcn": lambda num_classes=3, **kw: TinyFCN(num_classes),
    "tiny_unet": lambda num_classes=3, **kw: UNet(num_classes, width=4, levels=2),
}
_DENSE = {"unet", "tiny_fcn", "tiny_unet", *_TV_SEG_NAMES}  # models with a class per pixel


def model_task(name: str) -> str:
    """What zoo model ``name`` predicts (one of :data:`TASKS`): ``segmentation`` (a class per pixel,
    dense logits) or ``classification``."""
    return "segmentation" if name in _DENSE else "classification"


def list_models(task: Optional[str] = None) -> List[str]:
    """Names ``get_model`` accepts (torchvision classification models available in this install,
    dense models, then tiny nets); ``task`` (one of :data:`TASKS`): only the models of that task."""
    import torchvision.models as tvm

    names = ([n for n in _TV_NAMES if hasattr(tvm, n)] + ["unet"]
             + [n for n in _TV_SEG_NAMES if hasattr(tvm.segmentation, n)] + list(_TINY))
    if task is not None and task not in TASKS:
        raise ModelError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return names if task is None else [n for n in names if model_task(n) == task]


def default_resolution(name: str) -> int:
    if name.startswith("tiny_"):
        return 32
    if name in _TV_SEG_NAMES:
        return 520
    return _DEFAULT_RES.get(name, 224)


def get_model(name: str, num_classes: Optional[int] = None, weights: Optional[str] = None,
              device: Optional[str] = None, **kw) -> nn.Module:
    """Build a model by name with random weights (never downloads).

    ``num_classes`` defaults to 1000 for torchvision classification models, 21 for its
    segmentation models (Pascal VOC's), 2 for ``unet`` and 10 (3 for the dense ones) for the tiny
    test nets.  Segmentation backbones are random too, and built without the auxiliary head.
    ``weights``: path of a local state dict (``torch.save(model.state_dict(), path)``) to load.
    ``device="meta"`` builds the model without allocating parameter memory (for capture/planning).
    """
    import torchvision.models as tvm

    if name in _TINY:
        ctor = lambda: _TINY[name](**({"num_classes": num_classes} if num_classes else {}), **kw)  # noqa: E731
    elif name == "unet":
        ctor = lambda: UNet(num_classes=num_classes or 2, **kw)  # noqa: E731
    elif name in _TV_SEG_NAMES and hasattr(tvm.segmentation, name):
        kw.setdefault("weights", None)
        kw.setdefault("weights_backbone", None)  # (its default downloads ImageNet weights)
        if name not in _NO_AUX:
            kw.setdefault("aux_loss", False)
        ctor = lambda: getattr(tvm.segmentation, name)(num_classes=num_classes or 21, **kw)  # noqa: E731
    elif name in _TV_NAMES and hasattr(tvm, name):
        kw.setdefault("weights", None)
        if name in ("googlenet", "inception_v3"):
            kw.setdefault("aux_logits", False)
            kw.setdefault("init_weights", True)
        ctor = lambda: getattr(tvm, name)(num_classes=num_classes or 1000, **kw)  # noqa: E731
    else:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; run 'planner models' for the list")
    if device is not None:
        try:
            with torch.device(device):
                model = ctor()
        except NotImplementedError:
            # Some builders (regnet) compute layer widths with tensors and read them back with
            # .tolist(), which the meta device cannot do: build on the CPU, then move.
            model = ctor().to(device)
    else:
        model = ctor()
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict into ``model``; a clear ModelError if it cannot be used."""
    if os.path.isdir(path):
        raise ModelError(f"weights file {path!r} is a folder, not a file; pass a state dict saved with torch.save")
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path!r} does not exist; pass a state dict saved with torch.save")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"weights file {path!r} is not a readable torch state dict ({type(e).__name__}); "
                         f"save one with torch.save(model.state_dict(), path)") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelError(f"weights file {path!r} holds a {type(sd).__name__}, not a state dict")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ModelError(f"weights file {path!r} does not match the model: {first[:200]}") from None


def set_bn_mode(model: nn.Module, bn: str) -> nn.Module:
    """Put ``model`` in training mode with its BatchNorm layers in ``bn`` mode.

    ``train``: batch statistics (what people train with); ``eval``: frozen BN (running
    statistics), everything else (dropout) still training.  Returns the model.
    """
    if bn not in BN_MODES:
        raise ModelError(f"BatchNorm mode {bn!r} is not one of {', '.join(BN_MODES)}")
    model.train()
    if bn == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def parse_dtype(name: str):
    """The torch dtype for one of :data:`DTYPES` (:class:`ModelError` otherwise)."""
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)
