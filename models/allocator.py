"""What PyTorch's CUDA caching allocator reserves for a sequence of allocations and frees.

A CUDA out-of-memory error depends on *reserved* bytes (``torch.cuda.max_memory_reserved``: the
segments the allocator took from the driver), not on the bytes live tensors hold.  This module
replays a recorded sequence of storage allocations and frees the way ``c10/cuda/
CUDACachingAllocator.cpp`` handles them, on one stream, and returns the peaks of reserved and
allocated bytes.  The rules (PyTorch's defaults, no ``PYTORCH_CUDA_ALLOC_CONF`` but optionally
``expandable_segments:True``):

* every request is rounded up to a multiple of 512 bytes (at least 512);
* rounded sizes up to 1 MiB are served from the *small* pool, larger ones from the *large* pool;
  a block of one pool never serves the other;
* a request is served by the best-fitting cached free block of its pool (the smallest block at
  least as large; equal sizes: the lowest address);
* with none, a new segment is reserved: 2 MiB for a small request, 20 MiB for a large request
  under 10 MiB, else the request rounded up to a multiple of 2 MiB;
* the block found (or the new segment) is split when the rest is worth keeping: in the small pool
  when at least 512 bytes remain, in the large pool when more than 1 MiB remains; otherwise the
  whole block is handed out (and counted as allocated: ``max_memory_allocated`` counts block
  sizes, not requested bytes);
* a freed block is merged with free neighbours *of its own segment* and cached; segments are never
  merged with one another and never returned to the driver (``empty_cache`` and the retry after a
  failed ``cudaMalloc`` are not modelled: reserved only grows, as in a run that does not OOM).

``expandable_segments=True`` models ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: one
segment per pool that grows by mapping pages (2 MiB in the small pool, 20 MiB in the large one)
at its end; blocks are split whenever 512 bytes or more remain, free blocks merge across the whole
segment, and a free block at the segment's end is used (and grown) only when no other cached
block fits.

Events are ``(id, nbytes)`` pairs: ``nbytes >= 0`` allocates block ``id`` (0 bytes: no block, as
CUDA hands out a null pointer), :data:`FREE` frees it.  :class:`lrcnn.models.memory.StorageTracker`
records such a sequence (``record=True``) from a real or a simulated (fake) training step.

Not modelled: several streams, CUDA graphs' private pools, ``max_split_size_mb``,
``roundup_power2_divisions``, garbage collection, and memory that is not a tensor storage (cuDNN
and cuBLAS workspaces are allocations too on CUDA, but a CPU or fake step does not make them).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
import os
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

from lrcnn.errors import UsageError

__all__ = ["CachingAllocatorModel", "AllocatorPeaks", "replay", "replay_sizes", "round_size",
           "allocator_settings", "expandable_segments", "prefer_expandable_segments", "ALLOC_CONF_VARS",
           "LRCNN_ALLOC_CONF", "segment_size", "FREE",
           "MIN_BLOCK", "SMALL_SIZE", "SMALL_BUFFER", "LARGE_BUFFER", "MIN_LARGE_ALLOC", "ROUND_LARGE"]

MiB = 2**20
MIN_BLOCK = 512            #: every request is rounded up to a multiple of this
SMALL_SIZE = 1 * MiB       #: the largest request of the small pool
SMALL_BUFFER = 2 * MiB     #: segment of the small pool (also its expandable page)
LARGE_BUFFER = 20 * MiB    #: segment of a large request under MIN_LARGE_ALLOC (also the large expandable page)
MIN_LARGE_ALLOC = 10 * MiB  #: from here on a large request gets a segment of its own size ...
ROUND_LARGE = 2 * MiB      #: ... rounded up to a multiple of this
FREE = -1                  #: the ``nbytes`` of a free event

Event = Tuple[Hashable, int]


def round_size(nbytes: int) -> int:
    """The block size the allocator hands out for a request of ``nbytes``: a multiple of 512."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The segment ``cudaMalloc``-ed for a rounded request of ``size`` that no cached block fits."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("addr", "size", "prev", "next", "free")

    def __init__(self, addr: int, size: int, prev: Optional["_Block"] = None, nxt: Optional["_Block"] = None):
        self.addr, self.size, self.prev, self.next, self.free = addr, size, prev, nxt, True


