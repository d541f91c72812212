"""Shared test setup: repository root on sys.path, hypothesis profiles, cached meta-device captures."""
from __future__ import annotations

import functools
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Hypothesis profiles, for every property test (tests set no max_examples / derandomize of their
# own).  "ci", the default: the same examples on every run (derandomized, no example database),
# so a test run passes or fails the same way everywhere.  "long": many more random examples, to
# look for new failures: ``pytest --hypothesis-profile=long tests/test_rows_property.py``; keep
# every failing case it finds as an explicit ``@example`` of its test.
_PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_PROPERTY)
settings.register_profile("long", max_examples=2000, derandomize=False, print_blob=True, **_PROPERTY)
settings.load_profile("ci")  # (pytest's --hypothesis-profile, applied after this, overrides it)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the long cases (marker 'full': minutes each on a small CPU), which CI skips")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="a long case: run it with --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)

@functools.lru_cache(maxsize=32)
def _captured(name: str, shape: tuple, dtype: str = "float32", training: bool = True,
              num_classes=None):
    import torch

    from lrcnn.models import capture, get_model

    model = get_model(name, num_classes=num_classes, device="meta")
    model.train(training)
    return capture(model, shape, getattr(torch, dtype), model_name=name)


@pytest.fixture(scope="session")
def captured():
    """``captured(name, shape, dtype='float32', training=True, num_classes=None)``: a LayerGraph of
    a zoo model built on the meta device, cached for the whole session (treat it as read-only)."""
    return _captured


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 convolutions (property tests): one intra-op thread is 10-1000x faster than two
    here.  Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return ROOT
