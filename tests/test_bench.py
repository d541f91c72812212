"""``planner bench`` / ``planner bench``: the alternatives are the real thing, the
exactness column is right (checkpointing updates train-mode BN twice; lrcnn does not), outputs
load in pandas, and bad input is one line with exit 2 and no file."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from lrcnn.analysis.bench import lightstream_peer
from lrcnn.analysis.bench.methods import CheckpointBlocks, CheckpointSqrt, split_blocks
from lrcnn.analysis.bench.cases import is_exact, make_case, max_rel_err, rel_errs
from lrcnn.models import get_model
from lrcnn.planner.cli import main
from tests.test_cli import assert_one_line_error


def run(capfd, *argv):
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_blocks_compute_the_model(name):
    """stem -> blocks -> head is the model's own forward, and both checkpoint wrappers compute it."""
    torch.manual_seed(0)
    m = get_model(name).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    stem, blocks, head = split_blocks(m)
    h = stem(x)
    for b in blocks:
        h = b(h)
    ref = m(x)
    assert torch.equal(head(h), ref)
    for wrap in (CheckpointBlocks, CheckpointSqrt):
        assert torch.equal(wrap(m)(x), ref)


def test_vgg_stages():
    m = get_model("vgg16", device="meta")
    stem, blocks, head = split_blocks(m)
    assert len(stem) == 0 and len(blocks) == 5
    assert all(isinstance(b[-1], torch.nn.MaxPool2d) for b in blocks)
    assert sum(len(b) for b in blocks) == len(m.features)


def test_checkpoint_updates_train_bn_twice():
    """The finding the exactness column reports: recomputation runs train-mode BN again, so its
    running statistics move twice per step (gradients stay exact)."""
    case = make_case("t", "resnet18", 2, 32, torch.device("cpu"), "float64")
    assert max_rel_err(case, case.model) == 0.0
    err = max_rel_err(case, CheckpointBlocks(case.model))
    assert err > 1e-3


def test_compiled_methods_small_case(tmp_path, capfd):
    """torch.compile and lrcnn-compile (lrcnn plans solved for compilation, through ``compile_plan``,
    Inductor) at CI size in float64: the compiled plans are exact to 1e-10, timed in pairs with compiled plain,
    their memory measured on the same partition run op by op."""
    rc, out, err = run(capfd, "bench", "--model", "resnet18", "--batch", 2, "--resolution", 64,
                       "--dtype", "float64", "--methods", "plain,compile,lrcnn-compile", "--compile-budgets", 1,
                       "--points", 1, "--repeats", 2, "--out-dir", tmp_path, "--no-progress")
    assert rc == 0, err
    df = pd.read_csv(tmp_path / "compare-cpu.csv")
    assert set(df.method) == {"plain", "compile", "lrcnn-compile"}
    lc = df[df.method == "lrcnn-compile"]
    assert len(lc) >= 1 and lc.peak_bytes.notna().all(), lc.note.tolist()
    assert (lc.max_rel_err <= 1e-10).all() and lc.exact.all()
    assert lc.paired_ratio.notna().all() and (lc.time_ratio == lc.paired_ratio).all()
    assert lc.note.str.contains("same partition run op by op").all()
    assert (lc.mem_method == "storage").all() and (lc.peak_bytes > 0).all()
    cp = df[df.method == "compile"].iloc[0]
    assert cp.time_ratio == 1 and cp.max_rel_err <= 1e-10
    assert "| lrcnn-compile |" in (tmp_path / "compare-cpu.md").read_text()


