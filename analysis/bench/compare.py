"""lrcnn against the alternatives, measured side by side in one run.

    planner bench                          # every case (CPU: tens of minutes)
    planner bench --case resnet50 --methods plain,checkpoint-blocks,lrcnn
    planner bench --case resnet18 --batch 2 --resolution 64 --out-dir /tmp/b
    planner bench --study                  # max batch / resolution under 8 GiB (simulated)
    planner bench ...                                # the same

For each case (model, batch, resolution, BatchNorm mode: ``train``, or ``frozen``: eval mode with
its affine parameters frozen, as fine-tuning on large inputs runs; the same for every method) every
method runs real training steps (cross-entropy, SGD with momentum) on the same model and batch:

* ``plain``: plain PyTorch;
* ``checkpoint-blocks``: ``torch.utils.checkpoint`` (non-reentrant) around every residual block
  (ResNet), inverted-residual block (MobileNetV2) or stage (VGG);
* ``checkpoint-sqrt``: ``checkpoint_sequential`` over stem, blocks and head with sqrt(n) segments;
* ``compile``: ``torch.compile`` (Inductor) with ``torch._functorch.config.activation_memory_budget``
  at ``--compile-budgets``; its time ratio is against compiled plain (budget 1.0).  On the CPU the
  storage tracker cannot see inside Inductor's kernels, so memory is measured on the same partition
  (same decompositions, same budget) executed op by op (backend ``aot_eager_decomp_partition``):
  an upper bound on Inductor's transients, flagged in the ``note`` column.  On CUDA the allocator
  sees the real compiled step.  Compiled methods draw dropout masks from eager's generator
  (:func:`compile_settings`);
* ``rockmate``: the PyPI package, if it imports and runs here; otherwise one row saying why;
* ``lightstream``: StreamingCNN (PyPI ``lightstream``, ``pip install -e '.[bench]'``) streaming the
  case's ResNet trunk (``conv1..layerK``) in square tiles (``--lightstream-tiles``, default 5/6 of
  the input), then the plain head and loss (:mod:`lrcnn.analysis.bench.lightstream_peer`); it trains
  frozen BN only, so on ``train`` cases its row says so instead;
* ``lrcnn``: plans from ``planner.solve`` at a sweep of budgets from the smallest feasible one up to
  the plain step's peak, plus one plan at each alternative's measured peak (same budget, so the
  Pareto comparison is direct); ``lrcnn-checkpoint``: the same with ``policy='checkpoint'``, so the
  gain from rows is visible on its own; ``lrcnn-compile``: the same sweep solved for compilation
  (``Solver(compiled=True)``: recomputing BN / ReLU / add in a store segment is fused into the
  backward, priced free) and executed through ``torch.compile``
  (:func:`lrcnn.executor.compiled.compile_plan`, Inductor, activation budget 1.0: the plan decides what is
  recomputed), timed in pairs with compiled plain, its time ratio against compiled plain and its
  memory measured as for ``compile``.

Per method: absolute peak memory of one step (parameters, gradients, optimizer state, batch,
activations, transients: CUDA allocator statistics on GPU, storage accounting on CPU), median step
time over ``--repeats`` steps after warm-up, both as ratios to plain, and ``max_rel_err``: the
largest norm-wise relative difference to plain PyTorch over the loss, every parameter gradient and
the BatchNorm running statistics after one step from the same state (``exact``: within 1e-5, the
float32 bar; checkpointing recomputes train-mode BN and so updates its running statistics twice).
In float32 a full-size step is not reproducible to 1e-5 even by PyTorch itself: plain PyTorch with
its vendor convolution library switched off (oneDNN / cuDNN) differs from plain PyTorch by up to
~1e-2 on the gradients of BN weights after sums that cancel.  Each case measures that spread per
tensor (``noise``; ``noise_floor`` its largest); in float32 a method is exact when every tensor is
within the bar or within ``NOISE_FACTOR`` times plain's own spread on that tensor (shown as
``<= spread``), and the maths is checked separately in float64 (``--dtype float64``: 1e-10).

Outputs in ``--out-dir`` (default ``bench/results``): ``compare-<device>.csv``, ``.png`` (memory vs
time, Pareto front per method) and ``.md`` (the table the README includes).  ``--study`` writes
``study-<device>.csv``/``.md``: the largest batch (ResNet-50 224x224) and the largest square input
(ResNet-50 batch 1) whose step fits ``--study-budget`` (8 GiB), for plain, both checkpoint methods
(simulated: the same step under FakeTensorMode) and lrcnn (the planner's prediction, then the plan
simulated by the executor under FakeTensorMode).
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch


from lrcnn.analysis.bench import ALL_CASES, CASES, METHODS
from lrcnn.analysis.bench import dense as dense_sim
from lrcnn.analysis.bench.cases import BenchError, Case, make_case, measure, Method
from lrcnn.analysis.bench import lightstream_peer
from lrcnn.analysis.bench.methods import (CheckpointBlocks, CheckpointSqrt, compile_methods, compile_settings,
                                          LrcnnPlans, rockmate_methods, split_blocks, sweep)
from lrcnn.analysis.bench.studies import size_study
from lrcnn.analysis.bench.tables import earlier_rows, machine_line, study_markdown, write_compare
from lrcnn.models import get_model
from lrcnn.models.zoo import model_task
from lrcnn.models.capture import trace
from lrcnn.planner.cost import check_profile
from lrcnn.planner.files import check_output_path, write_csv_atomic, write_text_atomic
from lrcnn.planner.units import parse_bytes


def run_case(case: Case, methods: Sequence[str], compile_budgets: Sequence[float], points: int,
             profile: str, warmup: int, repeats: int, progress: bool = True,
             on_row: Optional[Callable[[List[Dict]], None]] = None, paired: bool = True,
             lightstream_tiles: Optional[Sequence[int]] = None) -> List[Dict]:
    """Every method on one case; rows for the CSV (ratios to plain filled in).  ``on_row(rows)``
    is called after every method with the case's rows so far (a long run saves as it goes).
    ``paired``: time every eager method in pairs with plain steps (:func:`measure`).
    ``lightstream_tiles``: lightstream's tile sizes (default: :func:`lightstream_peer.default_tile`)."""
    from tqdm import tqdm

    rows: List[Dict] = []

    def record(m: Method, **res):
        rows.append(dict(case=case.name, model=case.model_name, batch=case.batch, resolution=case.resolution,
                         dtype=case.dtype, bn=case.bn, noise_floor=case.noise_floor,
                         method=m.method, setting=m.setting, budget_bytes=m.budget_bytes,
                         predicted_peak_bytes=m.predicted_peak_bytes, note=m.note, simulated=False, **res))

    def run(m: Method, bar):
        bar.set_postfix_str(f"{m.method} {m.setting}")
        if m.forward is None:
            record(m, peak_bytes=math.nan, step_bytes=math.nan, baseline_bytes=math.nan, step_s=math.nan,
                   paired_ratio=math.nan, pair_min=math.nan, pair_max=math.nan, max_rel_err=math.nan,
                   exact=False, mem_method="")
        else:
            pair = None
            if paired and m.method != "plain":
                pair = (compiled_plain if compiled_plain is not m.forward else None) if m.compiled else case.model
            record(m, **measure(case, m, warmup, repeats, pair=pair))
        bar.update(1)
        if on_row is not None:
            on_row(_ratios(rows))

    def run_guarded(m: Method, bar):
        try:
            run(m, bar)
        except Exception as e:  # e.g. Inductor without a C++ compiler, a peer's own bug: record why, go on
            m.note = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:200]
            m.forward = None
            run(m, bar)

    fixed = [Method("plain", "-", case.model)]  # always: the reference of every ratio
    if "checkpoint-blocks" in methods:
        fixed.append(Method("checkpoint-blocks", "non-reentrant", CheckpointBlocks(case.model)))
    if "checkpoint-sqrt" in methods:
        cs = CheckpointSqrt(case.model)
        fixed.append(Method("checkpoint-sqrt", f"{cs.segments} segments of {len(cs.seq)}", cs))
    plans = [LrcnnPlans(case, policy, profile) for policy, name in (("auto", "lrcnn"), ("checkpoint", "lrcnn-checkpoint"))
             if name in methods]
    compiled_plain = None  # the pair of compiled methods: torch.compile of the model at budget 1.0
    n_compile = len(set([1.0] + list(compile_budgets))) if "compile" in methods else 0
    with tqdm(total=len(fixed) + n_compile, desc=case.name, unit="method", disable=not progress,
              file=sys.stderr) as bar, compile_settings():
        for m in fixed:
            run(m, bar)
        if "compile" in methods:
            for m in compile_methods(case, compile_budgets):
                run_guarded(m, bar)
                if m.setting.endswith("=1") and m.forward is not None:  # the first: the others' pair
                    compiled_plain = m.forward
        alt_peaks = [r["peak_bytes"] for r in rows if r["method"] != "plain" and not math.isnan(r["peak_bytes"])]
        if "rockmate" in methods:
            rm = rockmate_methods(case, alt_peaks or [rows[0]["peak_bytes"]])
            bar.total += len(rm)
            for m in rm:
                run(m, bar)
        if "lightstream" in methods:
            ls = lightstream_peer.methods(case, lightstream_tiles)
            bar.total += len(ls)
            for m in ls:
                run_guarded(m, bar)
            alt_peaks += [r["peak_bytes"] for r in rows[-len(ls):] if not math.isnan(r["peak_bytes"])]
        if "lrcnn-compile" in methods:
            plans.append(LrcnnPlans(case, "auto", profile, compiled=True))
            if compiled_plain is None:  # compiled at its first call, under the first plan's setup (1.0)

                compiled_plain = torch.compile(trace(case.model))
        for pl in plans:
            budgets = sweep(pl.smallest(), max(pl.smallest(), rows[0]["peak_bytes"]), points)
            budgets = sorted(set(int(b) for b in budgets + alt_peaks if b >= pl.smallest()))
            bar.total += len(budgets)
            for b in budgets:
                (run_guarded if pl.compiled else run)(pl.method(b), bar)
    return _ratios(rows)


