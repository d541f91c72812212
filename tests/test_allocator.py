"""The CUDA caching allocator model (``models.allocator``, issue 26): hand-written sequences whose
answers follow from PyTorch's rules, the recorded allocation sequence of a real training step, the
planner keeping a GPU budget in reserved bytes, and the measured reserved peak on CUDA (skipped
without a GPU)."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from lrcnn.errors import UsageError
from lrcnn.models.allocator import (CachingAllocatorModel, expandable_segments, FREE, replay, replay_sizes,
                                    round_size, segment_size)
from lrcnn.planner.cost import ALLOCATOR_RESERVE, ALLOCATOR_RESERVE_BYTES, PROFILES

KiB, MiB = 2**10, 2**20


# ------------------------------------------------------------------------------------------------
# The rules, on sequences with known answers
# ------------------------------------------------------------------------------------------------

def test_sizes_round_to_512_and_segments_by_pool():
    assert [round_size(n) for n in (1, 511, 512, 513, 1000)] == [512, 512, 512, 1024, 1024]
    assert segment_size(512) == segment_size(MiB) == 2 * MiB          # small pool: 2 MiB segments
    assert segment_size(MiB + 512) == segment_size(10 * MiB - 512) == 20 * MiB  # large under 10 MiB: 20 MiB
    assert segment_size(10 * MiB) == 10 * MiB and segment_size(30 * MiB + 512) == 32 * MiB  # else 2 MiB multiples


@pytest.mark.parametrize("sizes,reserved,allocated", [
    ([1000] * 100, 2 * MiB, 100 * KiB),                 # small blocks pack into one 2 MiB segment
    ([1000] * 2048, 2 * MiB, 2 * MiB),                  # ... exactly full
    ([1000] * 2049, 4 * MiB, 2 * MiB + KiB),            # ... one more: a second segment
    ([5 * MiB], 20 * MiB, 5 * MiB),                     # a 5 MiB block takes a 20 MiB segment
    ([5 * MiB] * 4, 20 * MiB, 20 * MiB),                # ... whose rest serves three more
    ([5 * MiB] * 5, 40 * MiB, 25 * MiB),
    ([30 * MiB + 1], 32 * MiB, 30 * MiB + 512),         # >= 10 MiB: its own segment, 2 MiB multiple
    ([int(19.5 * MiB)], 20 * MiB, 20 * MiB),            # a rest of 1 MiB or less is not split off ...
    ([int(9.5 * MiB)], 20 * MiB, int(9.5 * MiB)),       # ... a larger one is
    ([30 * MiB, -1, 30 * MiB], 30 * MiB, 30 * MiB),     # reuse after free
    ([12 * MiB, 40 * MiB, -1, -2, 11 * MiB, 39 * MiB], 52 * MiB, 52 * MiB),  # best fit: 11 in 12, 39 in 40
    ([5 * MiB] * 3 + [-2, 6 * MiB], 40 * MiB, 16 * MiB),  # fragmentation: the freed middle block is too small
    ([5 * MiB] * 3 + [-1, -2, -3, 18 * MiB], 20 * MiB, 18 * MiB),  # frees merge within their segment ...
    ([12 * MiB, 12 * MiB, -1, -2, 20 * MiB], 44 * MiB, 24 * MiB),  # ... never across segments
    ([MiB, -1, MiB + 512], 22 * MiB, MiB + 512),        # a small-pool block never serves a large request
    ([0, 0, 1000], 2 * MiB, KiB),                       # 0 bytes: no block
])
def test_default_allocator_rules(sizes, reserved, allocated):
    p = replay_sizes(sizes)
    assert (p.reserved, p.allocated) == (reserved, allocated)
    assert p.requested == max(_live_sums(sizes))


def _live_sums(sizes):
    live, out, n = {}, [0], 0
    for s in sizes:
        if s >= 0:
            n += 1
            live[n] = s
        else:
            live.pop(-s)
        out.append(sum(live.values()))
    return out


@pytest.mark.parametrize("sizes,reserved", [
    ([30 * MiB + 1], 40 * MiB),                         # the large pool maps 20 MiB pages ...
    ([1000] * 3000, 4 * MiB),                           # ... the small pool 2 MiB pages
    ([5 * MiB] * 3 + [-2, 6 * MiB], 40 * MiB),          # the free tail (5 MiB) grows by a page
    ([12 * MiB, 12 * MiB, -1, -2, 20 * MiB], 40 * MiB), # one segment: frees merge across the whole of it
    ([8 * MiB, 25 * MiB, -1, 6 * MiB, int(7.5 * MiB)], 60 * MiB),  # a hole is used before a (smaller) free tail
])
def test_expandable_segments(sizes, reserved):
    assert replay_sizes(sizes, expandable_segments=True).reserved == reserved


def test_model_bookkeeping():
    m = CachingAllocatorModel()
    m.malloc("a", 3 * MiB)
    with pytest.raises(UsageError, match="already live"):
        m.malloc("a", 1)
    m.free("a")
    m.free("never allocated")  # (a storage older than the recording): ignored
    assert (m.reserved, m.allocated, m.requested, m.peak_allocated) == (20 * MiB, 0, 0, 3 * MiB)
    m.reset_peaks()
    assert m.peaks().allocated == 0 and m.peaks().reserved == 20 * MiB


def test_replay_steady_state_and_existing_prefix():
    # existing: one 12 MiB tensor; the step allocates 5 MiB, frees it, allocates 6 MiB and keeps it
    events = [(0, 12 * MiB), (1, 5 * MiB), (1, FREE), (2, 6 * MiB)]
    once = replay(events, existing=1, repeat=1)
    assert (once.reserved, once.requested) == (12 * MiB + 20 * MiB, 18 * MiB)
    twice = replay(events, existing=1, repeat=2)  # step 1's 6 MiB is freed before step 2: cached blocks reused
    assert (twice.reserved, twice.requested) == (32 * MiB, 18 * MiB)
    with pytest.raises(UsageError, match="repeat"):
        replay(events, repeat=0)


def test_expandable_segments_setting():
    assert expandable_segments({})  # nothing configured: lrcnn's runs set them
    assert expandable_segments({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert expandable_segments({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64, expandable_segments:true"})
    assert not expandable_segments({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    assert not expandable_segments({"PYTORCH_ALLOC_CONF": "expandable_segments:False",
                                    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})  # the first one counts


def test_prefer_expandable_segments_respects_the_users_settings(monkeypatch):
    import os

    from lrcnn.models.allocator import prefer_expandable_segments

    for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    if not torch.cuda.is_initialized():  # nothing configured, CUDA not started: lrcnn's choice
        assert prefer_expandable_segments() and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")  # the user's: left alone
    assert not prefer_expandable_segments() and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


# ------------------------------------------------------------------------------------------------
# A real step's recorded allocations
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_plan():
    """A row plan of tiny_resnet solved for the h100 profile (budget in reserved bytes): few
    strips, so that a step under the tracker stays fast."""
    from lrcnn.planner.solve import Solver, capture_model

    _, g = capture_model("tiny_resnet", (2, 3, 64, 64), bn="eval")
    s = Solver(g, "tiny_resnet", bn="eval", device_profile="h100", min_row_height=4)
    lo, hi = s.smallest_budget(), s.budget_for(s.baseline()["peak"])
    return s, s.solve(lo + (hi - lo) * 3 // 10)


def test_recorded_step_replays_to_its_own_peak(tiny_plan):
    """The tracker records a real CPU training step of a plan; replayed through the model, the
    requested peak is the step's measured absolute peak, and allocator rounding and caching only
    add to it."""
    from lrcnn.executor import apply_plan
    from lrcnn.executor.measure import train_step_memory
    from lrcnn.planner.plan import plan_model

    _, plan = tiny_plan
    assert any(seg.mode == "rows" for seg in plan.segments)
    torch.manual_seed(0)
    m, g = plan_model(plan, real=True)
    rep = train_step_memory(apply_plan(m, plan, g), plan.input_shape, "momentum", fake=False, reserved=True)
    assert rep.reserved_method == "model" and rep.reserved_bytes == rep.modeled_reserved_bytes
    n_alloc = sum(1 for _, n in rep.events if n != FREE)
    assert rep.existing_events > 0 and n_alloc > rep.existing_events and any(n == FREE for _, n in rep.events)
    for exp in (False, True):
        p = replay(rep.events, rep.existing_events, expandable_segments=exp)
        assert p.requested == rep.absolute_peak
        assert p.requested <= p.allocated <= p.reserved and p.reserved % (2 * MiB) == 0
    assert rep.reserved_bytes == replay(rep.events, rep.existing_events,
                                        expandable_segments=expandable_segments()).reserved


# ------------------------------------------------------------------------------------------------
# The planner keeps a GPU budget in reserved bytes
# ------------------------------------------------------------------------------------------------

def test_gpu_profile_budget_is_reserved_bytes(tiny_plan):
    s, plan = tiny_plan
    prof = PROFILES["h100"]
    peak = plan.predicted["peak_bytes"]
    assert plan.predicted["reserved_bytes"] == prof.reserved_for(peak) == \
        int(-(-peak * (1 + ALLOCATOR_RESERVE) // 1)) + ALLOCATOR_RESERVE_BYTES
    assert plan.predicted["reserved_bytes"] <= plan.budget_bytes * (1 - s.headroom)
    b = s.smallest_budget()
    assert s.peak_room(b) >= s.min_peak() > s.peak_room(b - 1)  # budget_for inverts peak_room
    for a in (0, 1, 10**6, 10**9 + 7):
        assert prof.reserved_for(prof.allocatable(prof.reserved_for(a))) <= prof.reserved_for(a)
        assert prof.allocatable(prof.reserved_for(a)) >= a
    cpu = PROFILES["cpu"]
    assert cpu.reserved_for(12345) == 12345 == cpu.allocatable(12345)  # a CPU budget: allocated bytes
    assert prof.usable_memory == prof.memory - 2**30  # a budget leaves the CUDA context free


def test_run_records_reserved_and_fails_a_budget_it_exceeds(tiny_plan):
    """planner run on the CPU: the step's reserved peak, modeled, in the records; a plan whose
    budget is reserved bytes fails when the modeled reserved peak exceeds it (the budget is moved
    between the run's allocated and reserved peaks: the same real records, judged again)."""
    from lrcnn.executor.run import budget_failures, run_plan

    _, plan = tiny_plan
    res = run_plan(copy.deepcopy(plan), steps=1, warmup=1, device="cpu", progress=False)
    assert not res.failures, res.failures
    step = res.records[res.records.scope == "step"].iloc[0]
    assert step.reserved_method == "model" and step.budget_in == "reserved"
    assert step.actual_peak_bytes <= step.actual_reserved_bytes == step.modeled_reserved_bytes
    tight = copy.deepcopy(plan)
    tight.budget_bytes = int(step.actual_reserved_bytes) - 1
    msg = budget_failures(res.records, tight, "cpu")
    assert len(msg) == 1 and "modeled" in msg[0] and "reserved peak" in msg[0]
    tight.solver["device_profile"] = "cpu"  # a CPU budget is allocated bytes: the reserve does not count
    assert budget_failures(res.records, tight, "cpu") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_measures_reserved_beside_the_model(tiny_plan):
    """On CUDA: max_memory_reserved measured around a real step, the model's figure from the same
    step's storages beside it, and the plan within its budget in reserved bytes."""
    from lrcnn.executor.run import run_plan

    _, plan = tiny_plan
    res = run_plan(copy.deepcopy(plan), steps=1, warmup=1, device="cuda", progress=False)
    step = res.records[res.records.scope == "step"].iloc[0]
    assert step.reserved_method == "cuda" and step.alloc_conf
    assert step.actual_peak_bytes <= step.actual_reserved_bytes
    assert step.modeled_reserved_bytes > 0 and not pd.isna(step.modeled_reserved_bytes)
    assert not res.failures, res.failures
