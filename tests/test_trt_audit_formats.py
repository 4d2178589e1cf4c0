"""The precision audit reads both engine-inspector layouts: TensorRT 10.x (``Bindings``, one
``Format/Datatype`` string per layer tensor) and TensorRT 11 (``I/O Tensors``, separate ``Datatype``
and ``Format``). The fixtures (tests/fixtures/trt_inspector/, README.md there) are one small int8
engine written in each layout, and the same engine with one conv planted in fp32."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatcheck.backends.trt_audit import (SCHEMA_10, SCHEMA_11, InspectorFormatError, PrecisionAuditError,
                                         layer_kind, layer_precision, load_engine_info, parse_engine_info,
                                         tensor_precision)
from qatcheck.judges import judge_precision
from qatcheck.measurement import Case

FIXTURES = Path(__file__).parent / "fixtures" / "trt_inspector"
VERSIONS = {"trt10": SCHEMA_10, "trt11": SCHEMA_11}
CASE = Case("digits", "trt_ptq", "tensorrt")
PLANTED = ("layer1.conv2.weight + /layer1/conv2/weight_quantizer/QuantizeLinear + /layer1/conv2/Conv + "
           "/layer1/Add + /layer1/relu2/Relu")


def fixture(name: str) -> Path:
    return FIXTURES / name


def raw(name: str) -> dict:
    return json.loads(fixture(name).read_text())


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_int8_engine_audits_to_int8_convolutions(version):
    audit = load_engine_info(fixture(f"{version}_int8.json"))
    assert audit.schema == VERSIONS[version] and audit.notes == []
    assert audit.io_tensors == ("input", "logits")
    # stem, layer1.conv1, layer1.conv2 (+ residual add) and the fc (TensorRT runs the Gemm as a 1x1 conv)
    assert audit.precision_counts("conv") == {"int8": 4}
    assert audit.qdq == 1 and audit.reformats == 1  # the input Q; the inserted CopyNode before fc
    pool = next(l for l in audit.layers if l.name == "/pool/GlobalAveragePool")
    assert (pool.kind, pool.precision, pool.precision_from) == ("other", "int8", "input")  # no weights: its tensor
    stem = audit.of_kind("conv")[0]
    assert stem.onnx_nodes == ("/stem/conv/weight_quantizer/QuantizeLinear", "/stem/conv/Conv", "/stem/relu/Relu")
    audit.assert_all("conv", "int8")
    verdict = judge_precision(CASE, audit, {"conv": "int8", "max_reformats": 1})
    assert verdict.status == "pass", verdict.failures
    assert audit.summary()["inspector"] == VERSIONS[version]


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_planted_fp32_conv_fails_naming_the_layer(version):
    audit = load_engine_info(fixture(f"{version}_fp32_conv.json"))
    assert audit.precision_counts("conv") == {"int8": 3, "fp32": 1}
    verdict = judge_precision(CASE, audit, {"conv": "int8"})
    assert verdict.status == "fail"
    (msg,) = verdict.failures
    assert "1 of 4 conv layers do not run in int8" in msg
    assert f"{PLANTED!r} runs fp32 (CaskConvolution, read from weights)" in msg
    assert str(fixture(f"{version}_fp32_conv.json")) in msg  # which file was audited
    # a layer the recipe keeps in higher precision (partial's keep_precision) is excepted, by module
    # or ONNX node name; any other name is not
    assert judge_precision(CASE, audit, {"conv": "int8"}, kept=("layer1.conv2",)).status == "pass"
    assert judge_precision(CASE, audit, {"conv": "int8"}, kept=("/layer1/conv2/Conv",)).status == "pass"
    assert judge_precision(CASE, audit, {"conv": "int8"}, kept=("layer1.conv1",)).status == "fail"


def test_both_layouts_audit_alike():
    for variant in ("int8", "fp32_conv"):
        ten, eleven = (load_engine_info(fixture(f"{v}_{variant}.json")) for v in ("trt10", "trt11"))
        assert ([(l.name, l.kind, l.precision, l.precision_from) for l in ten.layers]
                == [(l.name, l.kind, l.precision, l.precision_from) for l in eleven.layers])


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_precision_read_from_the_tensors_alone(version):
    """Without weights and tactic names the audit reads each layer's first input: the layer
    tensors' ``Format/Datatype`` (10.x) or ``Datatype`` (11) decide."""
    for variant, counts in (("int8", {"int8": 4}), ("fp32_conv", {"int8": 3, "fp32": 1})):
        data = raw(f"{version}_{variant}.json")
        for l in data["Layers"]:
            l.pop("Weights", None)
            l.pop("TacticName", None)
        audit = parse_engine_info(data)
        assert audit.precision_counts("conv") == counts
        assert {l.precision_from for l in audit.of_kind("conv")} == {"input"}


