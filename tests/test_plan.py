"""Plan format (lrcnn.plan/1): building by module path, JSON round trip, validation messages."""
from __future__ import annotations

import json
import os

import pytest

from lrcnn.planner.plan import SCHEMA, Plan, PlanError, Segment

SHAPE = (2, 3, 224, 224)


@pytest.fixture(scope="module")
def r18(captured):
    return captured("resnet18", SHAPE)


@pytest.fixture()
def plan(r18):
    return Plan.build(r18, [
        Segment("conv1", "layer1", "rows", policy="2ps", strips=4),
        Segment("layer2", "layer3", "checkpoint", recompute=["layer2_0_relu"]),
        Segment("layer4", "layer4", "rows", policy="overl", bounds=[0, 3, 7]),
    ], budget_bytes=8 * 10**9)


def test_build_resolves_module_paths(plan, r18):
    assert [(s.first, s.last, s.mode) for s in plan.segments] == [
        ("conv1", "layer1_1_relu_1", "rows"),
        ("layer2_0_conv1", "layer3_1_relu_1", "checkpoint"),
        ("layer4_0_conv1", "layer4_1_relu_1", "rows"),
    ]
    assert plan.segments[0].policy == "2ps" and plan.segments[0].strips == 4
    assert plan.segments[2].bounds == [0, 3, 7]
    assert plan.model == "resnet18" and plan.schema == SCHEMA == "lrcnn.plan/1"
    assert plan.fingerprint == r18.fingerprint()
    assert plan.input_shape == [2, 3, 224, 224] and plan.dtype == "float32"
    assert plan.training == {"optimizer": "sgd", "bn": "train", "num_classes": 1000}
    assert plan.budget_bytes == 8 * 10**9


