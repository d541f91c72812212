"""Graph capture against the real models: module structure, shapes, bytes, FLOPs, geometry.

Every zoo model is built on the meta device (no memory) and captured at 224x224 and at an odd size
(193x251).  Independently of torch.fx, the original model runs on the meta device with forward hooks
on every leaf module; the captured graph must call exactly those modules, in the same order per
module, with the same output shapes.
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import torch.nn as nn

from lrcnn.models import CaptureError, HGeom, capture, get_model, list_models
from lrcnn.models.geometry import IDENTITY

SIZES = [(224, 224), (193, 251)]


def eager_leaf_calls(model: nn.Module, shape):
    """Run ``model`` on a meta input with hooks on every leaf module.

    Returns ``(calls, out_shape)``: ``calls[path]`` is the list of output shapes, one per call.
    """
    calls = defaultdict(list)
    handles = []
    for path, m in model.named_modules():
        if path and not any(True for _ in m.children()):
            def hook(mod, inp, out, path=path):
                calls[path].append(tuple(out.shape))
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.empty(shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return dict(calls), tuple(out.shape)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list_models("classification"))
def test_graph_matches_module_structure_and_shapes(name, size):
    model = get_model(name, device="meta")
    shape = (1, 3) + size
    graph = capture(model, shape, model_name=name)
    calls, out_shape = eager_leaf_calls(model, shape)

    modules = dict(model.named_modules())
    leaves = {p for p, m in modules.items() if p and not any(True for _ in m.children())}
    graph_calls = defaultdict(list)
    for n in graph.nodes:
        if n.kind in ("input", "output"):
            continue
        if n.target in modules:  # a module call (function nodes carry the function's name)
            assert n.target in leaves, f"{n.name} calls {n.target}, which is not a leaf module"
            graph_calls[n.target].append(tuple(n.shape))
    # every call_module node is a leaf module of the model, called in the same order per module
    # with the same output shapes (a shared ReLU in a Bottleneck appears several times)
    assert {p: calls.get(p) for p in graph_calls} == dict(graph_calls)
    # leaf modules that fx traced through rather than calling (torchvision's parameter-free
    # StochasticDepth): not stock torch.nn layers, no parameters, and the nodes they own have the
    # hook's shapes
    for p in set(calls) - set(graph_calls):
        m = modules[p]
        assert not type(m).__module__.startswith("torch.nn"), f"stock layer {p} missing from the graph"
        assert not any(True for _ in m.parameters()), f"{p} has parameters but is not in the graph"
        assert [tuple(n.shape) for n in graph.nodes if n.module == p] == calls[p], p
    # every leaf module with parameters appears in the graph
    with_params = {p for p in leaves if any(True for _ in modules[p].parameters(recurse=False))}
    assert with_params <= set(graph_calls), sorted(with_params - set(graph_calls))
    # the graph's input and output
    assert graph.input_node.shape == shape and graph.input_node.kind == "input"
    assert graph.output_node.kind == "output" and graph.output_node.inputs == [graph.nodes[-2].name]
    assert graph.nodes[-2].shape == out_shape == (1, 10 if name.startswith("tiny_") else 1000)
    # bytes: every tensor node's output bytes are numel * itemsize (float32)
    # (non-tensor values such as shufflenet's x.size() items have shape () and no bytes)
    for n in graph.nodes[:-1]:
        assert n.out_bytes == (math.prod(n.shape) * 4 if n.shape else 0), n.name
        assert n.saved_bytes >= 0
    assert graph.param_bytes == sum(p.numel() for p in model.parameters()) * 4
    # inputs refer to earlier nodes only (topological order)
    seen = set()
    for n in graph.nodes:
        assert set(n.inputs) <= seen, n.name
        seen.add(n.name)


def test_every_zoo_model_is_captured():
    """No classifier in list_models() is skipped by the structural test above; the dense models
    (a class per pixel) are the rest, tested in tests/test_dense.py."""
    names = list_models()
    assert len(names) == len(set(names)) and len(names) >= 33
    assert {"vgg16", "resnet50", "mobilenet_v2", "densenet121", "googlenet", "regnet_y_400mf"} <= set(names)
    dense = list_models("segmentation")
    assert sorted(list_models("classification") + dense) == sorted(names)
    assert {"unet", "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
            "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "tiny_fcn", "tiny_unet"} == set(dense)


# ------------------------------------------------------------------------------------------------
# ResNet-50 and VGG-16 in detail
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def r50(captured):
    return captured("resnet50", (1, 3, 224, 224))


@pytest.fixture(scope="module")
def vgg(captured):
    return captured("vgg16", (1, 3, 224, 224))


def test_resnet50_geometry_fields(r50):
    assert r50["conv1"].geom == HGeom(kernel=7, stride=2, padding=3, dilation=1, ceil_mode=False, pad_value=0.0)
    assert r50["maxpool"].geom == HGeom(3, 2, 1, 1, False, -math.inf)
    assert r50["maxpool"].geom.pad_value == -math.inf
    assert r50["layer2_0_conv2"].geom == HGeom(3, 2, 1)        # torchvision v1.5: stride in the 3x3
    assert r50["layer2_0_downsample_0"].geom == HGeom(1, 2, 0)
    assert r50["layer1_0_bn1"].geom == IDENTITY and r50["layer1_0_bn1"].kind == "norm"
    assert r50["add"].kind == "join" and r50["add"].geom == IDENTITY
    assert r50["add"].inputs == ["layer1_0_bn3", "layer1_0_downsample_1"]
    assert r50["avgpool"].geom is None and not r50["avgpool"].rowwise
    assert r50["fc"].kind == "global"
    assert [r50[n].op for n in ("conv1", "bn1", "relu", "maxpool", "avgpool", "flatten", "fc")] == \
        ["conv2d", "batchnorm2d", "relu", "maxpool2d", "adaptive_avgpool2d", "flatten", "linear"]


def test_resnet50_strides_and_receptive_field(r50):
    trunk = [n for n in r50.nodes if n.rowwise and n.kind != "input"][-1]
    assert trunk.name == "layer4_2_relu_2" and trunk.shape == (1, 2048, 7, 7)
    assert trunk.cum_stride == 32
    assert trunk.receptive_field == 427  # prior-art doc: 427 rows for ResNet-50's trunk
    assert r50["conv1"].receptive_field == 7 and r50["conv1"].cum_stride == 2
    assert r50["maxpool"].receptive_field == 11 and r50["maxpool"].cum_stride == 4
    assert r50["layer1_0_conv2"].receptive_field == 19
    assert r50["layer2_0_conv2"].cum_stride == 8 and r50["layer3_0_conv2"].cum_stride == 16


def test_vgg16_strides_and_receptive_field(vgg):
    assert vgg["features_30"].op == "maxpool2d" and vgg["features_30"].shape == (1, 512, 7, 7)
    assert vgg["features_30"].cum_stride == 32
    assert vgg["features_30"].receptive_field == 212  # prior-art doc: 212 rows for VGG-16
    assert [vgg[f"features_{i}"].receptive_field for i in (0, 2, 4, 5)] == [3, 5, 6, 10]


def _chain_rf(layers):
    """Textbook receptive field of a chain of (kernel, stride, dilation): r += d*(k-1)*jump."""
    r, jump = 1, 1
    for k, s, d in layers:
        r += d * (k - 1) * jump
        jump *= s
    return r, jump


def _ksd(m):
    p = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    if isinstance(m, nn.Conv2d):
        return p(m.kernel_size), p(m.stride), p(m.dilation)
    if isinstance(m, nn.MaxPool2d):
        return p(m.kernel_size), p(m.stride), p(m.dilation)
    return None


def test_receptive_fields_match_textbook_formula():
    """427 and 212 re-derived from the torchvision modules, without models.geometry."""
    r50 = get_model("resnet50", device="meta")
    main = [r50.conv1, r50.maxpool]
    for layer in (r50.layer1, r50.layer2, r50.layer3, r50.layer4):
        for blk in layer:
            main += [blk.conv1, blk.conv2, blk.conv3]
    assert _chain_rf([_ksd(m) for m in main]) == (427, 32)
    vgg = get_model("vgg16", device="meta")
    assert _chain_rf([_ksd(m) for m in vgg.features if _ksd(m)]) == (212, 32)


def test_receptive_field_independent_of_input_size(captured):
    g = captured("resnet50", (1, 3, 193, 251))
    assert g["layer4_2_relu_2"].receptive_field == 427 and g["layer4_2_relu_2"].shape == (1, 2048, 7, 8)
    v = captured("vgg16", (1, 3, 193, 251))
    assert v["features_30"].receptive_field == 212 and v["features_30"].shape == (1, 512, 6, 7)


def test_conv_flops_by_hand(r50, vgg, captured):
    # resnet50 conv1: 7x7, 3 -> 64, no bias, output 1x64x112x112: 2 * out * (cin * kh * kw)
    out = 64 * 112 * 112
    assert r50["conv1"].flops_fwd == 2 * out * 3 * 7 * 7 == 236_027_904
    assert r50["conv1"].flops_bwd == 2 * r50["conv1"].flops_fwd
    assert r50["layer1_0_conv2"].flops_fwd == 2 * (64 * 56 * 56) * 64 * 9 == 231_211_008
    # with bias: + one add per output element
    assert vgg["features_0"].flops_fwd == 2 * (64 * 224 * 224) * 3 * 9 + 64 * 224 * 224 == 176_619_520
    # grouped: ResNeXt-50 32x4d layer1.0.conv2 (128 channels, 32 groups: 4 inputs per output)
    rx = captured("resnext50_32x4d", (1, 3, 224, 224))
    assert rx["layer1_0_conv2"].flops_fwd == 2 * (128 * 56 * 56) * 4 * 9 == 28_901_376
    # linear: 2048 -> 1000 with bias
    assert r50["fc"].flops_fwd == 2 * 1000 * 2048 + 1000


def test_bytes_scale_with_batch_and_dtype(captured):
    g = captured("resnet50", (2, 3, 224, 224), "float64")
    assert g.dtype == "float64"
    assert g["conv1"].out_bytes == 2 * 64 * 112 * 112 * 8
    assert g["fc"].out_bytes == 2 * 1000 * 8
    assert g.input_node.out_bytes == 2 * 3 * 224 * 224 * 8
    assert g.param_bytes == 25_557_032 * 8


def test_saved_bytes_of_a_small_net_by_hand():
    """conv (bias-free) -> ReLU -> max-pool, batch 2, 3x8x8, float32, training.

    conv saves its input (the graph input: counted apart) and weight (a parameter: not counted);
    ReLU saves its output (2*4*8*8*4 = 2048 bytes); max-pool saves its input (the ReLU output,
    already counted) and its int64 indices (2*4*4*4*8 = 1024 bytes)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2))
    g = capture(net, (2, 3, 8, 8))
    assert [(n.name, n.target) for n in g.nodes] == [("input_1", "input"), ("_0", "0"), ("_1", "1"), ("_2", "2"), ("output", "output")]
    conv, relu, pool = g.nodes[1:4]
    assert (conv.op, relu.op, pool.op) == ("conv2d", "relu", "maxpool2d")
    assert conv.saved_bytes == 0
    assert relu.saved_bytes == 2 * 4 * 8 * 8 * 4
    assert pool.saved_bytes == 2 * 4 * 4 * 4 * 8
    assert g.total_saved_bytes == 3072
    assert g.saved_input_bytes == 2 * 3 * 8 * 8 * 4


