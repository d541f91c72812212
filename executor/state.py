"""Parameters and buffers of a group of modules, captured at forward time and re-bound for recompute.

Backward (and so every recomputation) runs after ``torch.func.functional_call`` or a fake-tensor
simulation has put the module's own tensors back.  A recompute must use the tensors the forward
pass used, so segments capture them when they run forward and bind them again while recomputing.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn


class StateSlots:
    """(module, name) of every parameter and buffer of some modules, in a fixed order."""

    def __init__(self, modules: Iterable[nn.Module]):
        mods = list(dict.fromkeys(m for m in modules if m is not None))
        self.params: List[Tuple[nn.Module, str]] = []
        seen = set()
        for m in mods:
            for name, p in m.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append((m, name))
        self.buffers: List[Tuple[nn.Module, str]] = [(m, b) for m in mods for b, _ in m.named_buffers(recurse=False)]

    def current_params(self) -> List[torch.Tensor]:
        return [getattr(m, n) for m, n in self.params]

    def current_buffers(self) -> List[torch.Tensor]:
        return [getattr(m, n) for m, n in self.buffers]

    def capture(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        return self.current_params(), self.current_buffers()

    @contextlib.contextmanager
    def bound(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]):
        """Temporarily make the modules use these tensors (no-op where they already do)."""
        saved = []
        for (m, name), v in zip(self.params, params):
            if m._parameters[name] is not v:
                saved.append((m._parameters, name, m._parameters[name]))
                m._parameters[name] = v
        for (m, name), v in zip(self.buffers, buffers):
            if m._buffers[name] is not v:
                saved.append((m._buffers, name, m._buffers[name]))
                m._buffers[name] = v
        try:
            yield
        finally:
            for d, name, v in saved:
                d[name] = v