def test_json_round_trip(plan, r18, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(str(path))
    doc = json.loads(path.read_text())
    assert doc == {
        "schema": "lrcnn.plan/1", "model": "resnet18", "fingerprint": r18.fingerprint(),
        "input_shape": [2, 3, 224, 224], "dtype": "float32", "training": {"optimizer": "sgd", "bn": "train", "num_classes": 1000},
        "budget_bytes": 8000000000,
        "segments": [
            {"first": "conv1", "last": "layer1_1_relu_1", "mode": "rows", "policy": "2ps", "strips": 4},
            {"first": "layer2_0_conv1", "last": "layer3_1_relu_1", "mode": "checkpoint",
             "recompute": ["layer2_0_relu"]},
            {"first": "layer4_0_conv1", "last": "layer4_1_relu_1", "mode": "rows", "policy": "overl",
             "bounds": [0, 3, 7]},
        ],
        "predicted": {}, "solver": {},
    }
    loaded = Plan.load(str(path), r18)
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()
    # a second round trip is byte-identical
    path2 = tmp_path / "plan2.json"
    loaded.save(str(path2))
    assert path2.read_text() == path.read_text()


def _doc(plan, **changes):
    d = plan.to_dict()
    d.update(changes)
    return d


def test_schema_mismatch(plan):
    with pytest.raises(PlanError) as e:
        Plan.from_dict(_doc(plan, schema="lrcnn.plan/0"))
    assert str(e.value) == ("plan schema 'lrcnn.plan/0' is not 'lrcnn.plan/1'; "
                            "re-create the plan with this version of lrcnn")
    d = _doc(plan)
    del d["schema"]
    with pytest.raises(PlanError, match="^plan schema None is not 'lrcnn.plan/1'"):
        Plan.from_dict(d)
    with pytest.raises(PlanError, match="^a plan must be a JSON object$"):
        Plan.from_dict([1, 2])


def test_missing_and_unknown_fields(plan):
    d = _doc(plan)
    del d["fingerprint"]
    with pytest.raises(PlanError, match="^plan is missing the field 'fingerprint'$"):
        Plan.from_dict(d)
    d = _doc(plan)
    d["segments"][1]["colour"] = "red"
    with pytest.raises(PlanError, match=r"^segment 1: unknown segment field\(s\) \['colour'\]$"):
        Plan.from_dict(d)
    d = _doc(plan)
    d["segments"][0]["policy"] = "3ps"
    with pytest.raises(PlanError, match="^segment 0: rows segment needs policy '2ps' or 'overl', got '3ps'$"):
        Plan.from_dict(d)


def test_fingerprint_mismatch_other_resolution(plan, captured):
    other = captured("resnet18", (2, 3, 256, 256))
    with pytest.raises(PlanError) as e:
        plan.validate(other)
    assert str(e.value) == ("plan is for input (2, 3, 224, 224) float32, the model was captured at "
                            "(2, 3, 256, 256) float32")


def test_fingerprint_mismatch_other_model(plan, captured, r18):
    other = captured("resnet34", SHAPE)
    with pytest.raises(PlanError) as e:
        plan.validate(other)
    assert str(e.value) == (f"plan fingerprint {r18.fingerprint()} does not match the model's graph "
                            f"({other.fingerprint()}): the plan was made for a different model or input "
                            f"shape; re-run 'planner solve'")
    tampered = Plan.from_dict(_doc(plan, fingerprint="0123456789abcdef"))
    with pytest.raises(PlanError, match=r"^plan fingerprint 0123456789abcdef does not match the model's graph "):
        tampered.validate(r18)


def test_load_validates_against_graph(plan, captured, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(str(path))
    with pytest.raises(PlanError, match="^plan is for input"):
        Plan.load(str(path), captured("resnet18", (2, 3, 256, 256)))
    path.write_text("{not json")
    with pytest.raises(PlanError, match=r"^plan '.*plan\.json' is not valid JSON \(line 1: "):
        Plan.load(str(path))
    with pytest.raises(PlanError, match=r"^plan '.*missing\.json' does not exist; give a JSON plan written by 'planner solve'$"):
        Plan.load(str(tmp_path / "missing.json"))


def test_segment_not_at_cut_point(r18):
    """A segment reads one tensor made before it and leaves one; others may pass over it (the
    identity over a residual branch): tests/test_bypass.py has more."""
    Plan.build(r18, [Segment("layer1_0_conv1", "layer1_0_conv2", "checkpoint")])
    assert r18.passing("layer1_0_conv1", "layer1_0_conv2") == ["maxpool"]
    with pytest.raises(PlanError) as e:
        Plan.build(r18, [Segment("maxpool", "layer1_0_conv1", "checkpoint")])
    assert str(e.value) == ("segment 0 (maxpool..layer1_0_conv1): more than one tensor leaves the segment after "
                            "'layer1_0_conv1' ('maxpool' is read by 'add' too); end it at a block boundary (one of "
                            "the graph's cut points) or where only its last node's output is read after it")
    with pytest.raises(PlanError) as e:
        Plan.build(r18, [Segment("layer1_0_conv2", "layer1_0_relu_1", "checkpoint")])
    assert str(e.value) == ("segment 0 (layer1_0_conv2..layer1_0_relu_1): more than one tensor enters the segment "
                            "before 'layer1_0_conv2' ('add' reads 'maxpool' besides the segment input "
                            "'layer1_0_relu'); start it at a block boundary (one of the graph's cut points) or "
                            "where it reads nothing made before its input")


def test_other_segment_errors(r18):
    with pytest.raises(PlanError, match="^segment 0: no node or module named 'layer9' in the graph of resnet18$"):
        Plan.build(r18, [Segment("layer9", "layer9", "checkpoint")])
    with pytest.raises(PlanError, match=r"^segment 1 \(layer1_0_conv1\.\.layer1_1_relu_1\): overlaps the previous segment$"):
        Plan.build(r18, [Segment("conv1", "layer1", "checkpoint"), Segment("layer1", "layer1", "checkpoint")])
    with pytest.raises(PlanError, match=r"first node comes after last node$"):
        Plan.build(r18, [Segment("layer2", "layer1", "checkpoint")])
    with pytest.raises(PlanError, match="rows segment needs 'strips' \\(a count\\) or 'bounds'$"):
        Plan.build(r18, [Segment("layer1", "layer1", "rows", policy="2ps")])
    with pytest.raises(PlanError, match="policy/strips/bounds are only meaningful for rows segments$"):
        Plan.build(r18, [Segment("layer1", "layer1", "checkpoint", strips=3)])
    with pytest.raises(PlanError, match="mode 'fast' is not one of store, checkpoint, rows$"):
        Plan.build(r18, [Segment("layer1", "layer1", "fast")])
    with pytest.raises(PlanError, match="recompute node 'conv1' is not inside the segment$"):
        Plan.build(r18, [Segment("layer1", "layer1", "store", recompute=["conv1"])])


def test_save_is_atomic(plan, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    path.write_text("previous contents\n")

    def broken_dump(obj, f, **kw):
        f.write('{"schema": "lrcnn.pl')  # half a document, then the disk "fails"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        plan.save(str(path))
    assert path.read_text() == "previous contents\n"  # never half-written


def test_save_failure_leaves_no_temp_file(plan, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"

    def broken_dump(obj, f, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        plan.save(str(path))
    assert os.listdir(tmp_path) == []