def test_lightstream_streams_frozen_bn_exactly():
    """lightstream (optional: the bench extra) streams a ResNet trunk with frozen BN tile by tile and
    trains the case's own model: tiny_resnet at 136x136 in 128-pixel tiles (2x2 tiles forward, 2x2
    backward, overlapping by the trunk's gradient border) matches plain PyTorch in float64 to 1e-10
    (its maths is exact; only the summation order of the per-tile weight gradients differs, ~1e-15).
    Tiles without a valid gradient row are refused before they run; a train-BN case gets the reason."""
    pytest.importorskip("lightstream.core.constructor")
    case = make_case("t", "tiny_resnet", 1, 136, torch.device("cpu"), "float64", bn="frozen")
    ls, small = lightstream_peer.methods(case, [128, 104])
    assert ls.forward is not None and ls.note.startswith("2x2 tiles forward, 2x2 backward"), ls.note
    errs = rel_errs(case, ls.forward)
    assert max(errs.values()) <= 1e-10 and is_exact(case, errs)
    bns = [m for m in case.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(p.requires_grad for m in bns for p in m.parameters())  # frozen BN
    assert small.forward is None and "divides by zero" in small.note
    (train,) = lightstream_peer.methods(make_case("t", "tiny_resnet", 1, 32, torch.device("cpu"), "float64"))
    assert train.forward is None and "frozen" in train.note


def test_float32_spread_of_plain_pytorch():
    """float32: plain PyTorch against itself with oneDNN off is the spread a method may show and
    still be exact; a real difference (checkpoint's second BN update) stays far above it."""
    case = make_case("t", "resnet18", 2, 32, torch.device("cpu"), "float32")
    assert case.noise_floor > 1e-5  # layer4 BN sees 2 values per channel: rounding-dominated
    assert is_exact(case, rel_errs(case, case.model)) and is_exact(case, case.noise)
    ck = rel_errs(case, CheckpointBlocks(case.model))
    assert not is_exact(case, ck)  # running statistics updated twice: plain reproduces those
    assert max(v for k, v in ck.items() if k.endswith("running_mean")) > 1e-3
    assert make_case("t", "resnet18", 2, 32, torch.device("cpu"), "float64").noise == {}


def test_compare_small_case(tmp_path, capfd):
    """A whole run at CI size in float64: every requested method measured, lrcnn exact to 1e-10
    at a lower peak than plain, files written."""
    rc, out, err = run(capfd, "bench", "--model", "resnet18", "--batch", 2, "--resolution", 64,
                       "--dtype", "float64", "--methods", "plain,checkpoint-blocks,checkpoint-sqrt,rockmate,lightstream,"
                       "lrcnn,lrcnn-checkpoint", "--points", 2, "--repeats", 1, "--out-dir", tmp_path, "--no-progress")
    assert rc == 0, err
    df = pd.read_csv(tmp_path / "compare-cpu.csv")
    assert set(df.method) == {"plain", "checkpoint-blocks", "checkpoint-sqrt", "rockmate", "lightstream", "lrcnn",
                              "lrcnn-checkpoint"}
    ran = df[df.peak_bytes.notna()]
    assert (ran.step_s > 0).all() and (ran.mem_method == "storage").all()
    plain = ran[ran.method == "plain"].iloc[0]
    assert plain.max_rel_err == 0 and plain.mem_ratio == 1
    lr = ran[ran.method.str.startswith("lrcnn")]
    assert len(lr) >= 2
    assert (lr.max_rel_err <= 1e-10).all() and lr.exact.all()
    assert lr.peak_bytes.min() < plain.peak_bytes
    # the step's own bytes (the original LR-CNN measure) on top of the same fixed state
    assert (ran.baseline_bytes + ran.step_bytes == ran.peak_bytes).all()
    assert (ran.baseline_bytes == plain.baseline_bytes).all() and lr.step_bytes.min() < plain.step_bytes
    # the plan's promise holds: measured within 2% of the cost model, never far above
    rel = (lr.peak_bytes - lr.predicted_peak_bytes) / lr.predicted_peak_bytes
    assert (rel.abs() < 0.03).all(), rel
    ck = ran[ran.method == "checkpoint-blocks"].iloc[0]
    assert not ck.exact
    rm = df[df.method == "rockmate"].iloc[0]
    assert math.isnan(rm.peak_bytes) and isinstance(rm.note, str) and rm.note
    ls = df[df.method == "lightstream"].iloc[0]  # (not installed by the test extra; or cannot run here)
    assert math.isnan(ls.peak_bytes) and isinstance(ls.note, str) and "lightstream" in ls.note
    assert (tmp_path / "compare-cpu.png").stat().st_size > 1000
    md = (tmp_path / "compare-cpu.md").read_text()
    assert "| lrcnn |" in md and "torch" in md and "| step peak |" in md
    assert "| lrcnn |" in out
    # eager methods are timed in pairs with plain steps: their time ratio is the pairs' median
    others = ran[ran.method != "plain"]
    assert (others.paired_ratio > 0).all() and (others.time_ratio == others.paired_ratio).all()
    assert math.isnan(plain.paired_ratio) and plain.time_ratio == 1


@pytest.mark.parametrize("argv,needles", [
    (["--case", "nope"], ["--case", "nope"]),
    (["--model", "resnet18"], ["--batch"]),
    (["--batch", "2"], ["--model"]),
    (["--bn", "frozen"], ["--model"]),
    (["--study", "batch", "--bn", "frozen"], ["--bn", "--study"]),
    (["--lightstream-tiles", "1024,0"], ["--lightstream-tiles", "positive"]),
    (["--model", "alexnet", "--batch", "1", "--resolution", "64"], ["AlexNet", "ResNet"]),
    (["--model", "nosuchnet", "--batch", "1", "--resolution", "64"], ["nosuchnet"]),
    (["--methods", "plain,foo"], ["foo"]),
    (["--compile-budgets", "2"], ["[0, 1]"]),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--points", "0"], ["cuda"]
     if not torch.cuda.is_available() else ["positive"]),
    (["--profile", "nosuchgpu"], ["nosuchgpu"]),
])
def test_bad_input(tmp_path, capfd, argv, needles):
    rc, out, err = run(capfd, "bench", *argv, "--out-dir", tmp_path / "o", "--no-progress")
    assert_one_line_error(rc, out, err, *needles)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_out_dir_is_a_file(tmp_path, capfd):
    f = tmp_path / "f"
    f.write_text("x")
    rc, out, err = run(capfd, "bench", "--model", "resnet18", "--batch", 1, "--resolution", 32,
                       "--out-dir", f / "sub", "--no-progress")
    assert_one_line_error(rc, out, err, "--out-dir")