def test_tensorrt_11_datatype_field():
    # the data-type field decides; Format is read only when it says nothing
    layout_only = "Thirty-two wide channel vectorized row major format"
    assert tensor_precision({"Datatype": "Int8", "Format": layout_only}) == "int8"
    assert tensor_precision({"Datatype": "Int8", "Format": "N/A due to dynamic shapes"}) == "int8"
    assert tensor_precision({"Datatype": "Half", "Format": "Row major linear FP32 format (kLINEAR)"}) == "fp16"
    assert tensor_precision({"Datatype": "N/A", "Format": "Row major linear FP32 format (kLINEAR)"}) == "fp32"
    assert tensor_precision({"Format": "Channel major FP16 format where channel % 8 == 0 (kHWC8)"}) == "fp16"
    # spellings of the key and of the value not confirmed from NVIDIA's page are tolerated
    assert tensor_precision({"DataType": "kINT8"}) == "int8"
    assert tensor_precision({"Data Type": "DataType.HALF"}) == "fp16"
    assert tensor_precision({"Datatype": "BFloat16"}) == "bf16"
    assert tensor_precision({"Datatype": "Float"}) == "fp32"
    assert tensor_precision({"Datatype": "UInt8"}) is None  # not an int8 activation
    assert tensor_precision({"Name": "x", "Dimensions": [1]}) is None
    # TensorRT 10.x, unchanged
    assert tensor_precision({"Format/Datatype": "Four wide channel vectorized row major Int8 format"}) == "int8"
    assert tensor_precision({"Format/Datatype": "N/A due to dynamic shapes"}) is None
    # a conv under dynamic shapes in 11: Format N/A, Datatype still there
    conv = {"LayerType": "CaskConvolution", "Inputs": [{"Datatype": "Int8", "Format": "N/A due to dynamic shapes"}]}
    assert layer_precision(conv) == ("int8", "input")


def test_conv_act_pool_counts_as_a_conv():
    """TensorRT fuses conv + ReLU + max-pool into one ``ConvActPool`` layer whose weights are
    ``ConvWeights`` (trt-engine-explorer's example engines); the audit must not lose that conv."""
    layer = {"Name": "conv1.weight + QuantizeLinear_7 + Conv_9 + MaxPool_12", "LayerType": "ConvActPool",
             "ParameterType": "ConvActPool", "ConvParameterType": "Convolution",
             "ConvWeights": {"Type": "Int8", "Count": 9408},
             "Inputs": [{"Name": "x", "Format/Datatype": "Row major Int8 format"}]}
    assert layer_kind(layer) == "conv"
    assert layer_precision(layer) == ("int8", "weights")


def test_layout_told_by_its_fields_whatever_the_input_form():
    path = fixture("trt11_int8.json")
    text = path.read_text()
    for info in (path, str(text), text.encode(), json.loads(text)):
        assert parse_engine_info(info).schema == SCHEMA_11
    # a JSON with the 11 engine I/O but 10.x layer tensors (or the reverse) is still read, and says so
    data = raw("trt10_int8.json")
    data["I/O Tensors"] = [{"Name": n} for n in data.pop("Bindings")]
    audit = parse_engine_info(data)
    assert audit.schema.startswith("mixed") and "neither documented layout" in audit.notes[0]
    assert audit.precision_counts("conv") == {"int8": 4}


def test_unknown_layout_raises_one_clear_error():
    path = fixture("unknown_tensor_fields.json")
    with pytest.raises(InspectorFormatError) as err:
        load_engine_info(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot read the layers' tensor types")
    assert "layer '/input_quantizer/QuantizeLinear' Inputs[0]" in msg and "'TensorType'" in msg
    assert "'Format/Datatype' (TensorRT 8.2-10.x) nor 'Datatype'/'Format' (TensorRT 11)" in msg
    assert isinstance(err.value, ValueError)  # what callers caught before


@pytest.mark.parametrize("content, match", [
    ("{not json", r"not JSON"),
    ('{"Bindings": ["input"]}', r"no 'Layers' key \(found: 'Bindings'\)"),
    ('[1, 2]', r"no 'Layers' key \(found: a JSON list\)"),
    ('{"Layers": {"conv": 1}}', r"'Layers' is a JSON dict, not a list"),
    ('{"Layers": [], "Bindings": [{"Name": "input"}]}', r"'Bindings' is not a list of tensor names"),
    ('{"Layers": [], "I/O Tensors": ["input"]}', r"'I/O Tensors' is not a list of objects with a 'Name'"),
    ('{"Layers": ["conv1", {"Name": "relu1"}]}', r"'Layers' mixes layer names \(Layers\[0\]\) and layer objects"),
    ('{"Layers": [{"Name": "c", "LayerType": "X", "Inputs": []}, 3]}', r"Layers\[1\] is a JSON int"),
    ('{"Layers": [{"Name": "c", "Kind": "Conv", "Inputs": []}]}', r"no layer has a 'LayerType'"),
    ('{"Layers": [{"Name": "c", "LayerType": "CaskConvolution"}]}', r"no layer has 'Inputs' or 'Outputs'"),
    ('{"Layers": [{"Name": "c", "LayerType": "CaskConvolution", "Inputs": {"Name": "x"}}]}',
     r"layer 'c': 'Inputs' is a JSON dict, not a list"),
])
def test_unreadable_files_name_the_file_and_the_field(tmp_path, content, match):
    path = tmp_path / "layers.json"
    path.write_text(content)
    with pytest.raises(InspectorFormatError, match=match) as err:
        load_engine_info(path)
    assert str(err.value).startswith(f"{path}: ")


def test_an_audit_that_reads_no_convolution_fails(tmp_path):
    """Zero convolutions in an int8 engine fail the check, never pass it; so do an empty layer
    list (ProfilingVerbosity.NONE) and a names-only one."""
    data = raw("trt11_int8.json")
    data["Layers"] = [l for l in data["Layers"] if l["LayerType"] != "CaskConvolution"]
    verdict = judge_precision(CASE, parse_engine_info(data), {"conv": "int8"})
    assert verdict.status == "fail" and "the engine has no conv layers" in verdict.failures[0]

    empty = tmp_path / "empty.json"
    empty.write_text('{"Layers": [], "I/O Tensors": []}')
    verdict = judge_precision(CASE, load_engine_info(empty), {"conv": "int8"})
    assert verdict.status == "fail" and f"{empty}: the engine inspector listed no layers" in verdict.failures[0]

    names = parse_engine_info({"Layers": ["conv1", "relu1"], "I/O Tensors": [{"Name": "input"}]})
    verdict = judge_precision(CASE, names, {"conv": "int8"})
    assert verdict.status == "fail" and "ProfilingVerbosity.DETAILED" in verdict.failures[0]
    with pytest.raises(PrecisionAuditError):
        names.assert_all("conv", "int8")


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_suite_precision_check_on_either_layout(tmp_path, version):
    """``qcase.check_precision(conv="int8")`` through the session, on an audit read from each
    layout: the planted fp32 conv fails ``trt_ptq`` naming the layer; ``partial`` keeps it."""
    from qatcheck.recipe import InputSpec, QuantSettings, Recipe
    from qatcheck.session import Options, QatcheckSession

    class AuditedRunner:  # what TrtRunner offers the check: an ``audit``
        def __init__(self, name: str) -> None:
            self.audit = load_engine_info(fixture(name))

    recipe = Recipe(name="digits", task="classification", model=lambda: None, eval_data=lambda: None,
                    calib_data=lambda: None, input=InputSpec(shape=(32, 1, 16, 16)),
                    modes=("trt_ptq", "partial"), backends=("tensorrt",),
                    quant=QuantSettings(keep_precision=("layer1.conv2",)))
    session = QatcheckSession(Options(baselines_dir=tmp_path, cache_dir=tmp_path), {})
    session.register(recipe)
    session._runners[("digits", "trt_ptq", "tensorrt", False)] = AuditedRunner(f"{version}_fp32_conv.json")
    session._runners[("digits", "partial", "tensorrt", False)] = AuditedRunner(f"{version}_fp32_conv.json")
    res = session.check_precision(Case("digits", "trt_ptq", "tensorrt"), {"conv": "int8"})
    assert not res.ok and f"{PLANTED!r} runs fp32" in res.failures[0]
    assert session.check_precision(Case("digits", "partial", "tensorrt"), {"conv": "int8"}).ok
    session._runners[("digits", "trt_ptq", "tensorrt", False)] = AuditedRunner(f"{version}_int8.json")
    assert session.check_precision(Case("digits", "trt_ptq", "tensorrt"), {"conv": "int8"}).ok