def _ratios(rows: List[Dict]) -> List[Dict]:
    """Fill ``mem_ratio``/``time_ratio`` against plain (compile, lrcnn-compile: against compiled
    plain; a method timed in pairs with plain steps: the median ratio of its pairs)."""
    plain = next(r for r in rows if r["method"] == "plain")
    cplain = next((r for r in rows if r["method"] == "compile" and r["setting"].endswith("=1")), None)
    for r in rows:
        base = cplain if (r["method"] in ("compile", "lrcnn-compile") and cplain) else plain
        r["mem_ratio"] = r["peak_bytes"] / plain["peak_bytes"]
        paired = r.get("paired_ratio", math.nan)
        if not math.isnan(paired):
            r["time_ratio"] = paired
        else:
            r["time_ratio"] = r["step_s"] / base["step_s"] if base["step_s"] else math.nan
    return rows


def bench(case: Optional[Sequence[str]] = None, model: Optional[str] = None, batch: Optional[int] = None,
          resolution: Optional[int] = None, methods: Sequence[str] = METHODS,
          compile_budgets: Sequence[float] = (0.5, 0.1), points: int = 4, warmup: int = 1, repeats: int = 5,
          unpaired: bool = False, dtype: str = "float32", device: str = "auto", profile: Optional[str] = None,
          out_dir: str = "bench/results", fresh: bool = False, study: Optional[str] = None,
          study_budget: str = "8GiB", progress: bool = True, bn: Optional[str] = None,
          lightstream_tiles: Optional[Sequence[int]] = None,
          sim_sizes: Sequence[int] = dense_sim.SIM_SIZES) -> str:
    """Run the benchmark (``planner bench``): the cases (``case`` names from :data:`ALL_CASES`,
    default the classification ones of :data:`CASES`, or a
    custom ``model`` at ``batch`` x ``resolution`` with BatchNorm ``bn``, default ``train``) with
    ``methods`` side by side, or with ``study`` (``"batch"``, ``"resolution"`` or ``"both"``) the
    max-batch / max-resolution study under ``study_budget``.  Writes ``compare-<device>.csv/.png/.md``
    (``study-<device>.csv/.md``) into ``out_dir`` and returns the markdown.  Dense (segmentation)
    cases write ``seg-<device>.csv/.png/.md`` (their real steps) and ``seg-sim-<device>.csv/.png/.md``
    (every method at batch 1 and each of ``sim_sizes``, simulated / predicted, with the time target
    at the first size: :mod:`lrcnn.analysis.bench.dense`; ``sim_sizes`` empty: none), and their study
    ``seg-study-<device>.csv/.md``.  Bad input raises
    :class:`BenchError` (or ``OSError``) with a one-line message."""
    import os

    import pandas as pd

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device here; use --device cpu")
    profile = profile or ("cpu" if dev.type == "cpu" else "h100")
    check_profile(profile)
    if not os.path.isdir(out_dir):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise BenchError(f"--out-dir {out_dir!r}: cannot create it ({e.strerror}); give a writable folder")
    tag = "cuda" if dev.type == "cuda" else "cpu"
    if study:
        if bn:
            raise BenchError("--bn sets a compared case's BatchNorm; the --study runs train-mode BN: drop --bn")
        budget = parse_bytes(study_budget)
        model_name = model or "resnet50"
        stem = "seg-study" if model_task(model_name) == "segmentation" else "study"
        csv, md = (os.path.join(out_dir, f"{stem}-{tag}.{e}") for e in ("csv", "md"))
        for path in (csv, md):
            check_output_path(path, "output")
        running = ["max batch", "max resolution"] if study == "both" else [f"max {study}"]
        kept = [] if fresh else earlier_rows(csv, running, key="study",
                                                  required=["study", "fixed", "method", "largest", "peak_bytes",
                                                            "x_best_alternative", "how"], what="study CSV")
        split_blocks(get_model(model_name, device="meta"))  # a model the alternatives can wrap: say so now
        rows = size_study(budget, profile, model_name=model_name, progress=progress, which=study,
                          step=_side_step(model_name))
        for r in rows:
            r["device"], r["budget_bytes"] = machine_line(dev), budget
        # a kept study under another budget is another study (rows without one predate the column)
        kept = [r for r in kept if math.isnan(r.get("budget_bytes", math.nan)) or int(r["budget_bytes"]) == budget]
        rows = kept + rows
        df = pd.DataFrame(rows)
        text = study_markdown(rows, budget, dev, model_name)
        write_csv_atomic(df, csv)
        write_text_atomic(text, md, "markdown")
        return text
    if model:
        if case:
            raise BenchError("give either --case or --model, not both")
        if not (batch and resolution):
            raise BenchError("--model needs --batch and --resolution")
        bn = bn or "train"
        cases = [(f"{model}-b{batch}-{resolution}" + ("" if bn == "train" else f"-{bn}-bn"), model, batch, resolution,
                  bn)]
    else:
        if batch or resolution or bn:
            raise BenchError("--batch/--resolution/--bn define a custom case: give --model too")
        cases = [(c, *ALL_CASES[c]) for c in (case or list(CASES))]
    for _, model_name, _, res, _ in cases:  # an unknown model or one without blocks: say so before any work
        split_blocks(get_model(model_name, device="meta"))
        if res % _side_step(model_name, 1):
            raise BenchError(f"--resolution {res}: {model_name} takes sides that are multiples of "
                             f"{_side_step(model_name, 1)}")
    text = ""
    for stem in ("compare", "seg"):  # classification cases, then dense ones: each family its own files
        group = [c for c in cases if (model_task(c[1]) == "segmentation") == (stem == "seg")]
        if group:
            text = _run_cases(group, stem, tag, dev, dtype, methods, compile_budgets, points, profile, warmup,
                              repeats, unpaired, progress, lightstream_tiles, out_dir, fresh, sim_sizes)
    return text


