"""Quantization structure of int8 artifacts (qatcheck.quantize.structure) on the real digits and
digitdet artifacts, with the three regressions the metric checks let through planted."""
from __future__ import annotations

import json

import onnx
import pytest

from qatcheck.artifacts import ArtifactBuilder, RecipeState
from qatcheck.cache import ArtifactCache
from qatcheck.errors import BaselineError
from qatcheck.quantize import export
from qatcheck.quantize.onnx_ptq import scale_qdq
from qatcheck.quantize.qdq_edit import strip_qdq
from qatcheck.quantize.structure import (QuantEntry, QuantStructure, compare_structure, from_entries,
                                         onnx_structure, to_entries, torch_structure, vanished)
from qatcheck.quantize.torch_quant import export_qdq_onnx
from qatcheck.zoo.recipes import detection_recipe, digits_recipe

TOL = 0.05


@pytest.fixture(scope="module")
def cache(tmp_path_factory, single_thread_module):
    return ArtifactCache(tmp_path_factory.mktemp("structure-cache"))


@pytest.fixture(scope="module")
def digits(cache):
    return ArtifactBuilder(RecipeState(digits_recipe()), cache)


@pytest.fixture(scope="module")
def digitdet(cache):
    return ArtifactBuilder(RecipeState(detection_recipe()), cache)


def _without_digest(s: QuantStructure) -> QuantStructure:
    return QuantStructure({k: QuantEntry(e.kind, e.scale, e.channels, e.scale_min, e.scale_max, "",
                                         e.zero_point) for k, e in s.quantizers.items()}, s.qdq_pairs)


# ---- clean artifacts -------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["trt_ptq:onnx", "torch_ptq:onnx", "torch_ptq:torch",
                                    "qat:onnx", "qat:torch"])
def test_clean_artifact_matches_itself(digits, source):
    mode, form = source.split(":")
    s = (onnx_structure(digits.onnx_artifact(mode).path) if form == "onnx"
         else torch_structure(digits.torch_artifact(mode).module))
    assert not vanished(s)
    entries = json.loads(json.dumps(to_entries(s)))  # what the baseline store writes and reads
    assert compare_structure(s, entries, scale_rel=0.0) == []
    assert compare_structure(entries, entries, scale_rel=0.0) == []
    assert from_entries(entries) == _without_digest(s)


def test_trt_ptq_names_and_counts(digits):
    s = onnx_structure(digits.onnx_artifact("trt_ptq").path)
    # every conv/gemm input and weight, in the order the layers run; the shared block input of
    # layer2 (one pair) is named for both of its readers
    assert list(s.quantizers)[:4] == ["stem.conv:input", "stem.conv:weight",
                                      "layer1.conv1:input", "layer1.conv1:weight"]
    assert len(s.quantizers) == 14 and s.qdq_pairs == 13
    shared = s.quantizers["layer2.conv1:input"]
    assert shared == s.quantizers["layer2.downsample.conv:input"] and shared.kind == "activation"
    w = s.quantizers["layer2.conv1:weight"]
    assert w.kind == "weight" and w.channels == 32 and 0 < w.scale_min < w.scale_max
    assert {e.zero_point for e in s.quantizers.values()} == {0}


@pytest.mark.parametrize("mode", ["torch_ptq", "qat"])
def test_torch_model_and_its_onnx_agree(digits, mode):
    t = torch_structure(digits.torch_artifact(mode).module)
    o = onnx_structure(digits.onnx_artifact(mode).path)
    assert set(t.quantizers) == set(o.quantizers)  # (order: module vs graph order)
    for name, te in t.quantizers.items():
        oe = o.quantizers[name]
        assert (te.kind, te.channels, te.digest, te.zero_point) == \
            (oe.kind, oe.channels, oe.digest, oe.zero_point), name
        for field in ("scale", "scale_min", "scale_max"):
            a, b = getattr(te, field), getattr(oe, field)
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-6), (name, field)
    # the exporter merges layer2.conv1's and layer2.downsample.conv's input quantizers (equal
    # scales on one tensor) into one pair: 15 quantizers, 14 pairs, nothing else differs
    assert (t.qdq_pairs, o.qdq_pairs) == (15, 14)
    assert compare_structure(o, to_entries(t), scale_rel=1e-6) == ["Q/DQ pair count changed: 15 -> 14"]


# ---- plant (a): one input quantizer's amax x8 ------------------------------------------------

def test_amax_x8_is_named_in_torch_and_in_its_export(digits, tmp_path):
    module = digits.torch_artifact("torch_ptq").module  # a fresh copy
    torch_base = to_entries(torch_structure(module))
    onnx_base = to_entries(onnx_structure(digits.onnx_artifact("torch_ptq").path))
    module.layer1.conv1._input_quantizer._amax.data.mul_(8.0)  # the amax buffer

    failures = compare_structure(torch_structure(module), torch_base, scale_rel=TOL)
    assert len(failures) == 1
    msg = failures[0]
    assert msg.startswith("quantizer 'layer1.conv1:input' scale ") and "(x8.00, tolerance ±5%)" in msg
    base = torch_base["layer1.conv1:input.scale"]
    assert f"vs baseline {base:.4g}" in msg and f"scale {base * 8:.4g}" in msg

    r = digits.recipe
    path = tmp_path / "planted.onnx"
    export_qdq_onnx(module, export.example_input(r.input), path, r.input.name, r.output_names)
    assert compare_structure(onnx_structure(path), onnx_base, scale_rel=TOL) == failures


# ---- plant (b): one activation Q/DQ pair dropped ---------------------------------------------

