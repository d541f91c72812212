"""Benchmarks: scripts that print tables of measured memory and time.

``planner bench`` runs lrcnn against the alternatives (:func:`lrcnn.analysis.bench.compare.bench`),
built from :mod:`~lrcnn.analysis.bench.cases` (a case and one method's measured step),
:mod:`~lrcnn.analysis.bench.methods` (the alternatives and lrcnn's plans),
:mod:`~lrcnn.analysis.bench.studies` (max batch / resolution under a budget),
:mod:`~lrcnn.analysis.bench.dense` (dense cases simulated at large sizes, the time target) and
:mod:`~lrcnn.analysis.bench.tables` (markdown, plot, kept rows).  The other benchmarks are scripts:
``python -m lrcnn.analysis.bench.cost_grid`` (cost model accuracy), ``.solve_time`` (solver),
``.memory_rows`` (row memory) and ``.timm_sweep`` (exactness of plans of many timm CNNs; needs timm).

This module holds only the vocabulary the command line shares and is light to import (no torch).
"""
from __future__ import annotations


CASES = {  # name: (model, batch, square resolution, BatchNorm: train, or frozen: eval mode, parameters frozen)
    "vgg16": ("vgg16", 32, 224, "train"),
    "resnet50": ("resnet50", 8, 224, "train"),
    "resnet50-1024": ("resnet50", 1, 1024, "train"),
    "mobilenet_v2": ("mobilenet_v2", 16, 224, "train"),
    # lightstream's case: frozen BN, an input large against ResNet-18's receptive field (its tiles
    # must be, and it takes tiles of at least ~1000 pixels for this trunk)
    "resnet18-frozen-1536": ("resnet18", 1, 1536, "frozen"),
}
# dense (segmentation) cases, run only when named (--case): a per-pixel target, real CPU steps at
# a size that takes minutes here, and every method simulated at 2048, 4096 and 8192 pixels a side
# (lrcnn.analysis.bench.dense); results in seg-<device>.* and seg-sim-<device>.*
DENSE_CASES = {
    "unet-256": ("unet", 1, 256, "train"),
    "fcn_resnet50-256": ("fcn_resnet50", 1, 256, "train"),
}
ALL_CASES = {**CASES, **DENSE_CASES}
# BatchNorm in a case: ``train`` (batch statistics, trained affine parameters: what people train
# with) or ``frozen`` (eval mode, running statistics and affine parameters frozen: how fine-tuning on
# large inputs runs, and the only BN that tiled training such as lightstream streams)
BENCH_BN = ("train", "frozen")
METHODS = ("plain", "checkpoint-blocks", "checkpoint-sqrt", "compile", "rockmate", "lightstream", "lrcnn",
           "lrcnn-checkpoint", "lrcnn-compile")
