"""Running a plan under ``torch.distributed`` (DistributedDataParallel, launched by torchrun).

A plan needs nothing special under DDP: each rank applies the plan to its own copy of the model
and runs it on its local batch (the plan's ``input_shape[0]`` is the *per-rank* batch), and DDP
averages the gradients.  Row segments are one autograd Function per segment that takes the
segment's parameters as inputs, checkpoint segments use non-reentrant checkpointing and store
segments saved-tensor hooks, so every parameter's gradient is accumulated exactly once per
backward pass and DDP's default settings (bucketed all-reduce as gradients become ready, no
``static_graph``, no ``find_unused_parameters``) apply unchanged.

This module holds the launcher glue ``planner run`` / ``python -m lrcnn run`` use: the rank
from torchrun's environment, process-group set-up, per-rank record files and the merge.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from lrcnn.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this module started the process group (and ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.initialized_here

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> Optional[DistInfo]:
    """The rank torchrun (or any launcher setting ``RANK``/``WORLD_SIZE``) gave this process,
    else None.  Bad values are a :class:`~lrcnn.errors.UsageError` (a ``ValueError``) naming the variable."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return None
    vals = {}
    for var, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0")):
        raw = os.environ.get(var, default)
        try:
            vals[var] = int(raw)
        except (TypeError, ValueError):
            raise UsageError(f"environment variable {var}={raw!r} is not an integer; launch with torchrun "
                             f"(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)") from None
    if vals["WORLD_SIZE"] < 1 or not 0 <= vals["RANK"] < vals["WORLD_SIZE"]:
        raise UsageError(f"RANK={vals['RANK']} WORLD_SIZE={vals['WORLD_SIZE']}: need 0 <= RANK < WORLD_SIZE; "
                         f"launch with torchrun, which sets both")
    return DistInfo(vals["RANK"], vals["WORLD_SIZE"], vals["LOCAL_RANK"])


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """CUDA: one GPU per local rank (``cuda:LOCAL_RANK``); CPU unchanged."""
    if device.type == "cuda" and info.enabled:
        if info.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} CUDA GPU(s) "
                             f"on this node; start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (``env://``; gloo on CPU, nccl on CUDA) and
    return this rank; without torchrun's variables, a single process (nothing initialised)."""
    import torch.distributed as dist

    info = env_info()
    if info is None:
        return DistInfo()
    if dist.is_initialized():  # the caller set it up
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UsageError(f"{var} is not set; launch with torchrun, which sets it")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=30), **kw)
    return DistInfo(info.rank, info.world_size, info.local_rank, initialized_here=True)


def shutdown(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not (info.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, info: DistInfo) -> Optional[List[Any]]:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others).  Goes through the
    process group, so ranks on other nodes need no shared file system."""
    import torch.distributed as dist

    if not (info.enabled and dist.is_initialized()):
        return [obj]
    got = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, got, dst=0)
    return got


def all_gather(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj`` in rank order, on every rank."""
    import torch.distributed as dist

    if not (info.enabled and dist.is_initialized()):
        return [obj]
    got = [None] * info.world_size
    dist.all_gather_object(got, obj)
    return got


def rank_path(path: str, rank) -> str:
    """``out.parquet`` -> ``out.rank3.parquet`` (the extension kept last)."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank}{ext}"


def wrap(module: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel`` with default settings (one device per process), or the
    module itself in a single process."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