def test_cases_run_one_at_a_time_build_one_table(tmp_path, capfd):
    """A later run keeps the rows of the cases it does not run (with their own machine/date line)
    and replaces those it runs; --fresh starts anew; a file that is not a compare CSV is an error."""
    csv = tmp_path / "compare-cpu.csv"
    argv = ["--methods", "plain", "--repeats", 1, "--out-dir", tmp_path, "--no-progress"]
    rc, _, err = run(capfd, "bench", "--model", "resnet18", "--batch", 2, "--resolution", 32, *argv)
    assert rc == 0, err
    first = pd.read_csv(csv)
    first.loc[:, "device"] = "an older machine; 2026-01-01"
    first.to_csv(csv, index=False)
    rc, _, err = run(capfd, "bench", "--model", "resnet18", "--batch", 4, "--resolution", 32, *argv)
    assert rc == 0, err
    df = pd.read_csv(csv)
    assert list(df.case) == ["resnet18-b2-32", "resnet18-b4-32"]
    assert df.device.iloc[0] == "an older machine; 2026-01-01" and "torch" in df.device.iloc[1]
    md = (tmp_path / "compare-cpu.md").read_text()
    assert "**resnet18-b2-32**" in md and "measured on an older machine" in md and "**resnet18-b4-32**" in md
    rc, _, err = run(capfd, "bench", "--model", "resnet18", "--batch", 4, "--resolution", 32, *argv)
    assert rc == 0 and list(pd.read_csv(csv).case) == ["resnet18-b2-32", "resnet18-b4-32"]  # replaced, not added
    rc, _, err = run(capfd, "bench", "--model", "resnet18", "--batch", 2, "--resolution", 32, *argv)
    df = pd.read_csv(csv)  # the first case run again keeps its place (with this run's machine line)
    assert rc == 0 and list(df.case) == ["resnet18-b2-32", "resnet18-b4-32"]
    assert "torch" in df.device.iloc[0]
    rc, _, err = run(capfd, "bench", "--model", "resnet18", "--batch", 4, "--resolution", 32, "--fresh", *argv)
    assert rc == 0 and list(pd.read_csv(csv).case) == ["resnet18-b4-32"]
    csv.write_text("a,b\n1,2\n")
    rc, out, err = run(capfd, "bench", "--model", "resnet18", "--batch", 4, "--resolution", 32, *argv)
    assert_one_line_error(rc, out, err, "compare CSV", "--fresh")
    assert csv.read_text() == "a,b\n1,2\n"


