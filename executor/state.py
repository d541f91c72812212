"""Parameters and buffers of a group of modules, captured at forward time and re-bound for recompute.

Backward (and so every recomputation) runs after ``torch.func.functional_call`` or a fake-tensor
simulation has put the module's own tensors back.  A recompute must use the tensors the forward
pass used, so segments capture them when they run forward and bind them again while recomputing.

State is found, not named: whatever a module writes into its buffers during forward (BatchNorm
running statistics and counters, a spectral norm's power-iteration vectors, a fake-quant
observer's ranges, a user's EMA buffer) is written once, by the forward pass.  A recomputation
runs the same module calls on copies of the buffers as they were before that forward
(:meth:`StateSlots.snapshot`, :meth:`StateSlots.replay`), so it computes exactly what the forward
computed and its writes are thrown away.  A stock BatchNorm's output never depends on the
statistics it writes (training: batch statistics; eval: nothing written), so its buffers are not
copied before the forward, and copied for a recompute only when it would write them.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

from lrcnn.models.ops import module_refusal


class StateSlots:
    """(module, name) of every parameter and buffer of some modules and their submodules (a
    parametrization's original tensors, an observer's buffers), in a fixed order."""

    def __init__(self, modules: Iterable[nn.Module]):
        mods = list(dict.fromkeys(sub for m in modules if m is not None for sub in m.modules()))
        self.params: List[Tuple[nn.Module, str]] = []
        self.buffers: List[Tuple[nn.Module, str]] = []
        self._bn: List[bool] = []  # the buffer is a stock BatchNorm's
        seen = set()
        for m in mods:
            for name, p in m.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append((m, name))
            for name, b in m.named_buffers(recurse=False):
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    self.buffers.append((m, name))
                    self._bn.append(isinstance(m, nn.modules.batchnorm._BatchNorm) and not module_refusal(m))

    def current_params(self) -> List[torch.Tensor]:
        return [m._parameters[n] for m, n in self.params]

    def current_buffers(self) -> List[torch.Tensor]:
        return [m._buffers[n] for m, n in self.buffers]

    def snapshot(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The parameters, and copies of the buffers as they are now (before a forward pass that
        may write them; a stock BatchNorm's are not copied)."""
        return self.current_params(), [b if bn else b.detach().clone()
                                       for b, bn in zip(self.current_buffers(), self._bn)]

    def replay(self, snap: Tuple[List[torch.Tensor], List[torch.Tensor]]):
        """Bind a :meth:`snapshot` for a recomputation: its parameters and fresh copies of its
        buffers (so the recompute's own writes touch neither the module nor the snapshot; an
        eval-mode stock BatchNorm writes nothing and keeps its own)."""
        params, buffers = snap
        return self.bound(params, [b if bn and not (m.training and m.track_running_stats) else b.clone()
                                   for b, bn, (m, _) in zip(buffers, self._bn, self.buffers)])

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


def amp_state() -> tuple:
    """The autocast settings in force now (per device type: enabled, dtype), to be replayed by a
    recomputation that runs later (in backward, where they are not in force): each op of a
    recompute then runs in the dtype the forward ran it in, as ``torch.utils.checkpoint`` does."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


@contextlib.contextmanager
def no_cast_cache():
    """Run the block without autocast's cast cache.  Autocast keeps the half-precision copy of
    every parameter it casts until the outermost autocast region ends; a segment that keeps no
    activations (checkpoint, row strips) would otherwise keep those copies through the rest of
    the forward.  The casts are the same with or without the cache (only reused or not)."""
    cached = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cached)


@contextlib.contextmanager
def amp_replay(state: tuple):
    """Run the block under the autocast settings :func:`amp_state` recorded."""
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            if enabled != torch.is_autocast_enabled(device) or (enabled and dtype != torch.get_autocast_dtype(device)):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield
