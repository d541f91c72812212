"""Measure one training step of a model, with or without a plan, real or simulated (fake tensors).

``step_memory`` is what benchmarks and tests call: it builds the inputs, runs forward, loss and
backward under :func:`executor.memory.measure_step` and returns the :class:`MemoryReport`
(phases ``forward``, ``backward``).  Peak = new live tensor bytes during the step: activations,
parameter gradients and transients; parameters and the input batch existed before and are not
counted.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import memory


def _classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 10


def step_memory(model: nn.Module, input_shape: Sequence[int], fake: bool = True,
                dtype: torch.dtype = torch.float32, device: Optional[str] = None,
                input_grad: bool = False) -> memory.MemoryReport:
    """Peak memory of one training step of ``model`` (a plain model or ``apply_plan``'s result).

    ``fake=True`` runs the very same code under ``FakeTensorMode`` (no real memory, any size);
    ``fake=False`` runs it for real on ``device`` (CPU: storage accounting; CUDA: allocator stats).
    """
    model.zero_grad(set_to_none=True)
    n_cls = _classes(model)
    if fake:
        if device is None:  # a model built on the meta device is simulated on "meta"
            first = next(iter(model.parameters()), None)
            device = "meta" if first is not None and first.is_meta else None
        with memory.fake_mode():
            state = memory.fake_state(model)
            x = torch.randn(*input_shape, dtype=dtype, device=device)
            y = torch.randint(0, n_cls, (input_shape[0],), device=device)
            if input_grad:
                x.requires_grad_(True)

            def step():
                out = torch.func.functional_call(model, state, (x,))
                loss = F.cross_entropy(out, y)
                memory.mark("forward")
                loss.backward()
                memory.mark("backward")

            return memory.measure_step(step, device=device)
    x = torch.randn(*input_shape, dtype=dtype, device=device, requires_grad=input_grad)
    y = torch.randint(0, n_cls, (input_shape[0],), device=device)

    def step():
        out = model(x)
        loss = F.cross_entropy(out, y)
        memory.mark("forward")
        loss.backward()
        memory.mark("backward")

    try:
        return memory.measure_step(step, device=device)
    finally:
        model.zero_grad(set_to_none=True)