def _side_step(model_name: str, default: int = 32) -> int:
    """The step of the input sides of ``model_name`` (a U-Net's are multiples of 2**levels), else
    ``default`` (the size study's step)."""
    from lrcnn.models.zoo import UNet

    m = get_model(model_name, device="meta")
    return 2 ** len(m.down) if isinstance(m, UNet) else default


def _run_cases(cases, stem: str, tag: str, dev, dtype, methods, compile_budgets, points, profile, warmup,
               repeats, unpaired, progress, lightstream_tiles, out_dir, fresh, sim_sizes) -> str:
    """Run ``cases`` into ``<stem>-<tag>.csv/.png/.md`` (rows of other cases kept unless ``fresh``);
    dense cases also into ``seg-sim-<tag>.*`` at ``sim_sizes``."""
    import os

    csv, png, md = (os.path.join(out_dir, f"{stem}-{tag}.{e}") for e in ("csv", "png", "md"))
    sim_files = [os.path.join(out_dir, f"seg-sim-{tag}.{e}") for e in ("csv", "png", "md")]
    for path in (csv, png, md, *(sim_files if stem == "seg" and sim_sizes else [])):
        check_output_path(path, "output")
    earlier = [] if fresh else earlier_rows(csv, [])
    names = [c[0] for c in cases]
    kept = [r for r in earlier if r["case"] not in names]
    # a case run again keeps its place in the table; new cases go after the file's
    order = list(dict.fromkeys([r["case"] for r in earlier] + names))

    def in_order(rs: List[Dict]) -> List[Dict]:
        return sorted(rs, key=lambda r: order.index(r["case"]))

    rows: List[Dict] = list(kept)
    for name, model_name, n, res, case_bn in cases:
        one = make_case(name, model_name, n, res, dev, dtype, bn=case_bn)
        done = list(rows)
        rows += run_case(one, methods, compile_budgets, points, profile, warmup, repeats,
                         paired=not unpaired, progress=not (not progress), lightstream_tiles=lightstream_tiles,  # files rewritten after every method: a long run keeps what it measured
                         on_row=lambda case_rows: write_compare(in_order(done + case_rows), dev, csv, png, md))
        case_rows = [r for r in rows if r["case"] == name]
        del one
        text = write_compare(in_order(rows), dev, csv, png, md)
        if stem == "seg" and sim_sizes:
            text += "\n" + _simulate_case(name, model_name, case_rows, sim_sizes, profile, dev, points, progress,
                                          fresh, *sim_files)
    return text


SIM_REQUIRED = ("case", "model", "resolution", "method", "setting", "peak_bytes", "peak_how", "time_s", "time_how")


def _simulate_case(name, model_name, measured, sizes, profile, dev, points, progress, fresh, csv, png, md) -> str:
    """The dense case's model at ``sizes`` (:func:`lrcnn.analysis.bench.dense.simulated_rows`) and its
    time target at the first size, into ``seg-sim-<device>.*`` (other cases' rows kept)."""
    kept = [] if fresh else earlier_rows(csv, [name], required=list(SIM_REQUIRED), what="seg-sim CSV")
    rows = dense_sim.simulated_rows(name, model_name, sizes, profile, measured, points=max(points, 6),
                                    progress=progress)
    plain = next(r for r in rows if r["method"] == "plain" and r["resolution"] == sizes[0])
    target = dense_sim.time_target(model_name, sizes[0], profile, plain["peak_bytes"])
    target["case"] = name
    for r in rows:
        r["device"] = machine_line(dev)
        r.update({f"target_{k}": v for k, v in target.items()} if r is plain else {})
    return dense_sim.write_sim(kept + rows, dev, csv, png, md)