def test_study_max_resolution_small_budget(tmp_path, capfd):
    """The max-resolution study at a small budget on ResNet-18 (simulated, no memory used): every
    method's answer fits and the next size does not; lrcnn's plan at its answer is simulated within
    the budget and reaches at least the best alternative's size.  Run alone, it keeps the other
    study's rows of the existing study CSV."""
    from lrcnn.analysis.bench.methods import CheckpointBlocks
    from lrcnn.analysis.bench.studies import simulated_peak

    earlier = pd.DataFrame([dict(study="max batch", fixed="224x224", method="plain", largest=7, peak_bytes=1.0,
                                 x_best_alternative=1.0, how="simulated", device="elsewhere; 2026-01-01"),
                            # the same study under another budget: another study, not kept
                            dict(study="max batch", fixed="224x224", method="lrcnn", largest=9, peak_bytes=1.0,
                                 x_best_alternative=1.0, how="simulated", device="elsewhere; 2026-01-01",
                                 budget_bytes=2**30)])
    earlier.to_csv(tmp_path / "study-cpu.csv", index=False)
    # just above ResNet-18's parameters, gradients and momentum (134 MiB): small images, so the
    # dozen captures and solves of the search stay cheap (at 200 MiB it took 4 minutes)
    budget = 139 * 2**20
    rc, out, err = run(capfd, "bench", "--study", "resolution", "--model", "resnet18", "--study-budget", "139MiB",
                       "--out-dir", tmp_path, "--no-progress")
    assert rc == 0, err
    df = pd.read_csv(tmp_path / "study-cpu.csv")
    kept = df[df.study == "max batch"]
    assert len(kept) == 1 and kept.iloc[0].largest == 7 and kept.iloc[0].device == "elsewhere; 2026-01-01"
    rows = {r["method"]: r for r in df[df.study == "max resolution"].to_dict("records")}
    assert set(rows) == {"plain", "checkpoint-blocks", "checkpoint-sqrt", "lrcnn"}
    for name, wrapper in (("plain", None), ("checkpoint-blocks", CheckpointBlocks)):
        side = rows[name]["largest"]
        assert side >= 64 and rows[name]["peak_bytes"] <= budget
        assert simulated_peak("resnet18", wrapper, (1, 3, side + 32, side + 32)) > budget
    lr = rows["lrcnn"]
    best = max(r["largest"] for n, r in rows.items() if n != "lrcnn")
    assert lr["largest"] >= best and lr["peak_bytes"] <= budget
    assert lr["x_best_alternative"] == lr["largest"] / best
    md = (tmp_path / "study-cpu.md").read_text()
    assert "resnet18" in md and "max batch: elsewhere; 2026-01-01" in md


def test_pareto_targets_count_beaten_and_matched_alternatives():
    """The targets table: an alternative is beaten when an exact lrcnn row has no more peak and no
    more time ratio; one that is not, but whose time ratio an exact lrcnn row's lowest paired
    ratio reaches at no more peak, is counted apart (within noise); inexact rows count for nothing."""
    from lrcnn.analysis.bench.tables import markdown, targets

    def row(method, setting, peak, ratio, pair_min=math.nan, exact=True):
        return dict(case="c", model="m", batch=1, resolution=8, dtype="float32", noise_floor=0.0,
                    method=method, setting=setting, peak_bytes=peak, step_bytes=peak / 2, mem_ratio=peak / 100,
                    step_s=ratio, time_ratio=ratio, paired_ratio=ratio, pair_min=pair_min, pair_max=ratio,
                    max_rel_err=0.0, exact=exact, note="", mem_method="storage", budget_bytes=math.nan,
                    predicted_peak_bytes=math.nan, simulated=False)

    df = pd.DataFrame([row("plain", "-", 100, 1.0), row("compile", "b=1", 90, 1.0), row("compile", "b=0.5", 60, 1.2),
                       row("checkpoint-blocks", "-", 50, 1.3),
                       row("lrcnn", "a", 80, 1.03, pair_min=0.95), row("lrcnn-compile", "b", 55, 1.1, pair_min=1.0),
                       row("lrcnn", "x", 10, 0.5, exact=False)])
    (t,) = targets(df)
    assert t["pareto"] == "1/3" and t["pareto_ties"] == 1  # b=0.5 beaten, b=1 matched, checkpoint neither
    assert t["lrcnn_min_bytes"] == 55
    assert "| 1/3 (+1) |" in markdown(df, [t], torch.device("cpu"))


