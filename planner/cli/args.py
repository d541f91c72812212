"""Argument types and options the verbs share; the parser whose errors are one line."""
from __future__ import annotations

import argparse
import re
from typing import Callable, Tuple

from lrcnn.errors import UsageError
from lrcnn.models.zoo import BN_MODES, DTYPES
from lrcnn.planner.plan import AMP_DTYPES


EXIT_OK = 0
EXIT_ERROR = 2
DEFAULT_BATCH = 32
_RES_RE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


def parse_resolution(text: str) -> Tuple[int, int]:
    """``(H, W)`` from ``"224"`` (square) or ``"512x384"`` (H x W).

    Raises ``ValueError`` with a one-line message for anything else (``"22x"``, ``"abc"``,
    ``"0x5"``, negative or empty sizes).
    """
    m = _RES_RE.match(str(text))
    if not m:
        raise UsageError(f"cannot read resolution {text!r}: use H or HxW with positive integers, "
                         f"e.g. 224 or 512x384")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
    if h < 1 or w < 1:
        raise UsageError(f"resolution {text!r} must have positive height and width, e.g. 224 or 512x384")
    return h, w


def argtype(fn: Callable):
    """Wrap a ValueError-raising parser as an argparse ``type`` that keeps its message."""
    def conv(text):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = fn.__name__
    return conv


def int_at_least(text: str, lo: int) -> int:
    want = "a positive integer" if lo == 1 else f"{lo} or more"
    try:
        v = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{text!r} is not a whole number; give {want}") from None
    if v < lo:
        raise UsageError(f"{text!r} must be {want}")
    return v


def positive_int_value(text: str) -> int:
    return int_at_least(text, 1)


positive_int = argtype(positive_int_value)


resolution_arg = argtype(parse_resolution)


def nonneg_int(text: str) -> int:
    return int_at_least(text, 0)


def positive_number(what: str) -> Callable:
    """argparse type: a positive float (``what`` names it in the one-line error)."""
    def conv(text: str) -> float:
        try:
            v = float(str(text).strip())
        except ValueError:
            raise UsageError(f"{text!r} is not a number; give {what}") from None
        if not v > 0:
            raise UsageError(f"{text!r} must be a positive number")
        return v
    conv.__name__ = "positive number"
    return argtype(conv)


def add_amp_arg(p: argparse.ArgumentParser) -> None:
    """``--amp bf16|fp16``: mixed precision as ``torch.autocast`` runs it."""
    p.add_argument("--amp", choices=AMP_DTYPES, default=None,
                   help="mixed precision: activations in bf16 or fp16 as torch.autocast makes them, float32 "
                        "parameters, gradients and optimizer state (needs --dtype float32; default: none)")


def add_model_args(p: argparse.ArgumentParser, batch_default: int = DEFAULT_BATCH) -> None:
    """The options that say which model to capture, at which shape (shared by later verbs)."""
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see 'planner models')")
    p.add_argument("--batch", type=positive_int, default=batch_default, metavar="N",
                   help=f"batch size (default {batch_default})")
    p.add_argument("--resolution", type=resolution_arg, default=None, metavar="H[xW]",
                   help="input size: 224 (square) or HxW such as 512x384 (default: the model's own)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="data type (default float32)")
    p.add_argument("--bn", choices=BN_MODES, default="train",
                   help="BatchNorm mode during capture: train (batch statistics) or eval (default train)")
    add_amp_arg(p)
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="local state dict to load (torch.save(model.state_dict(), PATH)); "
                        "without it the model is built on the meta device (no memory)")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="classes the model predicts, per image or per pixel (default: 1000 for torchvision "
                        "classifiers, 21 for its segmentation models, 2 for unet, 10 (dense: 3) for tiny_*)")


def shape_text(s) -> str:
    return "x".join(str(v) for v in s)


def mib_text(n: float) -> str:
    return f"{n / 2**20:.3f}"


def gflop_text(n: float) -> str:
    return f"{n / 1e9:.3f}"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        msg = " ".join(str(message).split())
        self.exit(EXIT_ERROR, f"{self.prog}: error: {msg} (see '{self.prog} --help')\n")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