class _FreedThenSaved(nn.Module):
    """The last BN's output feeds only a spatial sum (which saves nothing), so it is freed
    before the loss runs; the loss then saves new tensors, one of them made at the address
    the freed storage had (the allocator reuses it)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b2(self.c2(self.b1(self.c1(x)) + 1.0)).sum(dim=(2, 3))


def test_saved_tensor_at_a_freed_outputs_address_is_not_that_output():
    """The memory profile names the node whose output a saved tensor is by the storage's
    address; a storage made after another was freed may get its address.  Only live storages
    count: the loss saves its own tensors (log-softmax output, target, total weight), never the
    freed BN output, so the cost model does not hold that output to the loss's backward.  (The
    address reuse depends on the allocator's history: it made ResNet-50's predicted peak move by
    one feature map between runs.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = capture(_FreedThenSaved().train(), (2, 3, 16, 16))
    out = g.output_node
    assert out.saves == [] and out.also_saves == []
    # the loss's saved bytes, counted on their own: cross-entropy of (2, 4) logits
    packed = {}

    def pack(t):
        packed[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with FakeTensorMode():
        logits = torch.empty(2, 4, requires_grad=True)
        target = torch.zeros(2, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nn.functional.cross_entropy(logits, target)
        packed.pop(logits.untyped_storage()._cdata, None)
        # (the target is the cost model's, in the fixed bytes with the input: not the loss's)
        packed.pop(target.untyped_storage()._cdata, None)
    assert out.extra_saved == sum(packed.values())


def test_cut_points_resnet50(r50):
    cuts = r50.cut_points()
    assert cuts[:6] == ["x", "conv1", "bn1", "relu", "maxpool", "add"]
    # inside a bottleneck the block input stays live for the shortcut: no cut
    assert "layer1_0_conv1" not in cuts and "layer1_0_bn3" not in cuts
    # every block output (after its final ReLU) is a cut
    assert all(f"layer{i}_{j}_relu_2" in cuts for i, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n))
    assert cuts[-4:] == ["layer4_2_relu_2", "avgpool", "flatten", "fc"]
    assert len(cuts) == 40


def test_resolve_module_paths(r50):
    assert r50.resolve("layer1", "first") == "layer1_0_conv1"
    assert r50.resolve("layer1", "last") == "layer1_2_relu_2"
    assert r50.resolve("layer1.0.relu", "last") == "layer1_0_relu_2"
    assert r50.resolve("conv1") == "conv1"
    with pytest.raises(KeyError, match="no node or module named 'layer9'"):
        r50.resolve("layer9")


def test_train_and_eval_mode(captured):
    tr = captured("resnet18", (2, 3, 64, 64), training=True)
    ev = captured("resnet18", (2, 3, 64, 64), training=False)
    assert tr.training is True and ev.training is False
    assert tr.fingerprint() == ev.fingerprint()  # the structure does not depend on the mode


def test_fingerprint_tracks_shape_dtype_and_structure(captured):
    base = captured("resnet18", (2, 3, 64, 64))
    assert base.fingerprint() == captured("resnet18", (2, 3, 64, 64)).fingerprint()
    assert len(base.fingerprint()) == 16
    others = [captured("resnet18", (2, 3, 64, 96)), captured("resnet18", (4, 3, 64, 64)),
              captured("resnet18", (2, 3, 64, 64), "float64"), captured("resnet34", (2, 3, 64, 64)),
              captured("resnet18", (2, 3, 64, 64), num_classes=10)]
    fps = {g.fingerprint() for g in others}
    assert len(fps) == len(others) and base.fingerprint() not in fps


def test_dataframe(r50):
    df = r50.to_dataframe()
    assert len(df) == len(r50) - 2
    assert list(df.columns) == ["name", "op", "kind", "module", "shape", "out_MiB", "saved_MiB",
                                "GFLOPs_fwd", "GFLOPs_bwd", "rf", "stride", "rowwise"]
    row = df.set_index("name").loc["conv1"]
    assert row["shape"] == "1x64x112x112" and row["out_MiB"] == 64 * 112 * 112 * 4 / 2**20
    assert row["rf"] == 7 and row["stride"] == 2


def test_too_small_input_is_a_capture_error():
    with pytest.raises(CaptureError, match=r"input shape 1x3x16x16 does not fit vgg16 .*use a larger --resolution"):
        capture(get_model("vgg16", device="meta"), (1, 3, 16, 16), model_name="vgg16")
    with pytest.raises(CaptureError, match=r"must be \(N, C, H, W\) with positive sizes"):
        capture(get_model("tiny_vgg", device="meta"), (1, 3, 0, 16))
    with pytest.raises(CaptureError, match=r"must be \(N, C, H, W\)"):
        capture(get_model("tiny_vgg", device="meta"), (3, 16, 16))


# -- tensor-method spellings ---------------------------------------------------------------------

class MethodNet(nn.Module):
    """A small CNN written as timm writes its blocks: activations, a squeeze-excite gate and
    residual adds as tensor methods, some in place with the result read through the argument
    (``y.add_(x)``, then ``y``).  ``functions=True``: the same network with function spellings."""

    def __init__(self, functions: bool = False, c: int = 8, classes: int = 10):
        super().__init__()
        self.functions = functions
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.conv4 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        if self.functions:
            x = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(torch.add(self.bn2(self.conv2(x)), x))
            z = self.conv3(y)
            z = torch.tanh(torch.mul(z, torch.sigmoid(z)))
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(z.mean((2, 3), keepdim=True)))))
            z = z * s
            w = torch.sigmoid(torch.add(self.conv4(z), z, alpha=0.5))
            return self.head(w.mean((2, 3)))
        x = self.bn1(self.conv1(x)).relu()
        y = self.bn2(self.conv2(x))
        y.add_(x)               # in place; the sum is read through y
        y = y.relu_()
        z = self.conv3(y)
        z = z.mul(z.sigmoid())  # swish, row-local
        z.tanh_()
        s = self.fc2(self.fc1(z.mean((2, 3), keepdim=True)).relu_()).sigmoid()  # SE gate
        z = z * s
        w = self.conv4(z).add(z, alpha=0.5).sigmoid_()
        return self.head(w.mean((2, 3)))


