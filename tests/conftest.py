"""Shared test setup: repository root on sys.path, cached meta-device captures."""
from __future__ import annotations

import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

@functools.lru_cache(maxsize=32)
def _captured(name: str, shape: tuple, dtype: str = "float32", training: bool = True,
              num_classes=None):
    import torch

    from models import capture, get_model

    model = get_model(name, num_classes=num_classes, device="meta")
    model.train(training)
    return capture(model, shape, getattr(torch, dtype), model_name=name)


@pytest.fixture(scope="session")
def captured():
    """``captured(name, shape, dtype='float32', training=True, num_classes=None)``: a LayerGraph of
    a zoo model built on the meta device, cached for the whole session (treat it as read-only)."""
    return _captured


@pytest.fixture(scope="session")
def repo_root() -> str:
    return ROOT