class _Pool:
    """The cached free blocks of one pool, ordered by (size, address); with expandable segments
    also the pool's one segment (its last block and the end of its mapped pages)."""

    def __init__(self, small: bool, page: int) -> None:
        self.small, self.page = small, page
        self.keys: List[Tuple[int, int]] = []      # sorted (size, addr) of the free blocks
        self.blocks: Dict[int, _Block] = {}        # addr -> free block
        self.last: Optional[_Block] = None         # expandable: the segment's last block
        self.end = 0                               # expandable: end address of the mapped pages

    def add(self, b: _Block) -> None:
        b.free = True
        bisect.insort(self.keys, (b.size, b.addr))
        self.blocks[b.addr] = b

    def remove(self, b: _Block) -> None:
        i = bisect.bisect_left(self.keys, (b.size, b.addr))
        del self.keys[i]
        del self.blocks[b.addr]

    def best_fit(self, size: int, expandable: bool) -> Optional[_Block]:
        """The smallest free block of at least ``size`` bytes (lowest address among equals); with
        expandable segments the block at the segment's end only when no other one fits."""
        i = bisect.bisect_left(self.keys, (size, -1))
        if i == len(self.keys):
            return None
        b = self.blocks[self.keys[i][1]]
        if expandable and b is self.last and i + 1 < len(self.keys):
            b = self.blocks[self.keys[i + 1][1]]
        return b


@dataclass
class AllocatorPeaks:
    """Peaks of one replay (bytes).

    ``reserved``: segments taken from the driver (``max_memory_reserved``); ``allocated``: blocks
    handed out, rounded and unsplit remainders included (``max_memory_allocated``); ``requested``:
    bytes asked for (what storage accounting counts); ``segments``: segments (pages with
    expandable segments) reserved at the end."""

    reserved: int
    allocated: int
    requested: int
    segments: int

    @property
    def overhead(self) -> int:
        """Reserved bytes above the requested peak: what the allocator adds at the peak."""
        return self.reserved - self.requested


