"""Model zoo: torchvision classification CNNs by name, plus small networks for fast tests.

Models are built with random initialisation; nothing is ever downloaded.  A local state dict can be
loaded with ``weights=PATH``.
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

# Default input resolution per model (H = W); torchvision's classification models use 224.
_DEFAULT_RES = {"inception_v3": 299}


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


_TINY: Dict[str, Callable[..., nn.Module]] = {
    "tiny_vgg": lambda num_classes=10, **kw: TinyVGG(num_classes, bn=False),
    "tiny_vgg_bn": lambda num_classes=10, **kw: TinyVGG(num_classes, bn=True),
    "tiny_resnet": lambda num_classes=10, **kw: TinyResNet(num_classes),
    "tiny_mobilenet": lambda num_classes=10, **kw: TinyMobileNet(num_classes),
}


def list_models() -> List[str]:
    """Names ``get_model`` accepts (torchvision models available in this install, then tiny nets)."""
    import torchvision.models as tvm

    return [n for n in _TV_NAMES if hasattr(tvm, n)] + list(_TINY)


def default_resolution(name: str) -> int:
    if name.startswith("tiny_"):
        return 32
    return _DEFAULT_RES.get(name, 224)


def get_model(name: str, num_classes: Optional[int] = None, weights: Optional[str] = None,
              device: Optional[str] = None, **kw) -> nn.Module:
    """Build a model by name with random weights (never downloads).

    ``num_classes`` defaults to 1000 for torchvision models and 10 for the tiny test nets.
    ``weights``: path of a local state dict (``torch.save(model.state_dict(), path)``) to load.
    ``device="meta"`` builds the model without allocating parameter memory (for capture/planning).
    """
    import torchvision.models as tvm

    if name in _TINY:
        ctor = lambda: _TINY[name](num_classes=num_classes or 10, **kw)  # noqa: E731
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