@pytest.mark.parametrize("recipe, layer", [("digits", "layer1.conv2"), ("digitdet", "block1.conv2")])
def test_dropped_activation_pair_is_named(request, recipe, layer):
    builder = request.getfixturevalue(recipe)
    graph = onnx.load(str(builder.onnx_artifact("trt_ptq").path))
    base = to_entries(onnx_structure(graph))
    planted = strip_qdq(graph, [layer], inputs=(0,))  # the activation only; the weight stays int8
    failures = compare_structure(onnx_structure(planted), base, scale_rel=TOL)
    scale = base[f"{layer}:input.scale"]
    pairs = base["qdq_pairs"]
    assert failures == [f"quantizer '{layer}:input' was dropped (baseline scale {scale:.4g})",
                        f"Q/DQ pair count changed: {pairs} -> {pairs - 1}"]


def test_dropping_one_reader_of_a_shared_pair_is_named(digits):
    """layer2.conv1 shares its input pair with layer2.downsample.conv: taking layer2.conv1 back
    to fp32 keeps the pair (the count does not move), the per-reader entry still catches it."""
    graph = onnx.load(str(digits.onnx_artifact("trt_ptq").path))
    base = to_entries(onnx_structure(graph))
    failures = compare_structure(onnx_structure(strip_qdq(graph, ["layer2.conv1"], inputs=(0,))), base,
                                 scale_rel=TOL)
    assert len(failures) == 1 and failures[0].startswith("quantizer 'layer2.conv1:input' was dropped")


# ---- plant (c): the fp32 ONNX in place of the int8 one ---------------------------------------

def test_fp32_graph_as_int8_vanishes(digits):
    fp32 = onnx_structure(digits.onnx_artifact("fp32").path)
    assert vanished(fp32) and fp32 == QuantStructure({}, 0)
    base = to_entries(onnx_structure(digits.onnx_artifact("trt_ptq").path))
    assert compare_structure(fp32, base, scale_rel=TOL) == [
        "quantization vanished: the int8 artifact has no Q/DQ (0 quantizers; baseline 14)"]
    assert vanished(to_entries(fp32))


# ---- tolerance --------------------------------------------------------------------------------

def test_scale_move_inside_tolerance_passes(digits, tmp_path):
    src = digits.onnx_artifact("trt_ptq").path
    base = to_entries(onnx_structure(src))
    # /layer1/relu1 output is layer1.conv2's input
    scale_qdq(src, tmp_path / "in.onnx", "/layer1/relu1/Relu_output_0", 1.03)
    assert compare_structure(onnx_structure(tmp_path / "in.onnx"), base, scale_rel=TOL) == []
    scale_qdq(src, tmp_path / "out.onnx", "/layer1/relu1/Relu_output_0", 1.06)
    failures = compare_structure(onnx_structure(tmp_path / "out.onnx"), base, scale_rel=TOL)
    assert len(failures) == 1 and "'layer1.conv2:input'" in failures[0] and "(x1.06," in failures[0]


# ---- messages on synthetic structures ---------------------------------------------------------

def _s(pairs: int = 2, **quantizers: QuantEntry) -> QuantStructure:
    return QuantStructure({k.replace("__", ":"): v for k, v in quantizers.items()}, pairs)


ACT = QuantEntry("activation", scale=0.01)
W = QuantEntry("weight", channels=4, scale_min=0.001, scale_max=0.004)


def test_added_per_channel_and_zero_point_messages():
    base = to_entries(_s(a__input=ACT, a__weight=W))
    now = _s(3, a__input=ACT, a__weight=QuantEntry("weight", channels=8, scale_min=0.001, scale_max=0.006),
             b__input=QuantEntry("activation", scale=0.5, zero_point=3))
    assert compare_structure(now, base, scale_rel=TOL) == [
        "quantizer 'b:input' was added (scale 0.5)",
        "quantizer 'a:weight' has 8 channels vs baseline 4",
        "quantizer 'a:weight' scale_max 0.006 vs baseline 0.004 (x1.50, tolerance ±5%)",
        "Q/DQ pair count changed: 2 -> 3"]
    switched = _s(a__input=ACT, a__weight=QuantEntry("weight", scale=0.004))
    assert compare_structure(switched, base, scale_rel=TOL) == [
        "quantizer 'a:weight' is now per-tensor (scale 0.004) vs baseline scale 0.001..0.004 over 4 channels"]
    zp = _s(a__input=QuantEntry("activation", scale=0.01, zero_point=-2), a__weight=W)
    assert compare_structure(zp, base, scale_rel=TOL) == ["quantizer 'a:input' zero point -2 vs baseline 0"]
    assert to_entries(zp)["a:input.zero_point"] == -2


def test_non_finite_scale_fails_and_long_lists_are_capped():
    base = to_entries(_s(a__input=ACT))
    nan = compare_structure(_s(a__input=QuantEntry("activation", scale=float("nan"))), base, scale_rel=TOL)
    assert len(nan) == 1 and "'a:input' scale nan vs baseline 0.01" in nan[0]
    many = _s(2, **{f"l{i}__input": ACT for i in range(12)})
    failures = compare_structure(many, base, scale_rel=TOL)
    assert len(failures) == 9 and failures[-1] == "... and 5 more quantizer difference(s)"  # 1 dropped + 12 added
    assert failures[0] == "quantizer 'a:input' was dropped (baseline scale 0.01)"


def test_tiny_move_shows_enough_digits_and_bad_entries_are_named():
    base = to_entries(_s(a__input=QuantEntry("activation", scale=0.0100000)))
    (msg,) = compare_structure(_s(a__input=QuantEntry("activation", scale=0.0100001)), base, scale_rel=1e-6)
    assert "scale 0.0100001 vs baseline 0.01 " in msg
    with pytest.raises(BaselineError, match="'a:input.amax'"):
        from_entries({"qdq_pairs": 1, "a:input.amax": 1.0})