class CachingAllocatorModel:
    """The caching allocator's bookkeeping for one device and one stream (see the module docstring).

    ``malloc(id, nbytes)`` / ``free(id)`` change :attr:`reserved`, :attr:`allocated` and
    :attr:`requested` (current bytes) and their peaks (:meth:`peaks`; :meth:`reset_peaks` sets
    them to the current values, as ``torch.cuda.reset_peak_memory_stats`` does).
    """

    def __init__(self, expandable_segments: bool = False) -> None:
        self.expandable = bool(expandable_segments)
        self._pools = (_Pool(True, SMALL_BUFFER), _Pool(False, LARGE_BUFFER))
        self._live: Dict[Hashable, Tuple[Optional[_Block], int, _Pool]] = {}
        self._next_addr = 0
        self.reserved = self.allocated = self.requested = self.segments = 0
        self.peak_reserved = self.peak_allocated = self.peak_requested = 0

    def _address_range(self, size: int) -> int:
        addr = self._next_addr
        self._next_addr += size + SMALL_BUFFER  # (a gap: segments are never adjacent)
        return addr

    def _new_block(self, pool: _Pool, size: int) -> _Block:
        """A block of at least ``size`` bytes from the driver: a new segment, or (expandable) the
        segment's free tail grown by whole pages / new pages at its end."""
        if not self.expandable:
            seg = segment_size(size)
            self.reserved += seg
            self.segments += 1
            return _Block(self._address_range(seg), seg)
        if pool.last is None:
            pool.end = self._address_range(1 << 48)  # the segment's address space
        tail = pool.last if pool.last is not None and pool.last.free else None
        need = size - (tail.size if tail is not None else 0)
        grow = -(-need // pool.page) * pool.page
        self.reserved += grow
        self.segments += grow // pool.page
        if tail is not None:
            pool.remove(tail)
            tail.size += grow
            b = tail
        else:
            b = _Block(pool.end, grow, pool.last)
            if pool.last is not None:
                pool.last.next = b
            pool.last = b
        pool.end += grow
        return b

    def malloc(self, key: Hashable, nbytes: int) -> None:
        """Allocate ``nbytes`` for ``key`` (0 bytes: nothing is allocated)."""
        if key in self._live:
            raise UsageError(f"allocation {key!r} is already live: free it before allocating it again")
        if nbytes <= 0:
            self._live[key] = (None, 0, self._pools[0])
            return
        size = round_size(nbytes)
        pool = self._pools[0] if size <= SMALL_SIZE else self._pools[1]
        b = pool.best_fit(size, self.expandable)
        if b is not None:
            pool.remove(b)
        else:
            b = self._new_block(pool, size)
        rest = b.size - size
        keep = rest >= MIN_BLOCK if (pool.small or self.expandable) else rest > SMALL_SIZE
        if keep:  # split: the rest stays cached
            r = _Block(b.addr + size, rest, b, b.next)
            if b.next is not None:
                b.next.prev = r
            elif self.expandable:
                pool.last = r
            b.next, b.size = r, size
            pool.add(r)
        b.free = False
        self._live[key] = (b, nbytes, pool)
        self.allocated += b.size
        self.requested += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_requested = max(self.peak_requested, self.requested)

    def free(self, key: Hashable) -> None:
        """Free ``key``'s block: it merges with free neighbours of its segment and is cached.
        An id that is not live is ignored (a storage allocated before the recording began)."""
        entry = self._live.pop(key, None)
        if entry is None or entry[0] is None:
            return
        b, nbytes, pool = entry
        self.allocated -= b.size
        self.requested -= nbytes
        for nb in (b.prev, b.next):
            if nb is not None and nb.free:
                pool.remove(nb)
                if nb is b.prev:
                    b.addr, b.prev = nb.addr, nb.prev
                    if nb.prev is not None:
                        nb.prev.next = b
                else:
                    b.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = b
                    elif pool.last is nb:
                        pool.last = b
                b.size += nb.size
        pool.add(b)

    def live(self) -> List[Hashable]:
        """The ids allocated and not freed."""
        return list(self._live)

    def reset_peaks(self) -> None:
        """Peaks := current values (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak_reserved, self.peak_allocated, self.peak_requested = self.reserved, self.allocated, self.requested

    def peaks(self) -> AllocatorPeaks:
        return AllocatorPeaks(self.peak_reserved, self.peak_allocated, self.peak_requested, self.segments)


def replay(events: Sequence[Event], existing: int = 0, repeat: int = 2,
           expandable_segments: bool = False) -> AllocatorPeaks:
    """Peaks of a training step's allocation sequence in the caching allocator, in steady state.

    ``events[:existing]`` are the allocations that exist before the step (parameters, optimizer
    state, the batch), replayed once; the rest is the step, replayed ``repeat`` times (the
    measured step follows warm-up steps that left their freed blocks cached: the allocator's
    reserve is a state, not a property of one step).  Between repetitions whatever the step left
    allocated is freed (each step starts from the same live set).  The peaks are those of the last
    repetition, the pre-existing bytes included, as ``max_memory_reserved`` / ``_allocated`` read
    after ``reset_peak_memory_stats`` before a warmed-up step.
    """
    if repeat < 1:
        raise UsageError(f"repeat {repeat}: replay the step at least once")
    m = CachingAllocatorModel(expandable_segments)
    pre = set()
    for key, n in events[:existing]:
        if n == FREE:
            m.free(key)
            pre.discard(key)
        else:
            m.malloc(key, n)
            pre.add(key)
    step = events[existing:]
    for r in range(repeat):
        if r == repeat - 1:
            m.reset_peaks()
        for key, n in step:
            if key in pre:  # a free of a pre-existing storage (happens once)
                if n == FREE:
                    m.free(key)
                    pre.discard(key)
                continue
            if n == FREE:
                m.free((r, key))
            else:
                m.malloc((r, key), n)
        if r < repeat - 1:
            for key in m.live():
                if isinstance(key, tuple) and len(key) == 2 and key[0] == r:
                    m.free(key)
    return m.peaks()


def replay_sizes(sizes: Iterable[int], expandable_segments: bool = False) -> AllocatorPeaks:
    """Peaks of a plain sequence of sizes: ``n >= 0`` allocates, ``-k`` frees the k-th allocation
    (1-based), e.g. ``[4096, 8192, -1, 4096]`` (hand-written sequences, tests)."""
    m = CachingAllocatorModel(expandable_segments)
    k = 0
    for n in sizes:
        if n >= 0:
            k += 1
            m.malloc(k, n)
        else:
            m.free(-n)
    return m.peaks()


# ------------------------------------------------------------------------------------------------
# Which allocator a CUDA run of lrcnn uses
# ------------------------------------------------------------------------------------------------

#: where PyTorch reads the caching allocator's settings, the first one set counts (torch >= 2.9
#: reads ``PYTORCH_ALLOC_CONF`` first; older versions only ``PYTORCH_CUDA_ALLOC_CONF``)
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
#: the setting lrcnn's CUDA runs use when the user gave none
LRCNN_ALLOC_CONF = "expandable_segments:True"


def allocator_settings(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The caching allocator settings given in the environment (``None``: none given)."""
    env = os.environ if env is None else env
    for var in ALLOC_CONF_VARS:
        if env.get(var):
            return env[var]
    return None


def expandable_segments(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether lrcnn's CUDA runs in this environment use expandable segments: yes when the
    settings say ``expandable_segments:True`` or when no settings are given (lrcnn's runs then set
    :data:`LRCNN_ALLOC_CONF`, :func:`prefer_expandable_segments`)."""
    conf = allocator_settings(env)
    if conf is None:
        return True
    opts = dict(part.split(":", 1) for part in conf.replace(" ", "").split(",") if ":" in part)
    return opts.get("expandable_segments", "").lower() == "true"


def prefer_expandable_segments() -> bool:
    """Run CUDA with expandable segments unless the user configured the allocator: sets
    ``PYTORCH_CUDA_ALLOC_CONF`` to :data:`LRCNN_ALLOC_CONF` when no settings are given and CUDA is
    not initialised yet in this process (PyTorch reads the settings when it initialises CUDA).
    Returns whether CUDA runs will use expandable segments (``False``: the settings given turn them
    off, or CUDA started before without them)."""
    import torch

    if allocator_settings() is None:
        if torch.cuda.is_initialized():
            return False
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = LRCNN_ALLOC_CONF
    return expandable_segments()