def test_tensor_methods_classified_as_their_functions():
    """``x.sigmoid()``, ``y.add_(x)``, ``x.relu_()`` ... are the ops ``torch.sigmoid``, ``torch.add``,
    ``torch.relu`` are: same op, kind, geometry, row-wise flag, inputs and FLOPs, node by node; a
    node that reads a tensor after a method overwrote it in place reads the in-place node."""
    from lrcnn.models.ops import recomputable

    meth = capture(MethodNet(), (2, 3, 16, 16))
    func = capture(MethodNet(functions=True), (2, 3, 16, 16))
    assert len(meth) == len(func)
    index = {a.name: b.name for a, b in zip(meth.nodes, func.nodes)}
    for a, b in zip(meth.nodes, func.nodes):
        assert (a.op, a.kind, a.geom, a.rowwise, a.shape, a.flops_fwd, a.flops_bwd) == \
               (b.op, b.kind, b.geom, b.rowwise, b.shape, b.flops_fwd, b.flops_bwd), (a.name, b.name)
        assert [index[u] for u in a.inputs] == b.inputs, (a.name, a.inputs, b.inputs)
        assert recomputable(a) == recomputable(b)
    assert meth.cut_points() == [a.name for a in meth.nodes if index[a.name] in set(func.cut_points())]
    ops = {n.target: (n.op, n.kind) for n in meth.nodes}
    assert ops["relu"] == ops["relu_"] == ("relu", "pointwise")
    assert ops["sigmoid"] == ops["sigmoid_"] == ("sigmoid", "pointwise")
    assert ops["add_"] == ops["add"] == ("add", "join") and ops["tanh_"] == ("tanh", "pointwise")
    assert meth["relu_"].inputs == ["add_"]  # y.add_(x); y.relu_(): the sum, not bn2's output
    assert meth["mean"].kind == "global" and "tensor method .mean()" in meth["mean"].reason