# ---- dense (segmentation) cases: a per-pixel target, the U-Net's blocks, the study and the simulation

def test_dense_case_and_unet_blocks_exact():
    """A dense case carries a mask of class indices per pixel and is trained with the per-pixel
    cross-entropy; checkpointing the zoo U-Net per block (its levels, skips passed along) and
    checkpoint_sequential over them compute exactly plain PyTorch's loss and gradients in float64
    (frozen BN: everything exact; train BN: the recomputation moves the running statistics twice,
    as for ResNet)."""
    from lrcnn.analysis.bench.cases import Method, measure

    case = make_case("t", "tiny_unet", 1, 32, torch.device("cpu"), "float64", bn="frozen")
    assert case.dense and case.logits_shape == (1, 3, 32, 32) and tuple(case.y.shape) == (1, 32, 32)
    assert case.y.dtype == torch.long and 0 <= int(case.y.min()) and int(case.y.max()) < 3
    stem, blocks, head = split_blocks(case.model)
    assert len(blocks) == 1 + 2 * len(case.model.down)  # first level, each level down and up
    for wrap in (CheckpointBlocks, CheckpointSqrt):
        assert max_rel_err(case, wrap(case.model)) <= 1e-10
    train = make_case("t", "tiny_unet", 1, 32, torch.device("cpu"), "float64")
    errs = rel_errs(train, CheckpointBlocks(train.model))
    assert max(v for k, v in errs.items() if k == "loss" or k.startswith("grad:")) <= 1e-10
    assert max(v for k, v in errs.items() if k.endswith("running_mean")) > 1e-3
    r = measure(case, Method("checkpoint-blocks", "-", CheckpointBlocks(case.model)), repeats=1)
    assert r["exact"] and r["peak_bytes"] > r["baseline_bytes"] > 0 and r["mem_method"] == "storage"


def test_dense_blocks_refused_for_unknown_dense_model():
    from lrcnn.analysis.bench.cases import BenchError

    with pytest.raises(BenchError, match="no block structure known for TinyFCN.*UNet"):
        split_blocks(get_model("tiny_fcn"))


def test_fcn_blocks_compute_the_model():
    """torchvision's FCN (ResNet backbone): stem, residual blocks, classifier, then the resampling
    to the input size as ``{"out": ...}``: the model's own output, through both wrappers."""
    torch.manual_seed(0)
    m = get_model("fcn_resnet50").double().eval()
    x = torch.randn(1, 3, 40, 48, dtype=torch.float64)
    stem, blocks, head = split_blocks(m)
    assert len(blocks) == 3 + 4 + 6 + 3 + 1
    with torch.no_grad():
        ref = m(x)["out"]
        h = stem(x)
        for b in blocks:
            h = b(h)
        assert torch.equal(head(h)["out"], ref)
        for wrap in (CheckpointBlocks, CheckpointSqrt):
            assert torch.equal(wrap(m)(x)["out"], ref)


def test_size_study_dense_tiny_unet():
    """The max-resolution study on a dense model (simulated): each answer fits and the next side
    does not, lrcnn's smallest plan reaches at least checkpointing per block, and the pixel ratio
    against checkpoint-blocks is reported."""
    from lrcnn.analysis.bench.studies import simulated_peak, size_study

    budget = 3 * 2**19
    rows = {r["method"]: r for r in size_study(budget, "cpu", "tiny_unet", progress=False, which="resolution",
                                                step=16, limit=5, simulate=False)}
    assert set(rows) == {"plain", "checkpoint-blocks", "checkpoint-sqrt", "lrcnn"}
    for name, wrapper in (("plain", None), ("checkpoint-blocks", CheckpointBlocks)):
        side = rows[name]["largest"]
        assert side >= 32 and rows[name]["peak_bytes"] <= budget
        assert simulated_peak("tiny_unet", wrapper, (1, 3, side + 16, side + 16)) > budget
    assert rows["plain"]["largest"] <= rows["checkpoint-blocks"]["largest"] <= rows["lrcnn"]["largest"]
    assert rows["lrcnn"]["peak_bytes"] <= budget and rows["lrcnn"]["how"] == "planner prediction"
    ck = rows["checkpoint-blocks"]["largest"]
    assert rows["lrcnn"]["x_pixels_checkpoint_blocks"] == (rows["lrcnn"]["largest"] / ck) ** 2 > 1
