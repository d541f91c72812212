"""Benchmarks: scripts that print tables of measured memory and time.

``planner bench`` runs lrcnn against the alternatives (:func:`lrcnn.analysis.bench.compare.bench`),
built from :mod:`~lrcnn.analysis.bench.cases` (a case and one method's measured step),
:mod:`~lrcnn.analysis.bench.methods` (the alternatives and lrcnn's plans),
:mod:`~lrcnn.analysis.bench.studies` (max batch / resolution under a budget) and
:mod:`~lrcnn.analysis.bench.tables` (markdown, plot, kept rows).  The other benchmarks are scripts:
``python -m lrcnn.analysis.bench.cost_grid`` (cost model accuracy), ``.solve_time`` (solver),
``.memory_rows`` (row memory) and ``.timm_sweep`` (exactness of plans of many timm CNNs; needs timm).

This module holds only the vocabulary the command line shares and is light to import (no torch).
"""
from __future__ import annotations


CASES = {  # name: (model, batch, square resolution)
    "vgg16": ("vgg16", 32, 224),
    "resnet50": ("resnet50", 8, 224),
    "resnet50-1024": ("resnet50", 1, 1024),
    "mobilenet_v2": ("mobilenet_v2", 16, 224),
}
METHODS = ("plain", "checkpoint-blocks", "checkpoint-sqrt", "compile", "rockmate", "lightstream", "lrcnn",
           "lrcnn-checkpoint", "lrcnn-compile")
